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
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

import numpy as np

from medseg.evaluation.table import rows_by, scored_values
from medseg.metrics.detection import pooled_average_precision

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "summarize",
    "summary_records",
    "summary_text",
    "status_counts",
    "worst_case_table",
    "lesion_totals",
    "nan_to_none",
    "DEFAULT_SUMMARY_METRICS",
    "STATUSES",
]

DEFAULT_SUMMARY_METRICS = ("dice", "iou", "precision", "recall", "hd_mm", "hd95_mm", "assd_mm", "nsd", "volume_diff_ml")


_DISTANCES = ("hd_mm", "hd95_mm", "assd_mm")


STATUSES = ("ok", "both_empty", "ref_empty", "pred_empty", "missing_prediction", "error")


_BOOTSTRAP = 2000


_FAILURES = ("ref_empty", "pred_empty", "missing_prediction", "error")


def worst_case_table(per_case: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``per_case`` with failures scored as the worst case (MetricsReloaded).

    ``ref_empty``, ``pred_empty``, ``missing_prediction`` and ``error`` rows get Dice/IoU/NSD 0 and
    distances equal to the image diagonal (mm; NaN when the reference could not be read);
    ``both_empty`` rows stay NaN (there was nothing to find).
    """
    table = per_case.copy()
    scored_as_failure = table["status"].isin(list(_FAILURES))
    for metric in ("dice", "iou", "nsd"):
        table.loc[scored_as_failure, metric] = 0.0
    for metric in _DISTANCES:
        table.loc[scored_as_failure, metric] = table.loc[scored_as_failure, "image_diagonal_mm"]
    return table


def _worst_case_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """One row as :func:`worst_case_table` scores it."""
    if row.get("status") not in _FAILURES:
        return dict(row)
    diagonal = row.get("image_diagonal_mm")
    return {**row, "dice": 0.0, "iou": 0.0, "nsd": 0.0, **{metric: diagonal for metric in _DISTANCES}}


def _bootstrap_ci(values: np.ndarray, *, seed: int) -> tuple[float, float]:
    if len(values) < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(_BOOTSTRAP, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def summary_records(
    rows: Sequence[Mapping[str, Any]],
    *,
    metrics: Sequence[str] = DEFAULT_SUMMARY_METRICS,
    empty: Literal["exclude", "worst"] = "exclude",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """:func:`summarize` on the per-case rows themselves: one record per structure and metric.

    Each record has ``structure``, ``metric`` and the columns :func:`summarize` returns; structures
    in order of first appearance. Needs no pandas (``medseg evaluate`` uses it).
    """
    if empty not in ("exclude", "worst"):
        raise ValueError(f"empty must be 'exclude' or 'worst', got {empty!r}")
    if empty == "worst":
        rows = [_worst_case_row(row) for row in rows]
    records = []
    for structure, group in rows_by(rows, "structure").items():
        counts = status_counts([row.get("status") for row in group])
        for metric in metrics:
            values = scored_values(group, metric)
            low, high = _bootstrap_ci(values, seed=seed)
            records.append(
                {
                    "structure": structure,
                    "metric": metric,
                    "n": len(group),
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
    return records


def status_counts(statuses: Sequence[Any]) -> dict[str, int]:
    """Count of each status, most frequent first (ties in order of first appearance), as ``value_counts``."""
    counts: dict[str, int] = {}
    for status in statuses:
        if status is not None:
            counts[str(status)] = counts.get(str(status), 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def summary_text(records: Sequence[Mapping[str, Any]], *, metrics: Sequence[str] = ("dice", "hd95_mm", "nsd")) -> str:
    """The terminal table of ``medseg evaluate``: per structure, the mean of each metric (4 decimals, NaN
    as ``NaN``) and ``n_scored`` (of the first metric)."""
    means: dict[str, dict[str, float]] = {}
    scored: dict[str, int] = {}
    for record in records:
        if record["metric"] in metrics:
            structure = str(record["structure"])
            means.setdefault(structure, {})[record["metric"]] = record["mean"]
            if record["metric"] == metrics[0]:
                scored[structure] = record["n_scored"]
    header = ["structure", *metrics, "n_scored"]
    lines = [
        [name, *(f"{means[name].get(m, float('nan')):.4f}" for m in metrics), str(scored.get(name, 0))]
        for name in means
    ]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in enumerate(zip(row, widths))
        )
        for row in [header, *lines]
    )


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
        DataFrame indexed by (structure, metric): :func:`summary_records` as a table.
    """
    import pandas as pd

    table = per_case if isinstance(per_case, pd.DataFrame) else per_case.per_case
    records = summary_records(table.to_dict("records"), metrics=metrics, empty=empty, seed=seed)
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
            ``pairs``, ``n_ref``), as :attr:`~medseg.evaluation.result.Evaluation.detections`.

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
