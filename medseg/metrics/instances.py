"""Instance (lesion) metrics: connected components, matching, lesion-wise F1 and Dice, PQ, AP50/AP75.

Definitions (DESIGN.md section 6):

* **Instances** are the connected components of a mask, full connectivity by default (26 in 3D, 8 in 2D);
  ``connectivity=1`` is face connectivity (6 / 4). An integer map with labels other than 0/1 is taken as an
  instance map as it is (each positive value one instance).
* **Intersection table**: one pass over the voxels that are foreground in either map gives every instance size,
  centroid and every overlapping (reference, prediction) pair with its intersection; ``IoU = |r & p| / |r | p|``.
* **Matching** (``criterion``):

  - ``"iou"``: a pair matches when ``IoU > iou_threshold`` (default 0.5). For thresholds >= 0.5 a match is unique
    by construction (an instance cannot overlap two disjoint instances by more than half of their union each);
    for lower thresholds pairs are assigned one-to-one greedily by decreasing IoU.
  - ``"overlap"``: any overlap matches (detection style, many-to-one allowed): a reference lesion is detected if
    it overlaps any predicted lesion, a predicted lesion is a true detection if it overlaps any reference lesion.
    Its partner (``matched_id``) is the one with the largest intersection (lowest id on ties).

* **Lesion-wise counts**: ``tp`` = matched reference lesions, ``fn = n_ref - tp``, ``fp`` = unmatched predicted
  lesions; ``lesion_recall = tp / n_ref``, ``lesion_precision = (n_pred - fp) / n_pred``,
  ``lesion_f1 = 2 P R / (P + R)`` (equal to ``2 TP / (2 TP + FP + FN)`` for one-to-one matching).
  ``lesion_dice`` = mean Dice of the matched reference lesions with their partner; unmatched lesions are *not*
  averaged in as 0 (they are counted by ``fp`` / ``fn``); NaN when nothing matches.
* **Panoptic quality** (Kirillov et al., CVPR 2019), always with ``IoU > 0.5`` matching:
  ``SQ = mean IoU of TP pairs``, ``RQ = TP / (TP + FP/2 + FN/2)``, ``PQ = sum IoU(TP) / (TP + FP/2 + FN/2)
  = SQ * RQ``; with no TP, ``RQ = PQ = 0`` and ``SQ`` is NaN.
* **AP50 / AP75**: COCO (pycocotools) average precision at IoU >= 0.5 / 0.75: predictions sorted by decreasing
  score (stable), each matched greedily to the unmatched reference with the highest IoU at or above the threshold,
  precision made monotone, sampled at 101 recall points ``0, 0.01, ..., 1``. The score of a predicted instance is
  ``prediction_scores[id]`` or the mean of ``probabilities`` over its voxels. Without scores AP is NaN and
  ``ap_scored`` is False; with no reference lesion AP is NaN (COCO's -1).

Empty cases (``status``): ``both_empty`` (no lesion anywhere: every metric NaN), ``ref_empty`` (recall, SQ,
lesion_dice, AP NaN; precision, F1, RQ, PQ 0), ``pred_empty`` (precision, SQ, lesion_dice NaN; recall, F1, RQ, PQ
0; AP 0 when scored), ``ok``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from medseg.core.components import connected_components
from medseg.metrics.detection import average_precision

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "LESION_COLUMNS",
    "InstanceMatch",
    "match_instances",
    "lesion_metrics",
]

Criterion = Literal["iou", "overlap"]


@dataclass(frozen=True)
class InstanceMatch:
    """Result of :func:`match_instances`: instances, their overlaps and the matching.

    Arrays ``ref_*`` are aligned with ``ref_ids`` (sorted positive ids present), ``pred_*`` with ``pred_ids`` and
    ``pair_*`` with the overlapping pairs (sorted by reference then prediction id). ``*_matched_id`` is the
    partner under the criterion (0: unmatched); ``*_best_iou`` the largest IoU with any instance of the other map.
    """

    ref_ids: np.ndarray
    pred_ids: np.ndarray
    ref_voxels: np.ndarray
    pred_voxels: np.ndarray
    pair_ref: np.ndarray
    pair_pred: np.ndarray
    pair_intersection: np.ndarray
    pair_iou: np.ndarray
    pair_matched: np.ndarray
    ref_matched_id: np.ndarray
    pred_matched_id: np.ndarray
    ref_best_iou: np.ndarray
    pred_best_iou: np.ndarray
    criterion: str
    iou_threshold: float


@dataclass(frozen=True)
class _Table:
    ref_ids: np.ndarray
    pred_ids: np.ndarray
    ref_voxels: np.ndarray
    pred_voxels: np.ndarray
    ref_centroids: np.ndarray
    pred_centroids: np.ndarray
    pair_ref: np.ndarray
    pair_pred: np.ndarray
    pair_intersection: np.ndarray
    pred_score_sums: np.ndarray | None


def _check_instance_map(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == bool:
        return array.view(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be an integer instance map, got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.signedinteger) and array.size and int(array.min()) < 0:
        raise ValueError(f"{name} has negative instance ids, e.g. {int(array.min())}")
    return array


def _instance_table(
    reference: np.ndarray, prediction: np.ndarray, *, probabilities: np.ndarray | None = None
) -> _Table:
    """One pass over the foreground of both maps: sizes, centroids, pairwise intersections, score sums."""
    flat_r = reference.reshape(-1)
    flat_p = prediction.reshape(-1)
    fg = np.flatnonzero(np.logical_or(flat_r, flat_p))
    r = flat_r[fg].astype(np.int64)
    p = flat_p[fg].astype(np.int64)
    n_r = int(r.max()) + 1 if r.size else 1
    n_p = int(p.max()) + 1 if p.size else 1
    ref_count = np.bincount(r, minlength=n_r)
    pred_count = np.bincount(p, minlength=n_p)
    coords = np.unravel_index(fg, reference.shape)
    ref_ids = np.flatnonzero(ref_count[1:]) + 1
    pred_ids = np.flatnonzero(pred_count[1:]) + 1
    ref_cent = np.stack([np.bincount(r, weights=c, minlength=n_r)[ref_ids] for c in coords], axis=-1)
    pred_cent = np.stack([np.bincount(p, weights=c, minlength=n_p)[pred_ids] for c in coords], axis=-1)
    ref_cent = ref_cent / np.maximum(ref_count[ref_ids], 1)[:, None]
    pred_cent = pred_cent / np.maximum(pred_count[pred_ids], 1)[:, None]
    both = (r > 0) & (p > 0)
    keys, inter = np.unique(r[both] * n_p + p[both], return_counts=True)
    score_sums = None
    if probabilities is not None:
        weights = probabilities.reshape(-1)[fg].astype(np.float64)
        score_sums = np.bincount(p, weights=weights, minlength=n_p)[pred_ids]
    return _Table(
        ref_ids=ref_ids,
        pred_ids=pred_ids,
        ref_voxels=ref_count[ref_ids],
        pred_voxels=pred_count[pred_ids],
        ref_centroids=ref_cent.reshape(len(ref_ids), reference.ndim),
        pred_centroids=pred_cent.reshape(len(pred_ids), reference.ndim),
        pair_ref=keys // n_p,
        pair_pred=keys % n_p,
        pair_intersection=inter.astype(np.int64),
        pred_score_sums=score_sums,
    )


def _pair_iou(table: _Table) -> np.ndarray:
    size_r = table.ref_voxels[np.searchsorted(table.ref_ids, table.pair_ref)]
    size_p = table.pred_voxels[np.searchsorted(table.pred_ids, table.pair_pred)]
    return table.pair_intersection / (size_r + size_p - table.pair_intersection)


def _one_to_one(iou: np.ndarray, pair_ref: np.ndarray, pair_pred: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Greedy one-to-one assignment among ``keep`` pairs by decreasing IoU (ties: lower ids first)."""
    matched = np.zeros(len(iou), dtype=bool)
    used_r: set[int] = set()
    used_p: set[int] = set()
    for i in np.lexsort((pair_pred, pair_ref, -iou)):
        if keep[i] and int(pair_ref[i]) not in used_r and int(pair_pred[i]) not in used_p:
            matched[i] = True
            used_r.add(int(pair_ref[i]))
            used_p.add(int(pair_pred[i]))
    return matched


