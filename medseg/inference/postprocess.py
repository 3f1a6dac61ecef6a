"""Postprocessing of label maps: connected components, rules chosen by cross-validation, instances.

**Rules** (nnU-Net's approach, per foreground label): on the cross-validation predictions of a run,
try *keep the largest connected component* and then *remove components smaller than a size*, and
keep a rule only where it raises the mean validation Dice of that label (strictly). The chosen
rules are stored as ``postprocessing.json`` in the run folder and applied by
:class:`medseg.inference.segmenter.Segmenter`. Keep-largest is never tried for "thing" structures (lesions
come in numbers). Removed voxels become background (0). Size thresholds are tried at 10 %, 25 % and
50 % of the smallest reference component of the label in the validation cases, in mm³.

``postprocessing.json``::

    {"format_version": 1,
     "rules": {"Anterior": {"keep_largest": true, "min_size_mm3": null}, ...},
     "validation": {"Anterior": {"baseline_dice": 0.88, "dice": 0.89, "num_cases": 41}, ...}}

**Instances and panoptic maps** of thing structures: the connected components of each thing
structure (full connectivity by default), optionally split by a marker watershed on the distance
transform (touching lesions). Two encodings are written beside a prediction:

* instance map: 0 = no instance, 1..N = the instances of all thing structures, numbered in order;
* panoptic map: ``label_id * 1000 + instance`` where ``instance`` counts 1..999 within each thing
  structure and is 0 for "stuff" labels; background stays 0. ``panoptic // 1000`` is the semantic
  label map, ``panoptic % 1000`` the instance index (:data:`PANOPTIC_DIVISOR`).

This module is numpy / scipy / scikit-image only; choosing rules from trained runs (which
predicts with a Segmenter) is :mod:`medseg.inference.crossval`.

Example:
    >>> rules = determine_postprocessing(references, predictions, labels=labels)   # doctest: +SKIP
    >>> cleaned = apply_postprocessing(prediction_array, rules, labels=labels, spacing_mm=(1, 1, 1))  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from medseg.core.components import connected_components, keep_largest_component, remove_small_components
from medseg.core.labels import LabelSet
from medseg.core.volume import Volume
from medseg.errors import MedsegUserError
from medseg.io.files import read_json, write_json

__all__ = [
    "POSTPROCESSING_FILE",
    "POSTPROCESSING_FORMAT_VERSION",
    "PANOPTIC_DIVISOR",
    "apply_postprocessing",
    "determine_postprocessing",
    "save_postprocessing",
    "load_postprocessing",
    "instance_maps",
]

POSTPROCESSING_FILE = "postprocessing.json"
POSTPROCESSING_FORMAT_VERSION = 1
PANOPTIC_DIVISOR = 1000
_SIZE_FRACTIONS = (0.1, 0.25, 0.5)


# ---------------------------------------------------------------------------------------------
# components
# ---------------------------------------------------------------------------------------------
def _apply_rule(mask: np.ndarray, rule: Mapping[str, Any], voxel_mm3: float) -> np.ndarray:
    if rule.get("keep_largest"):
        mask = keep_largest_component(mask)
    min_size = rule.get("min_size_mm3")
    if min_size:
        mask = remove_small_components(mask, min_voxels=float(min_size) / voxel_mm3)
    return mask


def apply_postprocessing(
    label_array: np.ndarray,
    rules: Mapping[str, Any],
    *,
    labels: LabelSet,
    spacing_mm: Sequence[float],
) -> np.ndarray:
    """Apply per-label rules (``postprocessing.json`` content, or its ``"rules"``) to a label array.

    Args:
        label_array: spatial label array (label ids).
        rules: ``{"rules": {name: {"keep_largest": bool, "min_size_mm3": float | None}}}``.
        labels: the label map (names -> ids).
        spacing_mm: voxel spacing, for size thresholds in mm³.

    Returns:
        A new array; voxels removed by a rule become 0.
    """
    per_label = rules.get("rules", rules)
    result = np.array(label_array, copy=True)
    voxel_mm3 = float(np.prod(spacing_mm))
    for name, rule in per_label.items():
        if not (rule.get("keep_largest") or rule.get("min_size_mm3")):
            continue
        label_id = labels.id_of(name)
        mask = result == label_id
        if not mask.any():
            continue
        box = _bounding_box(mask)
        kept = _apply_rule(mask[box], rule, voxel_mm3)
        region = result[box]
        region[mask[box] & ~kept] = 0
    return result


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)


# ---------------------------------------------------------------------------------------------
# choosing rules by cross-validation
# ---------------------------------------------------------------------------------------------
def _dice(reference: np.ndarray, prediction: np.ndarray) -> float:
    denominator = int(reference.sum()) + int(prediction.sum())
    if denominator == 0:
        return math.nan
    return 2.0 * int(np.count_nonzero(reference & prediction)) / denominator


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _as_array(item: Volume | np.ndarray) -> np.ndarray:
    return item.array[0] if isinstance(item, Volume) else np.asarray(item)


def determine_postprocessing(
    references: Sequence[Volume | np.ndarray],
    predictions: Sequence[Volume | np.ndarray],
    *,
    labels: LabelSet,
    things: Sequence[str] = (),
    spacings_mm: Sequence[Sequence[float]] | None = None,
    min_improvement: float = 0.0,
) -> dict[str, Any]:
    """Choose keep-largest / remove-small rules per label from validation predictions.

    For each foreground label: first keep-largest-component (not for thing structures), then,
    on top of what was kept, a minimum component size (10/25/50 % of the smallest reference
    component of the label, in mm³). A rule is kept only when the mean Dice of the label over
    the cases (cases where both masks are empty excluded) rises by more than ``min_improvement``.

    Args:
        references: reference label maps (Volumes, or arrays with ``spacings_mm``).
        predictions: predicted label maps, same order and grids.
        labels: the label map.
        things: structure names scored as instances.
        spacings_mm: per case, when plain arrays are given (Volumes carry their own).
        min_improvement: least Dice gain for a rule to be kept.

    Returns:
        ``{"format_version", "rules", "validation"}`` (see the module docstring).
    """
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    if not references:
        raise MedsegUserError("postprocessing: no validation cases to choose rules from")
    refs = [_as_array(r) for r in references]
    preds = [_as_array(p) for p in predictions]
    for index, (r, p) in enumerate(zip(refs, preds)):
        if r.shape != p.shape:
            raise ValueError(f"case {index}: reference shape {r.shape} differs from prediction {p.shape}")
    if spacings_mm is None:
        spacings = [
            tuple(r.spacing_mm) if isinstance(r, Volume) else (1.0,) * refs[i].ndim for i, r in enumerate(references)
        ]
    else:
        spacings = [tuple(s) for s in spacings_mm]
    voxel_mm3 = [float(np.prod(s)) for s in spacings]
    rules: dict[str, Any] = {}
    validation: dict[str, Any] = {}
    for label_id in labels.foreground_ids:
        name = labels.name_of(label_id)
        ref_masks = [r == label_id for r in refs]
        pred_masks = [p == label_id for p in preds]

        def score(rule: Mapping[str, Any], ref_masks=ref_masks, pred_masks=pred_masks) -> float:
            return _mean(
                [
                    _dice(r, _apply_rule(p, rule, v) if p.any() else p)
                    for r, p, v in zip(ref_masks, pred_masks, voxel_mm3)
                ]
            )

        baseline = score({})
        chosen: dict[str, Any] = {"keep_largest": False, "min_size_mm3": None}
        best = baseline
        if name not in things and not math.isnan(baseline):
            candidate = score({"keep_largest": True})
            if candidate > best + min_improvement:
                chosen["keep_largest"], best = True, candidate
        smallest = _smallest_component_mm3(ref_masks, voxel_mm3)
        if smallest is not None and not math.isnan(baseline):
            for fraction in _SIZE_FRACTIONS:
                threshold = round(fraction * smallest, 3)
                candidate = score({**chosen, "min_size_mm3": threshold})
                if candidate > best + min_improvement:
                    chosen["min_size_mm3"], best = threshold, candidate
        rules[name] = chosen
        validation[name] = {
            "baseline_dice": None if math.isnan(baseline) else round(baseline, 6),
            "dice": None if math.isnan(best) else round(best, 6),
            "num_cases": len(refs),
        }
    return {"format_version": POSTPROCESSING_FORMAT_VERSION, "rules": rules, "validation": validation}


def _smallest_component_mm3(masks: Sequence[np.ndarray], voxel_mm3: Sequence[float]) -> float | None:
    smallest: float | None = None
    for mask, volume in zip(masks, voxel_mm3):
        if not mask.any():
            continue
        box = _bounding_box(mask)
        components, count = connected_components(mask[box])
        sizes = np.bincount(components.ravel())[1:] * volume
        value = float(sizes.min())
        smallest = value if smallest is None else min(smallest, value)
    return smallest


def save_postprocessing(rules: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write rules as JSON atomically (a folder gets ``postprocessing.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / POSTPROCESSING_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json(dict(rules), path)


def load_postprocessing(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``postprocessing.json`` (a file or a folder holding it), checking its format."""
    path = Path(path)
    if path.is_dir():
        path = path / POSTPROCESSING_FILE
    content = read_json(path, what="postprocessing file")
    if not isinstance(content, dict) or not isinstance(content.get("rules"), dict):
        raise MedsegUserError(f"{path}: not a medseg postprocessing file (no 'rules')")
    if int(content.get("format_version", 0)) > POSTPROCESSING_FORMAT_VERSION:
        raise MedsegUserError(
            f"{path}: postprocessing format {content['format_version']} is newer than this medseg reads"
        )
    return content


