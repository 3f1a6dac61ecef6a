"""Dataset fingerprint -> plans: what the network and the transforms need, as editable JSON.

The rules follow nnU-Net (Isensee et al., Nature Methods 2021), simplified where a CPU makes
nnU-Net's defaults impractical; every choice lands in ``plans.json``, which a user may edit.

* **Target spacing**: the per-axis median of the training spacings. When the data are strongly
  anisotropic (the largest median spacing is more than 3x the smallest) the low-resolution axis
  takes the 10th percentile of its spacings instead, so thin-slice scans are not thrown away.
* **Normalisation** by modality: ``CT`` clips to the 0.5 / 99.5 percentiles of the foreground
  intensities of the whole training set and z-scores with the foreground mean / sd; every other
  modality is z-scored per image.
* **Patch size** starts at the median shape at the target spacing and shrinks the axis that is
  largest relative to the median until the estimated activation memory of a batch of 2 fits the
  memory budget and the patch holds at most ``max_patch_voxels``.
* **Topology** (MONAI DynUNet kernels and strides per stage and axis): an axis is pooled while its
  feature map stays >= 2 x 4 voxels and its spacing is at most twice the finest spacing; kernels
  are 1 along an axis whose spacing is more than twice the finest, 3 otherwise; at most
  ``max_stages`` stages. The patch is rounded up to a multiple of the total stride per axis.
* **Batch size**: as many patches as fit the memory budget, at least 2, at most ``max_batch_size``
  and at most 5% of the voxels of the dataset (nnU-Net's rule).

CPU-friendly defaults (documented departures from nnU-Net, all editable in ``plans.json``):

* ``base_features=16`` (nnU-Net 32): 3-4x less compute per patch.
* batch size at most 2 in 3D and 16 in 2D (nnU-Net: memory budget only): more updates per second.
* ``iterations_per_epoch=100`` (nnU-Net 250): validation and checkpoints come more often.
* optimiser **AdamW, lr 3e-3**, poly decay (nnU-Net: SGD, Nesterov momentum 0.99, lr 0.01). Measured on
  MSD Hippocampus fold 0 (base 8, batch 2, same seed): mean training loss over iterations 101-150
  was 1.37 with AdamW and 1.93 with SGD (1.85 over iterations 151-200), i.e. AdamW converges much
  faster in the few thousand iterations a CPU affords. Set ``"optimizer": "sgd",
  "learning_rate": 0.01`` for nnU-Net's schedule on long GPU runs.
* **augmentation: random flips only** (preset ``mirror``; nnU-Net adds rotation/scaling, noise,
  blur, brightness, contrast, low resolution and gamma, preset ``nnunet``). A budget of minutes
  underfits and augmentation slows fitting; see :data:`AUGMENTATION_PRESETS` for the measurements.
  Choose ``nnunet`` (``medseg plan --augmentation nnunet``) for hundreds of GPU epochs.

Example:
    >>> from medseg.manifest import load_manifest                                  # doctest: +SKIP
    >>> m = load_manifest("data_manifests/msd_hippocampus.json", data_root="../shared/data/msd_hippocampus")
    >>> plans = make_plans(fingerprint_dataset(m))                                 # doctest: +SKIP
    >>> plans["configurations"]["3d"]["patch_size"]                               # doctest: +SKIP
    [40, 56, 40]
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from medseg.errors import LabelValueError, ManifestError, MedsegUserError
from medseg.io import atomic_path, read_json
from medseg.manifest import Case, Manifest, load_manifest

__all__ = [
    "PLANS_FORMAT_VERSION",
    "AUGMENTATION_DEFAULTS",
    "AUGMENTATION_PRESETS",
    "DEFAULT_AUGMENTATION",
    "fingerprint_dataset",
    "make_plans",
    "plan_dataset",
    "target_spacing",
    "network_topology",
    "dataset_identity",
    "check_plans_match",
    "load_plans",
    "save_json",
]

#: Probability of each training augmentation per patch in nnU-Net (made for ~1000 GPU epochs).
#: Plans carry their own copy in an ``augmentation`` section, editable (0 switches one off).
AUGMENTATION_DEFAULTS: dict[str, float] = {
    "rotate_scale": 0.3,
    "noise": 0.1,
    "blur": 0.2,
    "brightness": 0.15,
    "contrast": 0.15,
    "low_resolution": 0.25,
    "gamma": 0.3,
    "mirror": 0.5,
}

#: Named augmentation settings ``medseg plan --augmentation`` writes into the plans.
#: Short budgets underfit, and augmentation is a regulariser that slows fitting: in 8-minute
#: MSD Hippocampus runs (fold 0, 2 CPU threads, one seed each) the mean validation Dice was 0.846
#: with ``nnunet``, 0.859 with ``light`` and 0.862 with ``mirror``; in 30-minute runs 0.870
#: with ``nnunet`` and 0.890 / 0.893 (two runs) with ``mirror``. Use ``nnunet`` for long runs.
AUGMENTATION_PRESETS: dict[str, dict[str, float]] = {
    "nnunet": dict(AUGMENTATION_DEFAULTS),
    "light": {
        "rotate_scale": 0.1, "noise": 0.05, "blur": 0.05, "brightness": 0.1, "contrast": 0.1,
        "low_resolution": 0.05, "gamma": 0.1, "mirror": 0.5,
    },
    "mirror": {**dict.fromkeys(AUGMENTATION_DEFAULTS, 0.0), "mirror": 0.5},
}
DEFAULT_AUGMENTATION = "mirror"

PLANS_FORMAT_VERSION = 1
_ANISOTROPY_RATIO = 3.0
_MIN_FEATURE_MAP = 4
_SAMPLES_PER_CASE = 10_000
_CT_NAMES = ("ct",)


# ---------------------------------------------------------------------------------------------
# fingerprint
# ---------------------------------------------------------------------------------------------
def _ras_permutation(affine: np.ndarray, ndim: int) -> list[int]:
    """For each RAS world axis (in order), the voxel axis that points along it."""
    rotation = np.abs(np.asarray(affine, float)[:3, :ndim])
    rotation = rotation / np.linalg.norm(rotation, axis=0)
    order: list[int] = [0] * ndim
    used: set[int] = set()
    for axis in range(ndim):
        column = rotation[:, axis].copy()
        for taken in used:
            column[taken] = -1.0
        world = int(np.argmax(column))
        used.add(world)
        order[world] = axis
    return order


def _fingerprint_case(manifest: Manifest, case: Case, seed: int) -> dict[str, Any]:
    image = manifest.read_image(case)
    if case.label is None:
        raise ManifestError(f"{manifest.name}: case {case.case_id!r} has no label to plan from")
    label = manifest.read_label(case)
    differences = image.geometry_differences(label)
    if differences:
        raise MedsegUserError(
            f"{case.label}: label geometry differs from {case.images[0]}: {'; '.join(differences)}"
        )
    values = np.unique(label.array)
    unknown = sorted(set(int(v) for v in values) - set(manifest.labels.ids))
    if unknown:
        raise LabelValueError(
            f"{case.label}: label values {unknown} are not in the manifest's labels "
            f"{list(manifest.labels.ids)}"
        )
    ndim = image.spatial_ndim
    order = _ras_permutation(image.affine, ndim) if ndim == 3 else list(range(ndim))
    spacing = [image.spacing_mm[a] for a in order]
    # shape after the preprocessing's crop to the box of non-zero image voxels (nnU-Net's too)
    nonzero = np.any(image.array != 0, axis=0)
    if nonzero.any():
        box = [np.flatnonzero(np.any(nonzero, axis=tuple(o for o in range(ndim) if o != a))) for a in range(ndim)]
        cropped = [int(b[-1] - b[0] + 1) for b in box]
    else:
        cropped = list(image.spatial_shape)
    shape = [cropped[a] for a in order]
    foreground = label.array[0] > 0
    rng = np.random.default_rng(seed)
    samples = []
    for channel in range(image.num_channels):
        voxels = image.array[channel][foreground]
        if voxels.size > _SAMPLES_PER_CASE:
            voxels = rng.choice(voxels, _SAMPLES_PER_CASE, replace=False)
        samples.append(voxels.astype(np.float64))
    counts = np.bincount(label.array.ravel().astype(np.int64), minlength=manifest.labels.max_id + 1)
    return {
        "case_id": case.case_id,
        "spacing_mm": spacing,
        "shape": shape,
        "class_voxels": {str(i): int(counts[i]) for i in manifest.labels.ids},
        "samples": samples,
    }


def fingerprint_dataset(
    manifest: Manifest,
    *,
    cases: Sequence[Case] | None = None,
    workers: int = 2,
    seed: int = 0,
) -> dict[str, Any]:
    """Spacings, shapes, foreground intensity statistics and class voxel counts of a dataset.

    Spacings and shapes are given in RAS axis order (the order the transforms resample to);
    shapes are those of the box of non-zero image voxels, which preprocessing crops to.
    Intensity statistics pool up to 10 000 foreground voxels per case and channel.

    Args:
        manifest: the dataset.
        cases: the cases to fingerprint; default every labelled training case.
        workers: threads reading cases.
        seed: seed of the foreground voxel sampling.

    Returns:
        Plain JSON: ``dataset``, ``num_cases``, ``spacings_mm``, ``shapes``, ``median_spacing_mm``,
        ``median_shape``, ``intensity`` (per channel: mean, sd, median, percentile_00_5,
        percentile_99_5, min, max), ``class_voxels`` (total per label id) and ``case_ids``.

    Raises:
        ManifestError: no labelled training cases.
        LabelValueError: a label map holds values the manifest does not list.
    """
    if cases is None:
        cases = [c for c in manifest.labelled_cases if c.subset == "training"]
    cases = list(cases)
    if not cases:
        raise ManifestError(f"{manifest.name}: no labelled training cases to plan from")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(
            pool.map(lambda ic: _fingerprint_case(manifest, ic[1], seed + ic[0]), enumerate(cases))
        )
    spacings = np.array([r["spacing_mm"] for r in results], dtype=float)
    shapes = np.array([r["shape"] for r in results], dtype=float)
    intensity = []
    for channel, name in enumerate(manifest.channels):
        pooled = np.concatenate([r["samples"][channel] for r in results])
        if pooled.size == 0:
            pooled = np.zeros(1)
        intensity.append(
            {
                "channel": name,
                "mean": float(pooled.mean()),
                "sd": float(pooled.std()),
                "median": float(np.median(pooled)),
                "percentile_00_5": float(np.percentile(pooled, 0.5)),
                "percentile_99_5": float(np.percentile(pooled, 99.5)),
                "min": float(pooled.min()),
                "max": float(pooled.max()),
            }
        )
    class_voxels = {
        str(i): int(sum(r["class_voxels"][str(i)] for r in results)) for i in manifest.labels.ids
    }
    return {
        "dataset": dataset_identity(manifest),
        "num_cases": len(results),
        "case_ids": [r["case_id"] for r in results],
        "spacings_mm": spacings.tolist(),
        "shapes": shapes.astype(int).tolist(),
        "median_spacing_mm": np.median(spacings, axis=0).tolist(),
        "median_shape": np.median(shapes, axis=0).tolist(),
        "intensity": intensity,
        "class_voxels": class_voxels,
    }


# ---------------------------------------------------------------------------------------------
# rules
# ---------------------------------------------------------------------------------------------
def target_spacing(spacings_mm: Sequence[Sequence[float]]) -> list[float]:
    """Median spacing per axis; the low-resolution axis of anisotropic data takes its 10th percentile.

    Args:
        spacings_mm: one spacing per case, ``(n_cases, n_axes)``.

    Example:
        >>> target_spacing([[1, 1, 5], [1, 1, 3], [1, 1, 5]])
        [1.0, 1.0, 3.4]
    """
    spacings = np.asarray(spacings_mm, dtype=float)
    target = np.median(spacings, axis=0)
    worst = int(np.argmax(target))
    if target[worst] > _ANISOTROPY_RATIO * float(np.min(target)):
        target[worst] = float(np.percentile(spacings[:, worst], 10))
    return [round(float(t), 6) for t in target]


def network_topology(
    patch_size: Sequence[int],
    spacing_mm: Sequence[float],
    *,
    max_stages: int = 5,
    min_feature_map: int = _MIN_FEATURE_MAP,
) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """Kernel sizes and strides per stage (nnU-Net's rules) and the patch size made divisible.

    Args:
        patch_size: desired patch size per axis (voxels).
        spacing_mm: target spacing per axis.
        max_stages: most resolution stages, the full-resolution one included.
        min_feature_map: smallest feature map size after the last pooling.

    Returns:
        ``(kernel_size, strides, patch_size)``: per stage, per axis; the first stage has stride 1;
        the returned patch is rounded up to a multiple of the total stride of each axis.
    """
    ndim = len(patch_size)
    size = np.array(patch_size, dtype=float)
    spacing = np.array(spacing_mm, dtype=float)
    kernels: list[list[int]] = [[3 if s <= 2 * spacing.min() else 1 for s in spacing]]
    strides: list[list[int]] = [[1] * ndim]
    while len(strides) < max_stages:
        finest = spacing.min()
        stride = [
            2 if (size[a] >= 2 * min_feature_map and spacing[a] <= 2 * finest) else 1
            for a in range(ndim)
        ]
        if not any(s == 2 for s in stride):
            break
        size = size / np.array(stride)
        spacing = spacing * np.array(stride)
        strides.append(stride)
        kernels.append([3 if spacing[a] <= 2 * spacing.min() else 1 for a in range(ndim)])
    total = np.prod(np.array(strides), axis=0)
    rounded = [int(math.ceil(p / t) * t) for p, t in zip(patch_size, total)]
    return kernels, strides, rounded


def _activation_bytes(patch: Sequence[int], strides: list[list[int]], filters: list[int]) -> float:
    """Rough training memory of one patch: feature maps kept for backward, float32."""
    shape = np.array(patch, dtype=float)
    voxels = 0.0
    for stride, features in zip(strides, filters):
        shape = shape / np.array(stride)
        voxels += float(np.prod(shape)) * features
    # encoder + decoder, ~3 tensors (conv, norm, activation) for each of 2 convolutions.
    return voxels * 2 * 6 * 4


def _filters(num_stages: int, base: int, cap: int) -> list[int]:
    return [min(base * 2**i, cap) for i in range(num_stages)]


def _configuration(
    median_shape: Sequence[float],
    spacing: Sequence[float],
    *,
    total_voxels: float,
    base_features: int,
    max_features: int,
    memory_budget_gb: float,
    max_patch_voxels: int,
    max_batch_size: int,
    max_stages: int,
) -> dict[str, Any]:
    budget = memory_budget_gb * 1024**3
    patch = [max(int(round(s)), 1) for s in median_shape]
    while True:
        kernels, strides, rounded = network_topology(patch, spacing, max_stages=max_stages)
        filters = _filters(len(strides), base_features, max_features)
        per_patch = _activation_bytes(rounded, strides, filters)
        too_big = per_patch * 2 > budget or float(np.prod(rounded)) > max_patch_voxels
        if not too_big or max(patch) <= 2 * _MIN_FEATURE_MAP:
            break
        ratio = np.array(patch) / np.maximum(np.array(median_shape), 1)
        axis = int(np.argmax(ratio))
        total = int(np.prod([s[axis] for s in strides]))
        patch[axis] = max(patch[axis] - max(total, int(0.1 * patch[axis])), 2 * _MIN_FEATURE_MAP)
    batch = int(budget // max(per_patch, 1.0))
    batch = min(batch, max_batch_size, int(0.05 * total_voxels / float(np.prod(rounded))))
    batch = max(batch, 2)
    return {
        "spatial_dims": len(rounded),
        "spacing_mm": [float(s) for s in spacing],
        "median_shape": [float(s) for s in median_shape],
        "patch_size": rounded,
        "batch_size": batch,
        "network": {
            "architecture": "DynUNet",
            "filters": filters,
            "kernel_size": kernels,
            "strides": strides,
            "deep_supervision": len(strides) > 2,
            "deep_supr_num": max(1, min(len(strides) - 2, 3)),
            "norm": "instance",
            "activation": "leakyrelu",
        },
        "estimated_memory_gb": round(per_patch * batch / 1024**3, 3),
    }


def make_plans(
    fingerprint: Mapping[str, Any],
    *,
    memory_budget_gb: float = 8.0,
    base_features: int = 16,
    max_patch_voxels: int = 128**3,
    max_batch_size_3d: int = 2,
    max_batch_size_2d: int = 16,
    max_stages: int = 5,
    augmentation: str = DEFAULT_AUGMENTATION,
) -> dict[str, Any]:
    """Plans for a ``3d`` and a ``2d`` configuration from a fingerprint (see the module rules).

    Args:
        fingerprint: from :func:`fingerprint_dataset` (or ``fingerprint.json``).
        memory_budget_gb: activation memory allowed for one training batch.
        base_features: features of the first stage (doubled per stage, capped at 320 in 3D, 512 in 2D).
        max_patch_voxels: largest 3D patch (voxels).
        max_batch_size_3d: largest 3D batch (2: more updates per second on a CPU).
        max_batch_size_2d: largest 2D batch.
        max_stages: most resolution stages.
        augmentation: a name in :data:`AUGMENTATION_PRESETS`; its probabilities are written to
            the plans' ``augmentation`` section.

    Returns:
        Plain JSON plans: ``format_version``, ``dataset`` (identity), ``normalization`` (one
        scheme per channel), ``augmentation`` (probability per augmentation), ``configurations``
        (``3d``, ``2d``), ``training`` (optimiser and schedule defaults).
    """
    if augmentation not in AUGMENTATION_PRESETS:
        raise MedsegUserError(f"unknown augmentation preset {augmentation!r} (known: {sorted(AUGMENTATION_PRESETS)})")
    spacings = np.asarray(fingerprint["spacings_mm"], dtype=float)
    shapes = np.asarray(fingerprint["shapes"], dtype=float)
    if shapes.ndim != 2 or shapes.shape[1] != 3:
        raise MedsegUserError(
            f"{fingerprint.get('dataset', {}).get('name', 'dataset')}: the planner supports 3D volumes only; "
            f"this dataset's images have {shapes.shape[-1] if shapes.ndim == 2 else '?'} spatial axes "
            "(2D images such as DRIVE are evaluated, not yet trained)"
        )
    spacing = target_spacing(spacings)
    physical = shapes * spacings
    median_shape = np.median(physical / np.array(spacing), axis=0)
    total_voxels = float(np.sum(np.prod(physical / np.array(spacing), axis=1)))
    normalization = []
    for stats in fingerprint["intensity"]:
        if str(stats["channel"]).strip().lower() in _CT_NAMES:
            normalization.append(
                {
                    "channel": stats["channel"],
                    "scheme": "ct",
                    "clip": [stats["percentile_00_5"], stats["percentile_99_5"]],
                    "mean": stats["mean"],
                    "sd": max(stats["sd"], 1e-8),
                }
            )
        else:
            normalization.append({"channel": stats["channel"], "scheme": "zscore"})
    common = dict(
        base_features=base_features,
        memory_budget_gb=memory_budget_gb,
        max_stages=max_stages,
    )
    config_3d = _configuration(
        median_shape,
        spacing,
        total_voxels=total_voxels,
        max_features=320,
        max_patch_voxels=max_patch_voxels,
        max_batch_size=max_batch_size_3d,
        **common,
    )
    # 2D: slices across the coarsest axis (ties: the last, i.e. axial in RAS order).
    slice_axis = int(len(spacing) - 1 - np.argmax(np.array(spacing)[::-1]))
    in_plane = [a for a in range(len(spacing)) if a != slice_axis]
    config_2d = _configuration(
        median_shape[in_plane],
        [spacing[a] for a in in_plane],
        total_voxels=total_voxels,
        max_features=512,
        max_patch_voxels=2048**2,
        max_batch_size=max_batch_size_2d,
        **common,
    )
    config_2d["slice_axis"] = slice_axis
    config_2d["spacing_mm"] = list(spacing)
    return {
        "format_version": PLANS_FORMAT_VERSION,
        "dataset": dict(fingerprint["dataset"]),
        "normalization": normalization,
        "foreground_oversample": 1.0 / 3.0,
        "augmentation": dict(AUGMENTATION_PRESETS[augmentation]),
        "configurations": {"3d": config_3d, "2d": config_2d},
        "training": {
            "optimizer": "adamw",
            "learning_rate": 0.003,
            "momentum": 0.99,
            "nesterov": True,
            "weight_decay": 3e-5,
            "poly_exponent": 0.9,
            "epochs": 1000,
            "iterations_per_epoch": 100,
            "validate_every": 5,
            "cache_budget_gb": 4.0,
        },
    }


# ---------------------------------------------------------------------------------------------
# dataset identity and files
# ---------------------------------------------------------------------------------------------
def dataset_identity(manifest: Manifest) -> dict[str, Any]:
    """Name, labels, regions and channels: what a plans file must agree with to be reused."""
    return {"name": manifest.name, **manifest.labels.to_json(), "channels": list(manifest.channels)}


def check_plans_match(plans: Mapping[str, Any], manifest: Manifest) -> None:
    """Raise :class:`MedsegUserError` when plans were made for a different dataset.

    Labels (id -> name) and channels must agree; the dataset name may differ (a manifest and
    the dataset.json it derives from name the same data differently) and is only reported.
    """
    if "dataset" not in plans or "configurations" not in plans:
        raise MedsegUserError("plans: not a medseg plans file (no 'dataset' / 'configurations')")
    version = int(plans.get("format_version", 0))
    if version > PLANS_FORMAT_VERSION:
        raise MedsegUserError(
            f"plans: format version {version} is newer than this medseg reads ({PLANS_FORMAT_VERSION})"
        )
    theirs = plans["dataset"]
    ours = dataset_identity(manifest)
    problems = []
    if {str(k): v for k, v in dict(theirs.get("labels", {})).items()} != ours["labels"]:
        problems.append(f"labels {theirs.get('labels')} vs {ours['labels']}")
    if list(theirs.get("channels", [])) != ours["channels"]:
        problems.append(f"channels {theirs.get('channels')} vs {ours['channels']}")
    if problems:
        raise MedsegUserError(
            f"plans were made for dataset {theirs.get('name')!r}, not {ours['name']!r}: "
            + "; ".join(problems)
        )


def save_json(content: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write plain JSON atomically (indent 2), creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    return path


def load_plans(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a plans JSON file, with a :class:`MedsegUserError` naming the file when it is invalid."""
    path = Path(path)
    plans = read_json(path, what="plans file")
    if not isinstance(plans, dict) or "configurations" not in plans:
        raise MedsegUserError(f"{path}: not a medseg plans file (no 'configurations')")
    return plans


def plan_dataset(
    manifest_path: str | os.PathLike[str],
    *,
    data_root: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] = "plans.json",
    workers: int = 2,
    memory_budget_gb: float = 8.0,
    base_features: int = 16,
    augmentation: str = DEFAULT_AUGMENTATION,
) -> dict[str, Any]:
    """Fingerprint a manifest's training cases and write ``plans.json`` and ``fingerprint.json``.

    Args:
        manifest_path: manifest file (or dataset.json).
        data_root: folder the manifest's paths are relative to.
        out: path of the plans file; ``fingerprint.json`` is written beside it.
        workers: threads reading cases.
        memory_budget_gb: see :func:`make_plans`.
        base_features: see :func:`make_plans`.
        augmentation: see :func:`make_plans`.

    Returns:
        The plans.
    """
    manifest = load_manifest(manifest_path, data_root=data_root)
    fingerprint = fingerprint_dataset(manifest, workers=workers)
    plans = make_plans(fingerprint, memory_budget_gb=memory_budget_gb, base_features=base_features,
                       augmentation=augmentation)
    out = Path(out)
    save_json(fingerprint, out.with_name("fingerprint.json"))
    save_json(plans, out)
    return plans
