"""Planning rules: a dataset fingerprint -> plans (what the network and the transforms need).

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
    >>> plans = make_plans(fingerprint_dataset(manifest))                        # doctest: +SKIP
    >>> plans["configurations"]["3d"]["patch_size"]                              # doctest: +SKIP
    [40, 56, 40]
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from medseg.errors import MedsegUserError
from medseg.planning.presets import AUGMENTATION_PRESETS, DEFAULT_AUGMENTATION, PLANS_FORMAT_VERSION

__all__ = ["target_spacing", "network_topology", "make_plans"]

_ANISOTROPY_RATIO = 3.0


_MIN_FEATURE_MAP = 4


_CT_NAMES = ("ct",)


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
        stride = [2 if (size[a] >= 2 * min_feature_map and spacing[a] <= 2 * finest) else 1 for a in range(ndim)]
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
        scheme per image channel), ``augmentation`` (probability per augmentation),
        ``configurations`` (``3d`` and ``2d`` for volumes; only ``2d`` for 2D images, whose
        ``spacing_mm`` has a third entry 1.0 for the single slice along ``slice_axis`` 2),
        ``training`` (optimiser and schedule defaults).
    """
    if augmentation not in AUGMENTATION_PRESETS:
        raise MedsegUserError(f"unknown augmentation preset {augmentation!r} (known: {sorted(AUGMENTATION_PRESETS)})")
    spacings = np.asarray(fingerprint["spacings_mm"], dtype=float)
    shapes = np.asarray(fingerprint["shapes"], dtype=float)
    if shapes.ndim != 2 or shapes.shape[1] not in (2, 3):
        raise MedsegUserError(
            f"{fingerprint.get('dataset', {}).get('name', 'dataset')}: the planner supports 2D images and 3D "
            f"volumes; this dataset's images have {shapes.shape[-1] if shapes.ndim == 2 else '?'} spatial axes"
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
    if shapes.shape[1] == 2:
        # 2D images (DRIVE): one 2d configuration; an image is a volume of one slice along axis 2
        config_2d = _configuration(
            median_shape,
            spacing,
            total_voxels=total_voxels,
            max_features=512,
            max_patch_voxels=2048**2,
            max_batch_size=max_batch_size_2d,
            **common,
        )
        config_2d["slice_axis"] = 2
        config_2d["spacing_mm"] = [*spacing, 1.0]
        configurations = {"2d": config_2d}
    else:
        configurations = _configurations_3d(
            median_shape,
            spacing,
            total_voxels=total_voxels,
            max_patch_voxels=max_patch_voxels,
            max_batch_size_3d=max_batch_size_3d,
            max_batch_size_2d=max_batch_size_2d,
            common=common,
        )
    return {
        "format_version": PLANS_FORMAT_VERSION,
        "dataset": dict(fingerprint["dataset"]),
        "normalization": normalization,
        "foreground_oversample": 1.0 / 3.0,
        "augmentation": dict(AUGMENTATION_PRESETS[augmentation]),
        "configurations": configurations,
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


def _configurations_3d(
    median_shape: np.ndarray,
    spacing: list[float],
    *,
    total_voxels: float,
    max_patch_voxels: int,
    max_batch_size_3d: int,
    max_batch_size_2d: int,
    common: Mapping[str, Any],
) -> dict[str, dict[str, Any]]:
    """The ``3d`` and the slice-wise ``2d`` configuration of a dataset of volumes."""
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
    return {"3d": config_3d, "2d": config_2d}