def _best_per(
    ids: np.ndarray, pair_ids: np.ndarray, values: np.ndarray, other: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each id, the largest value among its pairs and the partner id (lowest on ties); 0 / 0 without pairs."""
    best = np.zeros(len(ids), dtype=np.float64)
    partner = np.zeros(len(ids), dtype=np.int64)
    order = np.lexsort((other, -values, pair_ids))  # per id: largest value first, then lowest partner
    first = np.ones(len(order), dtype=bool)
    first[1:] = pair_ids[order][1:] != pair_ids[order][:-1]
    chosen = order[first]
    pos = np.searchsorted(ids, pair_ids[chosen])
    best[pos] = values[chosen]
    partner[pos] = other[chosen]
    return best, partner


def _matching(table: _Table, *, criterion: str, iou_threshold: float) -> InstanceMatch:
    iou = _pair_iou(table)
    if criterion == "iou":
        keep = iou > iou_threshold
        matched = keep if iou_threshold >= 0.5 else _one_to_one(iou, table.pair_ref, table.pair_pred, keep)
        ref_key = pred_key = iou
    else:
        matched = np.ones(len(iou), dtype=bool)
        ref_key = pred_key = table.pair_intersection.astype(np.float64)
    ref_best_iou, _ = _best_per(table.ref_ids, table.pair_ref, iou, table.pair_pred)
    pred_best_iou, _ = _best_per(table.pred_ids, table.pair_pred, iou, table.pair_ref)
    m = matched
    _, ref_partner = _best_per(table.ref_ids, table.pair_ref[m], ref_key[m], table.pair_pred[m])
    _, pred_partner = _best_per(table.pred_ids, table.pair_pred[m], pred_key[m], table.pair_ref[m])
    return InstanceMatch(
        ref_ids=table.ref_ids,
        pred_ids=table.pred_ids,
        ref_voxels=table.ref_voxels,
        pred_voxels=table.pred_voxels,
        pair_ref=table.pair_ref,
        pair_pred=table.pair_pred,
        pair_intersection=table.pair_intersection,
        pair_iou=iou,
        pair_matched=matched,
        ref_matched_id=ref_partner,
        pred_matched_id=pred_partner,
        ref_best_iou=ref_best_iou,
        pred_best_iou=pred_best_iou,
        criterion=criterion,
        iou_threshold=float(iou_threshold),
    )


def _check_criterion(criterion: str, iou_threshold: float) -> None:
    if criterion not in ("iou", "overlap"):
        raise ValueError(f"criterion must be 'iou' or 'overlap', got {criterion!r}")
    if not (isinstance(iou_threshold, (int, float)) and 0.0 <= float(iou_threshold) < 1.0):
        raise ValueError(f"iou_threshold must be in [0, 1), got {iou_threshold!r}")


def match_instances(
    reference_instances: np.ndarray,
    prediction_instances: np.ndarray,
    *,
    criterion: Criterion = "iou",
    iou_threshold: float = 0.5,
) -> InstanceMatch:
    """Match reference and predicted instances (rules in the module docstring).

    Args:
        reference_instances: Reference instance map (0 background, each positive id one instance).
        prediction_instances: Predicted instance map, same shape.
        criterion: ``"iou"`` (``IoU > iou_threshold``, one-to-one) or ``"overlap"`` (any overlap).
        iou_threshold: IoU threshold in [0, 1) for ``criterion="iou"``.

    Returns:
        An :class:`InstanceMatch`.

    Example:
        >>> ref = np.array([[1, 1, 0, 2]]); pred = np.array([[1, 1, 1, 0]])
        >>> match_instances(ref, pred).ref_matched_id.tolist()
        [1, 0]
    """
    _check_criterion(criterion, iou_threshold)
    ref = _check_instance_map(reference_instances, "reference_instances")
    pred = _check_instance_map(prediction_instances, "prediction_instances")
    if ref.shape != pred.shape:
        raise ValueError(f"reference_instances shape {ref.shape} != prediction_instances shape {pred.shape}")
    return _matching(_instance_table(ref, pred), criterion=criterion, iou_threshold=iou_threshold)


def _prepare(array: np.ndarray, name: str, input_kind: str, connectivity: int | None) -> np.ndarray:
    array = np.asarray(array)
    if input_kind == "instances":
        return _check_instance_map(array, name)
    is_binary = array.dtype == bool
    if not is_binary and np.issubdtype(array.dtype, np.integer) and array.size > 0:
        is_binary = int(array.min()) >= 0 and int(array.max()) <= 1
    if input_kind == "mask" or is_binary:
        if not is_binary and array.size:
            raise ValueError(f"{name} was given as a mask but holds values {np.unique(array)[:10].tolist()}")
        return connected_components(array.astype(bool, copy=False), connectivity=connectivity)[0]
    return _check_instance_map(array, name)


def lesion_metrics(
    reference_mask_or_instances: np.ndarray,
    prediction_mask_or_instances: np.ndarray,
    *,
    spacing_mm: Sequence[float],
    connectivity: int | None = None,
    criterion: Criterion = "iou",
    iou_threshold: float = 0.5,
    prediction_scores: Mapping[int, float] | None = None,
    probabilities: np.ndarray | None = None,
    input_kind: Literal["auto", "mask", "instances"] = "auto",
) -> tuple[dict[str, float | int | str | bool], pd.DataFrame]:
    """Lesion-wise detection metrics, lesion-wise Dice, panoptic quality and AP50/AP75 of one case.

    All definitions, units and empty cases are in the module docstring. Volumes are in ml (reference spacing).

    Args:
        reference_mask_or_instances: Reference binary mask (split into components) or instance map.
        prediction_mask_or_instances: Prediction, same shape.
        spacing_mm: Voxel spacing, one value per axis (for ``volume_ml``).
        connectivity: Component connectivity for masks: 1 = faces .. ``ndim`` = full (default).
        criterion: ``"iou"`` or ``"overlap"`` matching for the lesion-wise counts and Dice.
        iou_threshold: Threshold for ``criterion="iou"``.
        prediction_scores: Score per predicted instance id (for AP); excludes ``probabilities``.
        probabilities: Foreground probability map, same shape; score = its mean over each predicted instance.
        input_kind: ``"auto"`` (boolean or 0/1 arrays are masks, other integer maps are instance maps),
            ``"mask"`` or ``"instances"``.

    Returns:
        ``(summary, lesions)``: ``summary`` has ``status, n_ref, n_pred, tp, fp, fn, lesion_precision,
        lesion_recall, lesion_f1, lesion_dice, pq, sq, rq, ap50, ap75, ap_scored, criterion``; ``lesions`` has one
        row per reference and per predicted lesion: ``source, lesion_id, n_voxels, volume_ml, centroid_vox,
        best_iou, matched, matched_id, dice, score``.

    Example:
        >>> ref = np.zeros((8, 8), bool); ref[1:3, 1:3] = True; ref[5:7, 5:7] = True
        >>> summary, table = lesion_metrics(ref, ref, spacing_mm=(1.0, 1.0))
        >>> summary["lesion_f1"], summary["pq"], len(table)
        (1.0, 1.0, 4)
    """
    _check_criterion(criterion, iou_threshold)
    if input_kind not in ("auto", "mask", "instances"):
        raise ValueError(f"input_kind must be 'auto', 'mask' or 'instances', got {input_kind!r}")
    if prediction_scores is not None and probabilities is not None:
        raise ValueError("give prediction_scores or probabilities, not both")
    ref = _prepare(reference_mask_or_instances, "reference", input_kind, connectivity)
    pred = _prepare(prediction_mask_or_instances, "prediction", input_kind, connectivity)
    if ref.shape != pred.shape:
        raise ValueError(f"reference shape {ref.shape} != prediction shape {pred.shape}")
    spacing = np.atleast_1d(np.asarray(spacing_mm, dtype=np.float64))
    if spacing.size != ref.ndim or not np.all(np.isfinite(spacing) & (spacing > 0)):
        raise ValueError(f"spacing_mm={tuple(spacing.tolist())} must be {ref.ndim} finite values > 0")
    voxel_ml = float(np.prod(spacing)) / 1000.0
    probs = None
    if probabilities is not None:
        probs = np.asarray(probabilities)
        if probs.shape != pred.shape:
            raise ValueError(f"probabilities shape {probs.shape} != prediction shape {pred.shape}")
        if not np.all(np.isfinite(probs)):
            raise ValueError("probabilities contain NaN or infinite values")

    table = _instance_table(ref, pred, probabilities=probs)
    match = _matching(table, criterion=criterion, iou_threshold=iou_threshold)

    scores: np.ndarray | None = None
    if probs is not None and table.pred_score_sums is not None:
        scores = table.pred_score_sums / np.maximum(table.pred_voxels, 1)
    elif prediction_scores is not None:
        missing = [int(i) for i in table.pred_ids if int(i) not in prediction_scores]
        if missing:
            raise ValueError(f"prediction_scores has no score for predicted instances {missing[:10]}")
        scores = np.array([float(prediction_scores[int(i)]) for i in table.pred_ids], dtype=np.float64)

    ref_dice, pred_dice = _partner_dice(table, match)
    summary = _summary(table, match, scores, criterion, ref_dice)
    lesions = _lesion_rows(table, match, scores, voxel_ml, ref_dice, pred_dice)
    return summary, lesions


def _partner_dice(table: _Table, match: InstanceMatch) -> tuple[np.ndarray, np.ndarray]:
    """Dice of every instance with its matched partner (NaN when unmatched), for both maps."""
    inter = {(int(a), int(b)): int(n) for a, b, n in zip(table.pair_ref, table.pair_pred, table.pair_intersection)}
    ref_size = dict(zip(table.ref_ids.tolist(), table.ref_voxels.tolist()))
    pred_size = dict(zip(table.pred_ids.tolist(), table.pred_voxels.tolist()))
    ref_dice = np.full(len(table.ref_ids), np.nan)
    pred_dice = np.full(len(table.pred_ids), np.nan)
    for k, (rid, pid) in enumerate(zip(table.ref_ids.tolist(), match.ref_matched_id.tolist())):
        if pid:
            ref_dice[k] = 2 * inter[(rid, pid)] / (ref_size[rid] + pred_size[pid])
    for k, (pid, rid) in enumerate(zip(table.pred_ids.tolist(), match.pred_matched_id.tolist())):
        if rid:
            pred_dice[k] = 2 * inter[(rid, pid)] / (ref_size[rid] + pred_size[pid])
    return ref_dice, pred_dice


def _summary(
    table: _Table, match: InstanceMatch, scores: np.ndarray | None, criterion: str, ref_dice: np.ndarray
) -> dict[str, float | int | str | bool]:
    n_ref, n_pred = len(table.ref_ids), len(table.pred_ids)
    nan = math.nan
    tp = int(np.count_nonzero(match.ref_matched_id))
    fp = n_pred - int(np.count_nonzero(match.pred_matched_id))
    recall = tp / n_ref if n_ref else nan
    precision = (n_pred - fp) / n_pred if n_pred else nan
    if n_ref and n_pred:
        status = "ok"
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    elif n_ref:
        status, f1 = "pred_empty", 0.0
    elif n_pred:
        status, f1 = "ref_empty", 0.0
    else:
        status, f1 = "both_empty", nan
    matched_dice = ref_dice[~np.isnan(ref_dice)]

    pq_pairs = match.pair_iou > 0.5  # Kirillov et al.: unique by construction, whatever the criterion
    pq_tp = int(np.count_nonzero(pq_pairs))
    denominator = pq_tp + 0.5 * (n_pred - pq_tp) + 0.5 * (n_ref - pq_tp)
    if denominator == 0:
        pq = sq = rq = nan
    else:
        rq = pq_tp / denominator
        sq = float(match.pair_iou[pq_pairs].mean()) if pq_tp else nan
        pq = float(match.pair_iou[pq_pairs].sum()) / denominator

    ap50 = ap75 = nan
    if scores is not None:
        pred_index = np.searchsorted(table.pred_ids, table.pair_pred)
        ref_index = np.searchsorted(table.ref_ids, table.pair_ref)
        ap50, ap75 = (
            average_precision(
                scores=scores,
                pair_pred_index=pred_index,
                pair_ref_index=ref_index,
                pair_iou=match.pair_iou,
                n_ref=n_ref,
                iou_threshold=threshold,
            )
            for threshold in (0.5, 0.75)
        )
    return {
        "status": status,
        "criterion": criterion,
        "n_ref": n_ref,
        "n_pred": n_pred,
        "tp": tp,
        "fp": fp,
        "fn": n_ref - tp,
        "lesion_precision": precision,
        "lesion_recall": recall,
        "lesion_f1": f1,
        "lesion_dice": float(matched_dice.mean()) if matched_dice.size else nan,
        "pq": pq,
        "sq": sq,
        "rq": rq,
        "ap50": ap50,
        "ap75": ap75,
        "ap_scored": scores is not None,
    }


LESION_COLUMNS: tuple[str, ...] = (
    "source",
    "lesion_id",
    "n_voxels",
    "volume_ml",
    "centroid_vox",
    "best_iou",
    "matched",
    "matched_id",
    "dice",
    "score",
)


def _lesion_rows(
    table: _Table,
    match: InstanceMatch,
    scores: np.ndarray | None,
    voxel_ml: float,
    ref_dice: np.ndarray,
    pred_dice: np.ndarray,
) -> pd.DataFrame:
    no_scores = np.full(len(table.pred_ids), np.nan)
    rows = []
    for source, ids, sizes, centroids, best, partner, dice, score in (
        (
            "reference",
            table.ref_ids,
            table.ref_voxels,
            table.ref_centroids,
            match.ref_best_iou,
            match.ref_matched_id,
            ref_dice,
            np.full(len(table.ref_ids), np.nan),
        ),
        (
            "prediction",
            table.pred_ids,
            table.pred_voxels,
            table.pred_centroids,
            match.pred_best_iou,
            match.pred_matched_id,
            pred_dice,
            no_scores if scores is None else scores,
        ),
    ):
        for k, lesion_id in enumerate(ids.tolist()):
            rows.append(
                {
                    "source": source,
                    "lesion_id": lesion_id,
                    "n_voxels": int(sizes[k]),
                    "volume_ml": int(sizes[k]) * voxel_ml,
                    "centroid_vox": tuple(float(c) for c in centroids[k]),
                    "best_iou": float(best[k]),
                    "matched": bool(partner[k]),
                    "matched_id": int(partner[k]),
                    "dice": float(dice[k]),
                    "score": float(score[k]),
                }
            )
    import pandas as pd  # here: a semantic-only evaluation never builds a lesion table

    return pd.DataFrame(rows, columns=list(LESION_COLUMNS))
