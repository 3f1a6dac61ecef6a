"""Overlap metrics from voxel counts: confusion matrix, Dice, IoU, precision, recall, volumes, mIoU.

Definitions (DESIGN.md section 6), ``R`` = reference mask, ``P`` = predicted mask of one structure,
``TP = |R & P|``, ``FP = |P & ~R|``, ``FN = |R & ~P|``:

* ``dice = 2 TP / (2 TP + FP + FN)``, ``iou = TP / (TP + FP + FN)`` (Jaccard),
  ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)`` (sensitivity), all unitless in [0, 1].
* ``ref_ml = (TP + FN) * v``, ``pred_ml = (TP + FP) * v``, ``volume_diff_ml = pred_ml - ref_ml`` in millilitres,
  ``v`` = voxel volume in ml (``prod(spacing_mm) / 1000``).

Empty cases never become magic numbers; every result carries a ``status``:

=============  ==================  ===========  ============  =========
status         meaning             dice / iou   precision     recall
=============  ==================  ===========  ============  =========
``ok``         both non-empty      value        value         value
``both_empty`` absent in both      NaN          NaN           NaN
``ref_empty``  false positive      0            0             NaN
``pred_empty`` missed structure    0            NaN           0
=============  ==================  ===========  ============  =========

Precision and recall follow their own denominators: with an empty reference every predicted voxel is a false
positive, so precision ``0 / |P| = 0`` is well defined while recall ``0 / 0`` is not (NaN); symmetrically for an
empty prediction. Sources: Dice 1945, Jaccard 1912; MONAI ``compute_dice`` / ``compute_iou``; Maier-Hein et al.,
"Metrics reloaded", Nat. Methods 2024, for the explicit empty-case handling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from medseg.core.components import as_binary_mask

__all__ = [
    "OVERLAP_KEYS",
    "confusion_matrix",
    "overlap_from_counts",
    "overlap_from_confusion",
    "overlap_metrics",
    "iou_per_class",
    "miou_from_confusion",
    "dice_per_structure",
]

OVERLAP_KEYS: tuple[str, ...] = ("status", "dice", "iou", "precision", "recall", "ref_ml", "pred_ml", "volume_diff_ml")

_CHUNK_VOXELS = 1 << 19  # bounded temporaries: ~0.5M voxels per chunk, cache-friendly


def _check_labels(array: np.ndarray, name: str, num_classes: int) -> None:
    if array.dtype == bool:
        if num_classes < 2 and array.any():
            raise ValueError(f"{name} contains label 1 but num_classes={num_classes}")
        return
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer labels, got dtype {array.dtype}; cast it first")
    if array.size == 0:
        return
    low = int(array.min()) if np.issubdtype(array.dtype, np.signedinteger) else 0
    high = int(array.max())
    if low < 0 or high >= num_classes:
        offending = np.unique(array[(array < 0) | (array >= num_classes)])
        shown = offending[:10].tolist()
        more = f" (and {offending.size - 10} more)" if offending.size > 10 else ""
        raise ValueError(f"{name} has labels {shown}{more} outside 0..{num_classes - 1} (num_classes={num_classes})")


def fortran_ordered(array: np.ndarray) -> bool:
    """True for a Fortran-contiguous array that is not also C-contiguous (e.g. a NIfTI label map)."""
    return bool(array.flags.f_contiguous and not array.flags.c_contiguous)


def confusion_matrix(reference: np.ndarray, prediction: np.ndarray, *, num_classes: int) -> np.ndarray:
    """Voxel confusion matrix of two label maps in one pass.

    ``cm[i, j]`` = number of voxels with reference label ``i`` and predicted label ``j``. Rows are reference
    labels, columns predicted labels; ``cm.sum() == reference.size``. Per structure ``k``: ``TP = cm[k, k]``,
    ``FN = cm[k, :].sum() - TP``, ``FP = cm[:, k].sum() - TP``.

    The volume is processed in chunks of about 0.5M voxels; in each chunk only voxels that are foreground in either
    map are histogrammed (``np.bincount`` of ``ref * num_classes + pred``) and background-background agreement
    is counted by subtraction, so memory stays bounded and the mostly-background volumes of medical imaging are
    fast.

    Args:
        reference: Reference label map, integer or boolean, any shape.
        prediction: Predicted label map, same shape.
        num_classes: Number of classes ``K``; every label must be in ``0..K-1``.

    Returns:
        int64 array of shape ``(K, K)``.

    Raises:
        ValueError: on different shapes, non-integer dtypes or labels outside ``0..K-1`` (the values are named).

    Example:
        >>> confusion_matrix(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), num_classes=3).tolist()
        [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    """
    reference = np.asarray(reference)
    prediction = np.asarray(prediction)
    if reference.shape != prediction.shape:
        raise ValueError(f"reference shape {reference.shape} != prediction shape {prediction.shape}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    k = int(num_classes)
    _check_labels(reference, "reference", k)
    _check_labels(prediction, "prediction", k)
    counts = np.zeros(k * k, dtype=np.int64)
    if reference.size == 0:
        return counts.reshape(k, k)
    if reference.ndim == 0:
        reference, prediction = reference.reshape(1), prediction.reshape(1)
    ref_u = reference.view(np.uint8) if reference.dtype == bool else reference
    pred_u = prediction.view(np.uint8) if prediction.dtype == bool else prediction
    if fortran_ordered(ref_u) and fortran_ordered(pred_u):  # counts ignore voxel order: walk memory in order
        ref_u, pred_u = ref_u.T, pred_u.T
    per_row = max(1, int(np.prod(ref_u.shape[1:], dtype=np.int64)))
    rows = max(1, _CHUNK_VOXELS // per_row)
    either = np.empty(rows * per_row, dtype=bool)  # reused: nonzero() is fastest on booleans
    background = 0
    for start in range(0, ref_u.shape[0], rows):
        r = ref_u[start : start + rows].reshape(-1)
        p = pred_u[start : start + rows].reshape(-1)
        foreground = np.flatnonzero(np.logical_or(r, p, out=either[: r.size]))
        if foreground.size == 0:
            background += r.size
            continue
        if foreground.size > r.size // 2:  # dense foreground: histogram everything
            counts += np.bincount(r.astype(np.intp) * k + p, minlength=k * k)
        else:
            counts += np.bincount(r[foreground].astype(np.intp) * k + p[foreground], minlength=k * k)
            background += r.size - foreground.size
    counts[0] += background
    return counts.reshape(k, k)


def overlap_from_counts(*, tp: int, fp: int, fn: int, voxel_volume_ml: float) -> dict[str, float | str]:
    """Dice, IoU, precision, recall and volumes of one structure from its voxel counts.

    Formulas, units and the empty-case table are in the module docstring.

    Args:
        tp: ``|R & P|`` in voxels.
        fp: ``|P & ~R|`` in voxels.
        fn: ``|R & ~P|`` in voxels.
        voxel_volume_ml: Volume of one voxel in ml (``prod(spacing_mm) / 1000``).

    Returns:
        Dict with keys ``status, dice, iou, precision, recall, ref_ml, pred_ml, volume_diff_ml``.

    Example:
        >>> out = overlap_from_counts(tp=3, fp=1, fn=2, voxel_volume_ml=0.001)
        >>> out["status"], out["dice"], round(out["volume_diff_ml"], 6)
        ('ok', 0.6666666666666666, -0.001)
    """
    values = {"tp": tp, "fp": fp, "fn": fn}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer count, got {value!r}")
    v = float(voxel_volume_ml)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"voxel_volume_ml must be finite and > 0, got {voxel_volume_ml!r}")
    tp, fp, fn = int(tp), int(fp), int(fn)
    n_ref, n_pred = tp + fn, tp + fp
    nan = math.nan
    if n_ref and n_pred:
        status, dice = "ok", 2 * tp / (2 * tp + fp + fn)
        iou, precision, recall = tp / (tp + fp + fn), tp / n_pred, tp / n_ref
    elif n_ref:
        status, dice, iou, precision, recall = "pred_empty", 0.0, 0.0, nan, 0.0
    elif n_pred:
        status, dice, iou, precision, recall = "ref_empty", 0.0, 0.0, 0.0, nan
    else:
        status, dice, iou, precision, recall = "both_empty", nan, nan, nan, nan
    ref_ml, pred_ml = n_ref * v, n_pred * v
    return {
        "status": status,
        "dice": dice,
        "iou": iou,
        "precision": precision,
        "recall": recall,
        "ref_ml": ref_ml,
        "pred_ml": pred_ml,
        "volume_diff_ml": pred_ml - ref_ml,
    }


def _voxel_volume_ml(spacing_mm: Sequence[float], ndim: int) -> float:
    spacing = np.atleast_1d(np.asarray(spacing_mm, dtype=np.float64))
    if spacing.ndim != 1 or spacing.size != ndim:
        raise ValueError(f"spacing_mm={tuple(spacing.tolist())} needs {ndim} values, one per axis")
    if not np.all(np.isfinite(spacing) & (spacing > 0)):
        raise ValueError(f"spacing_mm={tuple(spacing.tolist())} must be finite and > 0")
    return float(np.prod(spacing)) / 1000.0


def overlap_from_confusion(cm: np.ndarray, *, label: int, spacing_mm: Sequence[float]) -> dict[str, float | str]:
    """:func:`overlap_from_counts` for structure ``label`` of a confusion matrix.

    Args:
        cm: ``(K, K)`` confusion matrix (rows reference, columns prediction) from :func:`confusion_matrix`.
        label: Structure label ``0 <= label < K``.
        spacing_mm: Voxel spacing of the reference, one value per spatial axis (2 or 3).

    Returns:
        Same dict as :func:`overlap_from_counts`.

    Example:
        >>> cm = confusion_matrix(np.array([[0, 1], [1, 1]]), np.array([[1, 1], [0, 1]]), num_classes=2)
        >>> overlap_from_confusion(cm, label=1, spacing_mm=(1.0, 1.0))["dice"]
        0.6666666666666666
    """
    cm = _check_cm(cm)
    if not 0 <= int(label) < cm.shape[0]:
        raise ValueError(f"label {label} is outside 0..{cm.shape[0] - 1} of the confusion matrix")
    spacing = np.atleast_1d(np.asarray(spacing_mm, dtype=np.float64))
    tp = int(cm[label, label])
    return overlap_from_counts(
        tp=tp,
        fp=int(cm[:, label].sum()) - tp,
        fn=int(cm[label, :].sum()) - tp,
        voxel_volume_ml=_voxel_volume_ml(spacing, spacing.size),
    )


def overlap_metrics(
    reference_mask: np.ndarray, prediction_mask: np.ndarray, *, spacing_mm: Sequence[float]
) -> dict[str, float | str]:
    """Dice, IoU, precision, recall and volumes of two binary masks (see the module docstring).

    Args:
        reference_mask: Reference ``R``, boolean (or 0/1) array, 2D or 3D.
        prediction_mask: Prediction ``P``, same shape.
        spacing_mm: Voxel spacing of the reference, one value per axis.

    Returns:
        Same dict as :func:`overlap_from_counts`.

    Example:
        >>> r = np.zeros((4, 4), bool); r[:2] = True
        >>> overlap_metrics(r, r, spacing_mm=(1.0, 1.0))["iou"]
        1.0
    """
    ref = as_binary_mask(reference_mask, "reference_mask")
    pred = as_binary_mask(prediction_mask, "prediction_mask")
    if ref.shape != pred.shape:
        raise ValueError(f"reference_mask shape {ref.shape} != prediction_mask shape {pred.shape}")
    volume = _voxel_volume_ml(spacing_mm, ref.ndim)
    tp = int(np.count_nonzero(ref & pred))
    return overlap_from_counts(
        tp=tp, fp=int(np.count_nonzero(pred)) - tp, fn=int(np.count_nonzero(ref)) - tp, voxel_volume_ml=volume
    )


def _check_cm(cm: np.ndarray) -> np.ndarray:
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        raise ValueError(f"confusion matrix must be square (K, K), got shape {cm.shape}")
    if np.any(cm < 0):
        raise ValueError("confusion matrix has negative counts")
    return cm


def iou_per_class(cm: np.ndarray, *, labels: Sequence[int] | None = None) -> dict[int, float]:
    """IoU of every class from a (possibly summed over cases) confusion matrix.

    ``iou_k = cm[k, k] / (sum_j cm[k, j] + sum_i cm[i, k] - cm[k, k])``; NaN when class ``k`` is absent from both
    reference and prediction (``0 / 0``).

    Args:
        cm: ``(K, K)`` confusion matrix, rows reference, columns prediction.
        labels: Classes to report; default all foreground classes ``1..K-1``.

    Returns:
        ``{label: iou}``.

    Example:
        >>> iou_per_class(np.array([[5, 1, 0], [1, 2, 0], [0, 0, 0]]))
        {1: 0.5, 2: nan}
    """
    cm = _check_cm(cm)
    k = cm.shape[0]
    chosen = list(range(1, k)) if labels is None else [int(lab) for lab in labels]
    bad = [lab for lab in chosen if not 0 <= lab < k]
    if bad:
        raise ValueError(f"labels {bad} are outside 0..{k - 1} of the confusion matrix")
    out: dict[int, float] = {}
    for lab in chosen:
        tp = float(cm[lab, lab])
        union = float(cm[lab, :].sum()) + float(cm[:, lab].sum()) - tp
        out[lab] = tp / union if union > 0 else math.nan
    return out


def miou_from_confusion(cm: np.ndarray, *, labels: Sequence[int] | None = None) -> float:
    """Dataset-level mean IoU from an accumulated confusion matrix (semantic-segmentation convention).

    ``mIoU = mean_k iou_k`` over ``labels`` (default: foreground classes ``1..K-1``), with ``iou_k`` from the
    confusion matrix summed over all cases (:func:`iou_per_class`); classes absent from both reference and
    prediction in the whole matrix are excluded. This is *not* the mean over cases of per-case IoU. Unitless; NaN
    when every chosen class is absent. Source: the PASCAL VOC / Cityscapes definition.

    Args:
        cm: ``(K, K)`` confusion matrix, rows reference, columns prediction.
        labels: Classes to average; default ``1..K-1``.

    Returns:
        The mean IoU.

    Example:
        >>> miou_from_confusion(np.array([[5, 1, 0], [1, 2, 0], [0, 0, 0]]))
        0.5
    """
    values = [v for v in iou_per_class(cm, labels=labels).values() if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def dice_per_structure(
    reference: np.ndarray, prediction: np.ndarray, *, structures: Sequence[tuple[str, Sequence[int]]]
) -> dict[str, float]:
    """Dice ``2 TP / (2 TP + FP + FN)`` of each structure (a set of label ids) of two label maps.

    One :func:`confusion_matrix` pass; a structure's TP is the sum of the confusion block of its
    ids, so regions (several ids scored as one) cost nothing more. NaN when the structure is absent
    from both maps (status ``both_empty``), 0 when from one.

    Args:
        reference: reference label map (label ids >= 0).
        prediction: predicted label map, same shape.
        structures: ``(name, label_ids)`` pairs.

    Example:
        >>> r = np.array([0, 1, 1, 2]); p = np.array([0, 1, 2, 2])
        >>> dice_per_structure(r, p, structures=[("a", (1,)), ("ab", (1, 2))])
        {'a': 0.6666666666666666, 'ab': 1.0}
    """
    reference = np.asarray(reference)
    prediction = np.asarray(prediction)
    num_classes = (
        int(max(reference.max(initial=0), prediction.max(initial=0), *(max(ids) for _, ids in structures))) + 1
    )
    cm = confusion_matrix(reference, prediction, num_classes=num_classes)
    result = {}
    for name, ids in structures:
        members = [int(i) for i in ids]
        tp = int(cm[np.ix_(members, members)].sum())
        denominator = int(cm[members, :].sum()) + int(cm[:, members].sum())
        result[name] = float("nan") if denominator == 0 else 2.0 * tp / denominator
    return result
