"""Surface-distance metrics: Hausdorff distance, HD95, ASSD and normalised surface Dice (NSD).

Definitions (DESIGN.md section 6), all distances in millimetres with the *reference* spacing:

* **Boundary** of a mask ``M``: ``M AND NOT erosion(M)``, the erosion using the face-connectivity cross
  (``scipy.ndimage.generate_binary_structure(ndim, 1)``, scipy's and MONAI's default) with everything outside the
  image counted as background, so a mask touching the image border has a closed boundary there. This is exactly
  the boundary of MONAI's ``get_mask_edges`` (which crops with a one-voxel margin and pads with zeros beyond the
  image) and of MetricsReloaded's ``border_map``. An erosion with the full-connectivity cube would give a thicker
  boundary and different HD95 / ASSD (by tenths of a mm on ordinary masks), so it is not used.
* ``d(A->B)``: for every boundary voxel of ``A``, the Euclidean distance (mm) to the nearest boundary voxel of ``B``.
* ``hd_mm = max(max d(R->P), max d(P->R))``.
* ``hd95_mm = max(P95 d(R->P), P95 d(P->R))``, percentiles with linear interpolation (``numpy.percentile``'s
  default, the same as ``torch.quantile`` used by MONAI's ``compute_hausdorff_distance(percentile=95)``).
* ``assd_mm = mean(d(R->P) concatenated with d(P->R))``: the mean over all boundary voxels of both masks, as
  MONAI's ``compute_average_surface_distance(symmetric=True)``; *not* the average of the two directed means.
* ``nsd``: surface Dice at tolerance ``tau`` of Nikolov et al. 2021 (DeepMind ``surface-distance``):
  ``(|S_R within tau of S_P| + |S_P within tau of S_R|) / (|S_R| + |S_P|)`` where ``S`` are the surface
  elements of the marching-cubes-like 2x2(x2) neighbourhood codes on the voxel-corner grid and ``|.|`` is their
  area (3D, mm^2) or contour length (2D, mm). A distance equal to ``tau`` counts as within the tolerance.
  Equal to MONAI's ``compute_surface_dice(use_subvoxels=True)``.

Empty masks: every metric is NaN when the reference or the prediction is empty; the caller (``overlap`` statuses
``ref_empty`` / ``pred_empty`` / ``both_empty``) says why.

Speed (results are exact; only the work changes): one pass over each volume records which labels occur in each
block of 8x8(x8) voxels. Each mask is then split into clusters of occupied blocks, and each cluster is cropped with
a one-voxel zero margin (what the erosion and the 2x2x2 codes need; clusters are more than a voxel apart, so
nothing crosses between crops). A structure with a far-away false-positive island therefore costs two small crops,
not one box spanning the image. Nearest-boundary distances first test the integer voxel offsets in increasing
length (a few dozen to 200) against a scratch grid, which settles nearly every voxel with its exact distance, and
send the rest to a k-d tree; both compute distances from integer offsets, so they do not depend on the crop.
NSD tests the offsets within the tolerance the same way (a k-d tree bounded at the tolerance when there are more
than 400 such offsets).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from medseg.core.components import as_binary_mask
from medseg.metrics.surface_search import (
    SURFACE_KEYS,
    _directed_distances,
    _label_blocks,
    _mask_pair,
    _mask_surface,
    _nan_result,
    _pad_crop,
    _padded_boundary,
    _structure_metrics,
    _validate_pair,
    _validate_spacing,
    _validate_tolerance,
    surface_element_areas,
)

__all__ = [
    "SURFACE_KEYS",
    "mask_boundary",
    "surface_distances",
    "surface_metrics",
    "surface_metrics_multi",
    "surface_element_areas",
]


def mask_boundary(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a binary mask: ``mask AND NOT erosion(mask)``.

    The erosion uses the face-connectivity cross and treats everything outside the image as background, so
    voxels on the image border are boundary voxels. Equal to MONAI's ``get_mask_edges`` (without subvoxels).

    Args:
        mask: 2D or 3D boolean (or 0/1) array.

    Returns:
        Boolean array of the same shape.

    Example:
        >>> m = np.zeros((5, 5), bool); m[1:4, 1:4] = True
        >>> int(mask_boundary(m).sum())
        8
    """
    mask = as_binary_mask(mask, "mask")
    if mask.ndim not in (2, 3):
        raise ValueError(f"mask must be 2D or 3D, got shape {mask.shape}")
    return _padded_boundary(_pad_crop(mask))


