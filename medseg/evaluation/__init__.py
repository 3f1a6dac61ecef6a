"""Evaluation: references + predictions -> tidy tables (case x structure) -> summaries -> reports.

``evaluation`` owns the batch evaluation: pairing references with predictions by case id
(:mod:`~medseg.evaluation.pairing`), scoring one pair with every metric
(:mod:`~medseg.evaluation.case`), running the cases on worker processes with a per-case cache
(:mod:`~medseg.evaluation.batch`, :mod:`~medseg.evaluation.cache`; on a Dask cluster:
:mod:`~medseg.evaluation.dask_runner`), several raters and their
consensus (:mod:`~medseg.evaluation.raters`), matched lesion volumes and Bland–Altman limits
(:mod:`~medseg.evaluation.agreement`), paired comparison of two methods
(:mod:`~medseg.evaluation.compare`), summaries with bootstrap CIs
(:mod:`~medseg.evaluation.summary`) and the written tables, ``summary.json`` and ``report.html``
(:mod:`~medseg.evaluation.report`, its pictures without matplotlib: :mod:`~medseg.evaluation.figures`).
It builds on metrics, data, io and core, never on torch.
"""

from __future__ import annotations

from medseg.evaluation.agreement import bland_altman, matched_lesion_volumes
from medseg.evaluation.batch import Evaluation, evaluate
from medseg.evaluation.case import PER_CASE_COLUMNS, EvaluationSettings, PairResult, evaluate_pair
from medseg.evaluation.compare import Comparison, compare
from medseg.evaluation.raters import StapleEstimate, majority_vote, staple, staple_probability
from medseg.evaluation.report import summary_json, write_outputs, write_report
from medseg.evaluation.summary import summarize

__all__ = [
    "PER_CASE_COLUMNS",
    "Comparison",
    "Evaluation",
    "EvaluationSettings",
    "PairResult",
    "StapleEstimate",
    "bland_altman",
    "compare",
    "evaluate",
    "evaluate_pair",
    "matched_lesion_volumes",
    "majority_vote",
    "staple",
    "staple_probability",
    "summarize",
    "summary_json",
    "write_outputs",
    "write_report",
]
