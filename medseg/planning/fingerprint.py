"""Dataset fingerprint: spacings, shapes, foreground intensities and class sizes of the training cases.

Spacings and shapes are given in RAS axis order (the order the transforms resample to, from
nibabel's ``io_orientation`` as MONAI's ``Orientation`` uses it); shapes are those of the box of
non-zero image voxels, which preprocessing crops to. Intensity statistics pool up to 10 000
foreground voxels per case and channel.

Example:
    >>> fingerprint = fingerprint_dataset(load_manifest("data_manifests/msd_hippocampus.json",
    ...                                   data_root="../shared/data/msd_hippocampus"))   # doctest: +SKIP
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

from medseg.core.orientation import ras_axis_order
from medseg.data.manifest import Case, Manifest
from medseg.errors import LabelValueError, ManifestError, MedsegUserError

__all__ = ["fingerprint_dataset", "dataset_identity"]


def dataset_identity(manifest: Manifest) -> dict[str, Any]:
    """Name, labels, regions and channels: what a plans file must agree with to be reused."""
    return {"name": manifest.name, **manifest.labels.to_json(), "channels": list(manifest.channels)}


_SAMPLES_PER_CASE = 10_000


def _fingerprint_case(manifest: Manifest, case: Case, seed: int) -> dict[str, Any]:
    image = manifest.read_image(case)
    if case.label is None:
        raise ManifestError(f"{manifest.name}: case {case.case_id!r} has no label to plan from")
    label = manifest.read_label(case)
    differences = image.geometry_differences(label)
    if differences:
        raise MedsegUserError(f"{case.label}: label geometry differs from {case.images[0]}: {'; '.join(differences)}")
    values = np.unique(label.array)
    unknown = sorted(set(int(v) for v in values) - set(manifest.labels.ids))
    if unknown:
        raise LabelValueError(
            f"{case.label}: label values {unknown} are not in the manifest's labels {list(manifest.labels.ids)}"
        )
    ndim = image.spatial_ndim
    order = ras_axis_order(image.affine, ndim=ndim)
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


def _image_channel_names(manifest: Manifest, results: Sequence[dict[str, Any]]) -> list[str]:
    """One name per channel the images hold: the manifest's, or ``"<name> R/G/B"`` for a colour image.

    A 2D colour photograph (DRIVE's RGB fundus images) is one manifest channel but three image
    channels; every case must hold the same number.
    """
    counts = {len(r["samples"]) for r in results}
    if len(counts) != 1:
        raise MedsegUserError(f"{manifest.name}: the images hold different numbers of channels {sorted(counts)}")
    count = counts.pop()
    names = list(manifest.channels)
    if count == len(names):
        return names
    if len(names) == 1 and count in (3, 4):
        return [f"{names[0]} {c}" for c in ("R", "G", "B", "A")[:count]]
    raise MedsegUserError(f"{manifest.name}: the images hold {count} channels, the manifest lists {len(names)}")


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
        ``median_shape`` (2 axes for 2D images, 3 for volumes), ``intensity`` (per image channel,
        an RGB image's three included: mean, sd, median, percentile_00_5,
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
        results = list(pool.map(lambda ic: _fingerprint_case(manifest, ic[1], seed + ic[0]), enumerate(cases)))
    spacings = np.array([r["spacing_mm"] for r in results], dtype=float)
    shapes = np.array([r["shape"] for r in results], dtype=float)
    intensity = []
    for channel, name in enumerate(_image_channel_names(manifest, results)):
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
    class_voxels = {str(i): int(sum(r["class_voxels"][str(i)] for r in results)) for i in manifest.labels.ids}
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
