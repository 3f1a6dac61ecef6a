"""Summaries of a per-case table: statistics per structure and metric, and lesion totals.

* :func:`summarize`: per structure and metric: ``n`` (rows), ``n_scored`` (non-NaN values),
  ``mean``, ``sd`` (ddof=1), ``median``, ``q25``, ``q75``, a 95 % percentile-bootstrap CI of the
  mean (2000 resamples, fixed seed) and the status counts. NaN values are excluded; with
  ``empty="worst"`` they are scored instead the MetricsReloaded way: Dice/IoU/NSD 0 and
  distances = the image diagonal (mm) for ``ref_empty``, ``pred_empty``, ``missing_prediction``
  and ``error`` rows (``both_empty`` stays excluded: there was nothing to find). A ranking that
  dropped failed cases would reward a method for failing. An ``error`` row carries the
  reference's diagonal when the reference could be read (the error came from the prediction or
  the probabilities); when even the reference is unreadable its Dice/IoU/NSD are still 0 but its
  distances stay NaN (no diagonal is known) and are excluded: ``n_scored`` of a distance tells.
* :func:`lesion_totals`: lesion counts pooled over cases per thing structure (TP/FP/FN, pooled
  precision/recall/F1), means of the per-case lesion metrics (``ap50_mean``: each case weighs
  equally) and, from the cases' detections records, COCO's dataset-level AP (``ap50_pooled``:
  every scored lesion of every case ranked together, so each lesion weighs equally and the false
  positives of a case without reference lesions count).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import pandas as pd

from medseg.metrics.detection import pooled_average_precision

__all__ = ["summarize", "worst_case_table", "lesion_totals", "nan_to_none", "DEFAULT_SUMMARY_METRICS", "STATUSES"]

DEFAULT_SUMMARY_METRICS = ("dice", "iou", "precision", "recall", "hd_mm", "hd95_mm", "assd_mm", "nsd", "volume_diff_ml")


_DISTANCES = ("hd_mm", "hd95_mm", "assd_mm")


STATUSES = ("ok", "both_empty", "ref_empty", "pred_empty", "missing_prediction", "error")


_BOOTSTRAP = 2000


def worst_case_table(per_case: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``per_case`` with failures scored as the worst case (MetricsReloaded).

    ``ref_empty``, ``pred_empty``, ``missing_prediction`` and ``error`` rows get Dice/IoU/NSD 0 and
    distances equal to the image diagonal (mm; NaN when the reference could not be read);
    ``both_empty`` rows stay NaN (there was nothing to find).
    """
    table = per_case.copy()
    scored_as_failure = table["status"].isin(["ref_empty", "pred_empty", "missing_prediction", "error"])
    for metric in ("dice", "iou", "nsd"):
        table.loc[scored_as_failure, metric] = 0.0
    for metric in _DISTANCES:
        table.loc[scored_as_failure, metric] = table.loc[scored_as_failure, "image_diagonal_mm"]
    return table


def _bootstrap_ci(values: np.ndarray, *, seed: int) -> tuple[float, float]:
    if len(values) < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(_BOOTSTRAP, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def summarize(
    per_case: pd.DataFrame | Any,
    *,
    metrics: Sequence[str] = DEFAULT_SUMMARY_METRICS,
    empty: Literal["exclude", "worst"] = "exclude",
    seed: int = 0,
) -> pd.DataFrame:
    """Summary statistics per structure and metric (see the module docstring).

    Args:
        per_case: the ``per_case`` table (or an Evaluation).
        metrics: the metric columns to summarise.
        empty: ``"exclude"`` NaN values (default) or score empty cases as the ``"worst"`` case.
        seed: bootstrap seed.

    Returns:
        DataFrame indexed by (structure, metric).
    """
    table = per_case if isinstance(per_case, pd.DataFrame) else per_case.per_case
    if empty not in ("exclude", "worst"):
        raise ValueError(f"empty must be 'exclude' or 'worst', got {empty!r}")
    if empty == "worst":
        table = worst_case_table(table)
    records = []
    for structure, group in table.groupby("structure", sort=False):
        counts = group["status"].value_counts()
        for metric in metrics:
            values = group[metric].to_numpy(dtype=float)
            values = values[~np.isnan(values)]
            low, high = _bootstrap_ci(values, seed=seed)
            records.append(
                {
                    "structure": structure,
                    "metric": metric,
                    "n": int(len(group)),
                    "n_scored": int(len(values)),
                    "mean": float(values.mean()) if len(values) else float("nan"),
                    "sd": float(values.std(ddof=1)) if len(values) > 1 else float("nan"),
                    "median": float(np.median(values)) if len(values) else float("nan"),
                    "q25": float(np.percentile(values, 25)) if len(values) else float("nan"),
                    "q75": float(np.percentile(values, 75)) if len(values) else float("nan"),
                    "ci95_low": low,
                    "ci95_high": high,
                    **{f"n_{s}": int(counts.get(s, 0)) for s in STATUSES},
                }
            )
    return pd.DataFrame(records).set_index(["structure", "metric"]) if records else pd.DataFrame()


def nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_to_none(v) for v in value]
    if isinstance(value, np.generic):
        return nan_to_none(value.item())
    return value


def lesion_totals(lesion_summary: pd.DataFrame, detections: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Lesion totals per thing structure (see the module docstring).

    Args:
        lesion_summary: the ``lesion_summary`` table (one row per case x thing structure).
        detections: the cases' detections records (``case_id``, ``structure``, ``scores``,
            ``pairs``, ``n_ref``), as :attr:`~medseg.evaluation.batch.Evaluation.detections`.

    Returns:
        Per structure: ``cases, tp, fp, fn``, ``lesion_{precision,recall,f1}_pooled`` (from the
        summed counts), ``<metric>_mean`` (mean over cases, NaN excluded) for ``lesion_f1,
        lesion_dice, pq, sq, rq, ap50, ap75``, and ``ap50_pooled`` / ``ap75_pooled`` (COCO's
        dataset-level AP over the ``ap_pooled_cases`` cases with scores; NaN without scores or
        without any reference lesion).
    """
    totals: dict[str, Any] = {}
    if lesion_summary.empty:
        return totals
    for structure, group in lesion_summary.groupby("structure", sort=False):
        tp, fp, fn = (int(group[k].sum()) for k in ("tp", "fp", "fn"))
        entry: dict[str, Any] = {
            "cases": int(len(group)),
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "lesion_precision_pooled": tp / (tp + fp) if tp + fp else float("nan"),
            "lesion_recall_pooled": tp / (tp + fn) if tp + fn else float("nan"),
            "lesion_f1_pooled": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan"),
        }
        for key in ("lesion_f1", "lesion_dice", "pq", "sq", "rq", "ap50", "ap75"):
            if key in group:
                values = group[key].to_numpy(dtype=float)
                values = values[~np.isnan(values)]
                entry[f"{key}_mean"] = float(values.mean()) if len(values) else float("nan")
        records = [d for d in detections if d["structure"] == structure]
        for threshold, key in ((0.5, "ap50_pooled"), (0.75, "ap75_pooled")):
            entry[key] = pooled_average_precision(records, iou_threshold=threshold) if records else float("nan")
        entry["ap_pooled_cases"] = len(records)
        totals[str(structure)] = entry
    return totals
