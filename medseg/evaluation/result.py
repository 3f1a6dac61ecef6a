"""The result of a batch evaluation: its tables (rows, pandas on request) and the summed confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.evaluation.case import EXTRA_COLUMNS, PER_CASE_COLUMNS, EvaluationSettings
from medseg.evaluation.summary import summarize
from medseg.evaluation.table import Table
from medseg.metrics.overlap import miou_from_confusion

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["CASE_COLUMNS", "TABLES", "Evaluation", "assemble"]

#: the tables of an :class:`Evaluation`, in the order they are written
TABLES = ("per_case", "cases", "lesions", "lesion_summary", "per_rater", "inter_rater")

CASE_COLUMNS = ("case_id", "status", "reference", "prediction", "image", "field_of_view", "miou", "message")


class _TableFrame:
    """``evaluation.<name>``: the table of that name as a DataFrame (built on first use)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, evaluation: Evaluation | None, owner: type | None = None) -> pd.DataFrame:
        if evaluation is None:
            raise AttributeError(f"{self.name} is a table of an Evaluation instance")
        return evaluation.tables[self.name].frame()


@dataclass
class Evaluation:
    """The result of a batch evaluation: its tables and the accumulated confusion matrix.

    Each table is a pandas DataFrame when read as an attribute (``evaluation.per_case``), built on
    first use; ``tables`` holds the same rows as :class:`~medseg.evaluation.table.Table` objects,
    which ``medseg evaluate`` writes and summarises without importing pandas.

    Attributes:
        per_case: one row per case x structure (:data:`PER_CASE_COLUMNS` + extras).
        cases: one row per case: files (with the field-of-view mask scored inside), per-case mIoU,
            status, error message.
        lesions: one row per lesion of thing structures (empty when none).
        lesion_summary: one row per case x thing structure: TP/FP/FN, F1, PQ, AP...
        per_rater: prediction against every rater and against the STAPLE / majority consensus.
        inter_rater: each pair of raters (the human baseline).
        tables: the six tables above by name (:data:`TABLES`), as rows.
        confusion: summed confusion matrix over all scored cases (dataset-level mIoU).
        settings: the settings used.
        detections: per case x thing structure with scores, the detections record of the pooled
            (COCO dataset-level) AP; see :class:`~medseg.evaluation.case.PairResult`.
        cases_per_worker: cases scored by each Dask worker in this call (empty without Dask).
        label_arrays: label arrays a serial run read, by file path, kept (up to
            :data:`~medseg.evaluation.batch.KEPT_LABEL_BYTES`, most recent first) so the report's worst-case overlays need
            not read those files again; not part of the results.
    """

    tables: dict[str, Table]
    confusion: np.ndarray
    settings: EvaluationSettings
    detections: list[dict[str, Any]] = field(default_factory=list)
    cases_per_worker: dict[str, int] = field(default_factory=dict)
    label_arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    per_case = _TableFrame()
    cases = _TableFrame()
    lesions = _TableFrame()
    lesion_summary = _TableFrame()
    per_rater = _TableFrame()
    inter_rater = _TableFrame()

    @property
    def dataset_miou(self) -> float:
        """Dataset-level mIoU: IoU per foreground class from the summed confusion matrix, averaged."""
        foreground = [i for i, label_id in enumerate(self.settings.labels.ids) if label_id != 0]
        return float(miou_from_confusion(self.confusion, labels=foreground))

    @property
    def failed_rows(self) -> list[dict[str, Any]]:
        """Rows of the cases that could not be scored (``case_id``, ``message``...), without pandas."""
        return [row for row in self.tables["cases"] if row["status"] == "error"]

    @property
    def failed(self) -> pd.DataFrame:
        """Cases that could not be scored, with their error messages."""
        return self.cases[self.cases["status"] == "error"]

    def _repr_html_(self) -> str:  # notebooks
        return summarize(self.per_case).to_html(float_format=lambda v: f"{v:.4f}")


def assemble(results: list[dict[str, Any]], settings: EvaluationSettings, unpaired: list[str]) -> Evaluation:
    """The :class:`Evaluation` of scored cases (the per-case results of the batch engine, in order) and the
    predictions without a reference."""
    rows = [row for r in results for row in r["rows"]]
    num_classes = len(settings.labels.ids)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    case_rows = []
    for result in results:
        if result["confusion"] is not None:
            confusion += np.asarray(result["confusion"], dtype=np.int64)
        case_rows.append(
            {
                "case_id": result["case_id"],
                "status": result["status"],
                "reference": result["reference"],
                "prediction": result["prediction"],
                "image": result.get("image"),
                "field_of_view": result.get("field_of_view"),
                "miou": _case_miou(result["rows"], settings),
                "message": result["message"],
            }
        )
    for case_id in unpaired:
        case_rows.append(
            {
                "case_id": case_id,
                "status": "no_reference",
                "reference": None,
                "prediction": None,
                "image": None,
                "field_of_view": None,
                "miou": np.nan,
                "message": "prediction without a reference",
            }
        )
    tables = {
        "per_case": Table(rows, columns=tuple(PER_CASE_COLUMNS + EXTRA_COLUMNS)),
        "cases": Table(case_rows, columns=CASE_COLUMNS),
        **{name: Table([row for r in results for row in r[name]]) for name in TABLES[2:]},
    }
    return Evaluation(
        tables=tables,
        confusion=confusion,
        settings=settings,
        detections=[record for r in results for record in r.get("detections", [])],
    )


def _case_miou(rows: list[dict[str, Any]], settings: EvaluationSettings) -> float:
    """Mean IoU over the single-label structures of a case that are present in either mask."""
    regions = set(settings.labels.regions)
    values = [
        r["iou"] for r in rows if r["structure"] not in regions and r["status"] in ("ok", "ref_empty", "pred_empty")
    ]
    return float(np.mean(values)) if values else float("nan")
