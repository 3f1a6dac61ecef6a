"""Evaluation: references + predictions -> tidy tables (case x structure) -> summaries -> reports.

``evaluation`` owns the batch evaluation: pairing references with predictions by case id
(:mod:`~medseg.evaluation.pairing`), scoring one pair with every metric
(:mod:`~medseg.evaluation.case`), running the cases on worker processes with a per-case cache
(:mod:`~medseg.evaluation.batch`, :mod:`~medseg.evaluation.cache`; on a Dask cluster:
:mod:`~medseg.evaluation.dask_runner`), several raters and their
consensus (:mod:`~medseg.evaluation.raters`), matched lesion volumes and Bland–Altman limits
(:mod:`~medseg.evaluation.agreement`), paired comparison of two methods
(:mod:`~medseg.evaluation.comparison`), summaries with bootstrap CIs
(:mod:`~medseg.evaluation.summary`) and the written tables, ``summary.json`` and ``report.html``
(:mod:`~medseg.evaluation.report`, its pictures without matplotlib: :mod:`~medseg.evaluation.figures`).
Tables are rows (:mod:`~medseg.evaluation.table`), DataFrames on request. It builds on metrics, data,
io and core, never on torch. Names load on first use (PEP 562), so ``medseg evaluate`` imports only
what it runs: neither pandas nor scipy.ndimage.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the module that defines it
_LAZY: dict[str, str] = {
    "bland_altman": "medseg.evaluation.agreement",
    "matched_lesion_volumes": "medseg.evaluation.agreement",
    "Evaluation": "medseg.evaluation.result",
    "evaluate": "medseg.evaluation.batch",
    "PER_CASE_COLUMNS": "medseg.evaluation.case",
    "EvaluationSettings": "medseg.evaluation.case",
    "PairResult": "medseg.evaluation.case",
    "evaluate_pair": "medseg.evaluation.case",
    "Comparison": "medseg.evaluation.comparison",
    "compare": "medseg.evaluation.comparison",
    "StapleEstimate": "medseg.evaluation.raters",
    "majority_vote": "medseg.evaluation.raters",
    "staple": "medseg.evaluation.raters",
    "staple_probability": "medseg.evaluation.raters",
    "summary_json": "medseg.evaluation.report",
    "write_outputs": "medseg.evaluation.report",
    "write_report": "medseg.evaluation.report",
    "summarize": "medseg.evaluation.summary",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'medseg.evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
