"""Detection metrics over scored instances: COCO average precision, per case and pooled over cases.

* :func:`average_precision`: COCO (pycocotools) 101-point interpolated AP at one IoU threshold, for
  one set of scored predictions against one set of references.
* :func:`pooled_average_precision`: the dataset-level AP COCO reports: the detections of *all*
  cases are ranked together by score (each still matched only within its own case), so a case with
  few lesions weighs by its lesions, not as one case. The mean of per-case APs is a different
  number (each case equal); reports say which one they show.

Example:
    >>> case = {"scores": [0.9, 0.8], "pairs": [[1, 0, 0.9]], "n_ref": 1}
    >>> pooled_average_precision([case, case], iou_threshold=0.5)
    0.5
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["average_precision", "pooled_average_precision", "detections_record"]


def average_precision(
    *,
    scores: np.ndarray,
    pair_pred_index: np.ndarray,
    pair_ref_index: np.ndarray,
    pair_iou: np.ndarray,
    n_ref: int,
    iou_threshold: float,
) -> float:
    """COCO-style 101-point interpolated average precision at one IoU threshold.

    Predictions are taken in decreasing ``scores`` order (stable, as pycocotools); each is matched to the still
    unmatched reference with the highest IoU ``>= iou_threshold`` (a true positive) or else is a false positive.
    ``precision(k) = TP(k) / k`` is made non-increasing from the right and read at recall points
    ``0, 0.01, ..., 1`` (the first prediction whose recall reaches the point; 0 past the last); AP is their mean.
    Unitless in [0, 1]; NaN when ``n_ref == 0``; 0 with references but no predictions.

    Args:
        scores: Score of each prediction (index ``0..n_pred-1``).
        pair_pred_index: Prediction index of each overlapping pair.
        pair_ref_index: Reference index of each overlapping pair.
        pair_iou: IoU of each pair.
        n_ref: Number of reference instances.
        iou_threshold: IoU threshold (0.5 for AP50, 0.75 for AP75).

    Returns:
        The average precision.

    Example:
        >>> average_precision(scores=np.array([0.9, 0.8]), pair_pred_index=np.array([1]),
        ...                   pair_ref_index=np.array([0]), pair_iou=np.array([0.9]), n_ref=1, iou_threshold=0.5)
        0.5
    """
    if n_ref == 0:
        return math.nan
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return 0.0
    order = np.argsort(-scores, kind="mergesort")
    candidates: dict[int, list[tuple[float, int]]] = {}
    for pi, ri, v in zip(pair_pred_index.tolist(), pair_ref_index.tolist(), pair_iou.tolist()):
        if v >= iou_threshold:
            candidates.setdefault(pi, []).append((v, ri))
    taken: set[int] = set()
    hits = np.zeros(len(order), dtype=bool)
    for rank, pi in enumerate(order.tolist()):
        free = [(v, ri) for v, ri in candidates.get(pi, []) if ri not in taken]
        if free:
            taken.add(max(free, key=lambda c: (c[0], -c[1]))[1])
            hits[rank] = True
    tp = np.cumsum(hits)
    fp = np.cumsum(~hits)
    recall = tp / n_ref
    precision = np.maximum.accumulate((tp / (tp + fp))[::-1])[::-1]
    points = np.linspace(0.0, 1.0, 101)
    idx = np.searchsorted(recall, points, side="left")
    sampled = np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0)
    return float(sampled.mean())


def detections_record(
    *, scores: np.ndarray, pair_pred_index: np.ndarray, pair_ref_index: np.ndarray, pair_iou: np.ndarray, n_ref: int
) -> dict[str, object]:
    """One case's scored detections as plain JSON, the input of :func:`pooled_average_precision`.

    ``{"scores": [...], "pairs": [[pred_index, ref_index, iou], ...], "n_ref": n}``; only pairs with
    IoU >= 0.5 are kept (no AP threshold below 0.5 is reported).
    """
    keep = np.asarray(pair_iou) >= 0.5
    pairs = [
        [int(p), int(r), float(v)]
        for p, r, v in zip(
            np.asarray(pair_pred_index)[keep], np.asarray(pair_ref_index)[keep], np.asarray(pair_iou)[keep]
        )
    ]
    return {"scores": [float(s) for s in np.asarray(scores)], "pairs": pairs, "n_ref": int(n_ref)}


def pooled_average_precision(cases: Sequence[Mapping[str, object]], *, iou_threshold: float) -> float:
    """COCO's dataset-level AP: all cases' detections ranked together, matched within their own case.

    Args:
        cases: one :func:`detections_record` per case (``scores``, ``pairs``, ``n_ref``).
        iou_threshold: 0.5 for AP50, 0.75 for AP75 (>= 0.5).

    Returns:
        AP in [0, 1]; NaN when no case has a reference instance (COCO's -1).
    """
    if iou_threshold < 0.5:
        raise ValueError(f"pooled AP keeps pairs with IoU >= 0.5 only; got iou_threshold={iou_threshold}")
    scores: list[float] = []
    pred_index: list[int] = []
    ref_index: list[int] = []
    ious: list[float] = []
    n_ref = 0
    for case in cases:
        offset_pred, offset_ref = len(scores), n_ref
        case_scores = list(case["scores"])  # type: ignore[call-overload]
        scores += [float(s) for s in case_scores]
        for p, r, v in case["pairs"]:  # type: ignore[attr-defined]
            pred_index.append(int(p) + offset_pred)
            ref_index.append(int(r) + offset_ref)
            ious.append(float(v))
        n_ref += int(case["n_ref"])  # type: ignore[call-overload]
    return average_precision(
        scores=np.asarray(scores, dtype=np.float64),
        pair_pred_index=np.asarray(pred_index, dtype=np.int64),
        pair_ref_index=np.asarray(ref_index, dtype=np.int64),
        pair_iou=np.asarray(ious, dtype=np.float64),
        n_ref=n_ref,
        iou_threshold=iou_threshold,
    )