def surface_distances(
    reference_mask: np.ndarray, prediction_mask: np.ndarray, *, spacing_mm: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed boundary distances ``d(R->P)`` and ``d(P->R)`` in millimetres.

    ``d(A->B)`` holds, for every boundary voxel of ``A`` (see :func:`mask_boundary`, in C order), the Euclidean
    distance in mm to the nearest boundary voxel of ``B``, using ``spacing_mm``.

    Args:
        reference_mask: Reference ``R``, 2D or 3D boolean array.
        prediction_mask: Prediction ``P``, same shape.
        spacing_mm: Voxel spacing of the reference, one value per axis.

    Returns:
        ``(d_ref_to_pred, d_pred_to_ref)``; both empty arrays when either mask is empty (distances undefined).

    Example:
        >>> r = np.zeros((8, 8), bool); r[2:5, 2:5] = True
        >>> d_rp, d_pr = surface_distances(r, np.roll(r, 1, axis=0), spacing_mm=(2.0, 1.0))
        >>> float(d_rp.max())
        2.0
    """
    ref, pred, spacing = _mask_pair(reference_mask, prediction_mask, spacing_mm)
    if ref is None or pred is None:
        return np.zeros(0, dtype=np.float64), np.zeros(0, dtype=np.float64)
    d_rp, d_pr = _directed_distances(ref, pred, spacing)
    shape = np.asarray(reference_mask).shape
    order_r = np.argsort(np.ravel_multi_index(tuple(ref.voxels.T), shape))
    order_p = np.argsort(np.ravel_multi_index(tuple(pred.voxels.T), shape))
    return d_rp[order_r], d_pr[order_p]


def surface_metrics(
    reference_mask: np.ndarray,
    prediction_mask: np.ndarray,
    *,
    spacing_mm: Sequence[float],
    nsd_tolerance_mm: float = 1.0,
) -> dict[str, float]:
    """Hausdorff distance, HD95, ASSD (mm) and NSD at ``nsd_tolerance_mm`` for one structure.

    Formulas (module docstring has the full definitions): ``hd_mm = max(max d(R->P), max d(P->R))``;
    ``hd95_mm = max(P95 d(R->P), P95 d(P->R))``; ``assd_mm = mean(d(R->P) U d(P->R))``;
    ``nsd = (area(S_R within tau) + area(S_P within tau)) / (area(S_R) + area(S_P))`` in [0, 1].
    Units: mm for distances, NSD unitless. Sources: MONAI ``compute_hausdorff_distance``,
    ``compute_average_surface_distance(symmetric=True)``, ``compute_surface_dice(use_subvoxels=True)``;
    Nikolov et al., "Clinically applicable segmentation of head and neck anatomy for radiotherapy", JMIR 2021.

    Args:
        reference_mask: Reference ``R``, 2D or 3D boolean (or 0/1) array.
        prediction_mask: Prediction ``P``, same shape.
        spacing_mm: Reference voxel spacing, one value per axis.
        nsd_tolerance_mm: NSD tolerance ``tau`` in mm (>= 0).

    Returns:
        ``{"hd_mm", "hd95_mm", "assd_mm", "nsd"}``; all NaN when ``R`` or ``P`` is empty.

    Example:
        >>> r = np.zeros((10, 10, 10), bool); r[3:6, 3:6, 3:6] = True
        >>> out = surface_metrics(r, np.roll(r, 2, axis=2), spacing_mm=(1.0, 1.0, 1.5))
        >>> out["hd_mm"]
        3.0
    """
    tolerance = _validate_tolerance(nsd_tolerance_mm)
    ref, pred, spacing = _mask_pair(reference_mask, prediction_mask, spacing_mm)
    if ref is None or pred is None:
        return _nan_result()
    return _structure_metrics(ref, pred, spacing, tolerance)


def surface_metrics_multi(
    reference_labels: np.ndarray,
    prediction_labels: np.ndarray,
    *,
    labels: Sequence[int],
    spacing_mm: Sequence[float],
    nsd_tolerance_mm: float | Mapping[int, float] = 1.0,
) -> dict[int, dict[str, float]]:
    """:func:`surface_metrics` for several structures of two label maps, one pass per volume to find them.

    Structure ``k`` is ``labels == k`` in each map. One pass over each volume records which labels occur in each
    block of 8x8(x8) voxels; each structure is then processed only on the crops of its clusters of blocks, so a
    structure with a far-away false-positive island costs two small crops, not one huge box.

    Args:
        reference_labels: Reference label map (non-negative integers), 2D or 3D.
        prediction_labels: Predicted label map, same shape.
        labels: Label values to evaluate (positive integers).
        spacing_mm: Reference voxel spacing, one value per axis.
        nsd_tolerance_mm: One tolerance in mm for all labels, or a mapping label -> tolerance (every label must be
            present).

    Returns:
        ``{label: {"hd_mm", "hd95_mm", "assd_mm", "nsd"}}``; NaN values where either mask is empty.

    Example:
        >>> ref = np.zeros((12, 12), np.uint8); ref[2:6, 2:6] = 1; ref[7:10, 7:10] = 2
        >>> out = surface_metrics_multi(ref, ref, labels=[1, 2], spacing_mm=(1.0, 1.0))
        >>> out[2]["hd_mm"], out[2]["nsd"]
        (0.0, 1.0)
    """
    ref = np.asarray(reference_labels)
    pred = np.asarray(prediction_labels)
    _validate_pair(ref, pred, names=("reference_labels", "prediction_labels"))
    for name, arr in (("reference_labels", ref), ("prediction_labels", pred)):
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise ValueError(f"{name} must be an integer label map, got dtype {arr.dtype}")
    spacing = np.asarray(_validate_spacing(spacing_mm, ref.ndim))
    label_list = [int(lab) for lab in labels]
    bad = [lab for lab in label_list if lab <= 0]
    if bad:
        raise ValueError(f"labels must be positive integers (0 is background), got {bad}")
    if isinstance(nsd_tolerance_mm, Mapping):
        missing = [lab for lab in label_list if lab not in nsd_tolerance_mm]
        if missing:
            raise ValueError(f"nsd_tolerance_mm has no tolerance for labels {missing}")
        tolerances = {lab: _validate_tolerance(nsd_tolerance_mm[lab], lab) for lab in label_list}
    else:
        tol = _validate_tolerance(nsd_tolerance_mm)
        tolerances = {lab: tol for lab in label_list}
    if not label_list:
        return {}
    areas = surface_element_areas(spacing)
    ref_blocks = _label_blocks(ref, label_list)
    pred_blocks = _label_blocks(pred, label_list)
    results: dict[int, dict[str, float]] = {}
    for lab in label_list:
        ref_occ, pred_occ = ref_blocks[lab], pred_blocks[lab]
        if ref_occ is None or pred_occ is None:
            results[lab] = _nan_result()
            continue
        ref_surface = _mask_surface(ref if ref.dtype != bool else ref.view(np.uint8), lab, ref_occ, areas)
        pred_surface = _mask_surface(pred if pred.dtype != bool else pred.view(np.uint8), lab, pred_occ, areas)
        results[lab] = _structure_metrics(ref_surface, pred_surface, spacing, tolerances[lab])
    return results