# ---------------------------------------------------------------------------------------------
# instances and panoptic maps
# ---------------------------------------------------------------------------------------------
def _split_touching(
    mask: np.ndarray, components: np.ndarray, *, spacing_mm: Sequence[float], min_distance_mm: float
) -> np.ndarray:
    """Marker watershed on the distance transform: splits touching blobs of one component."""
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    distance = ndimage.distance_transform_edt(mask, sampling=spacing_mm)
    min_distance = max(1, int(round(min_distance_mm / float(min(spacing_mm)))))
    peaks = peak_local_max(distance, min_distance=min_distance, labels=components, exclude_border=False)
    markers = np.zeros(mask.shape, dtype=np.int32)
    for index, peak in enumerate(peaks, start=1):
        markers[tuple(peak)] = index
    if len(peaks) == 0:
        return components
    split = watershed(-distance, markers, mask=mask)
    # components without a peak keep their own id after the watershed ids
    missing = mask & (split == 0)
    if missing.any():
        extra, _ = connected_components(missing)
        split = np.where(missing, extra + split.max(), split)
    _, relabelled = np.unique(split, return_inverse=True)
    return relabelled.reshape(split.shape).astype(np.int32)


def instance_maps(
    label_array: np.ndarray,
    *,
    labels: LabelSet,
    things: Sequence[str],
    spacing_mm: Sequence[float],
    connectivity: int | None = None,
    watershed: bool = False,
    min_distance_mm: float = 3.0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Instance map and panoptic map (see the module docstring) of a label array.

    Args:
        label_array: spatial label array (label ids).
        labels: the label map.
        things: thing structure names (labels or regions).
        spacing_mm: voxel spacing.
        connectivity: component connectivity (default full).
        watershed: split touching instances with a marker watershed on the distance transform.
        min_distance_mm: smallest distance between two watershed markers.

    Returns:
        ``(instances, panoptic)``: int32 arrays shaped like ``label_array``; ``panoptic`` is None when
        a structure has more than ``PANOPTIC_DIVISOR - 1`` (999) instances, which its encoding
        cannot hold (the instance map holds them all).
    """
    instances = np.zeros(label_array.shape, dtype=np.int32)
    panoptic: np.ndarray | None = label_array.astype(np.int32) * PANOPTIC_DIVISOR
    structures = {s.name: s for s in labels.structures()}
    next_id = 1
    for name in things:
        if name not in structures:
            raise MedsegUserError(f"unknown thing structure {name!r} (known: {sorted(structures)})")
        mask = np.isin(label_array, structures[name].label_ids)
        if not mask.any():
            continue
        components, count = connected_components(mask, connectivity=connectivity)
        if watershed and count:
            components = _split_touching(mask, components, spacing_mm=spacing_mm, min_distance_mm=min_distance_mm)
            count = int(components.max())
        inside = components > 0
        instances[inside] = components[inside] + (next_id - 1)
        if count >= PANOPTIC_DIVISOR:
            panoptic = None  # more instances than label x 1000 + instance can number
        elif panoptic is not None:
            panoptic[inside] = label_array[inside].astype(np.int32) * PANOPTIC_DIVISOR + components[inside]
        next_id += count
    return instances, panoptic
