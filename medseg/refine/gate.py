"""The quality gate: keep a refinement setting only where it was measured to help.

For one structure, every refinement setting has been applied to the same validation cases and
each case scored twice with medseg's own evaluation (:func:`medseg.evaluation.case.evaluate_pair`):
the U-Net's mask (*before*) and the refined one (*after*). :func:`paired_deltas` turns the two
scores into per-case differences; :func:`judge` applies the criteria to one setting and
:func:`decide` picks, among the settings that pass, the one with the largest mean Dice gain.

A setting passes only when, over the validation cases,

* the mean Dice rises (by more than ``GateCriteria.min_mean_dice_gain``),
* the mean HD95 does not rise (by more than ``GateCriteria.max_mean_hd95_rise_mm``), and
* at most ``GateCriteria.max_worse_fraction`` of the cases get worse (their Dice falls by more
  than ``GateCriteria.worse_dice_tolerance``).

Empty masks follow DESIGN.md section 6: a structure absent in both masks scores no Dice and no
distances (the case counts as unchanged), a missing or spurious structure scores Dice 0, and its
HD95 is the image diagonal (MetricsReloaded's worst case) so that deleting a structure can never
look like an improvement of the distances. The deltas come with a percentile bootstrap CI over
cases (resampled with a fixed seed), reported beside the decision; the mean, not the CI, decides.

Choosing the best of several settings on the same cases is optimistic; ``benchmarks/bench_refine.py``
measures the chosen settings on held-out cases.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["GateCriteria", "CaseScore", "paired_deltas", "bootstrap_ci", "judge", "decide"]


@dataclass(frozen=True)
class GateCriteria:
    """What a refinement setting must achieve on the validation cases to be kept.

    Attributes:
        max_worse_fraction: largest fraction of cases whose Dice may fall (0.2: one case in five).
        min_mean_dice_gain: the mean Dice must rise by more than this.
        max_mean_hd95_rise_mm: the mean HD95 may rise by at most this (mm).
        worse_dice_tolerance: a case counts as worse when its Dice falls by more than this.
        bootstrap: resamples of the bootstrap CI (0: no CI).
        confidence: level of the CI.
        seed: seed of the bootstrap resampling.
    """

    max_worse_fraction: float = 0.2
    min_mean_dice_gain: float = 0.0
    max_mean_hd95_rise_mm: float = 0.0
    worse_dice_tolerance: float = 0.0
    bootstrap: int = 2000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_worse_fraction <= 1.0:
            raise ValueError(f"max_worse_fraction must be in [0, 1], got {self.max_worse_fraction}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.bootstrap < 0:
            raise ValueError(f"bootstrap must be >= 0, got {self.bootstrap}")

    def to_json(self) -> dict[str, Any]:
        """Plain JSON of every field."""
        return asdict(self)


@dataclass(frozen=True)
class CaseScore:
    """One structure of one case, scored: the evaluation row's values the gate uses.

    Attributes:
        case_id: the case.
        status: the evaluation status (``ok``, ``both_empty``, ``ref_empty``, ``pred_empty``).
        dice: Dice (NaN when both masks are empty).
        hd95_mm: HD95 in mm (NaN unless ``status == "ok"``).
        nsd: NSD at the structure's tolerance (NaN unless ``status == "ok"``).
        diagonal_mm: the image diagonal in mm (the worst-case distance).
    """

    case_id: str
    status: str
    dice: float
    hd95_mm: float
    nsd: float
    diagonal_mm: float

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> CaseScore:
        """From a row of :func:`medseg.evaluation.case.evaluate_pair`."""
        return cls(
            case_id=str(row["case_id"]),
            status=str(row["status"]),
            dice=float(row["dice"]),
            hd95_mm=float(row["hd95_mm"]),
            nsd=float(row["nsd"]),
            diagonal_mm=float(row["image_diagonal_mm"]),
        )

    def worst_case_values(self) -> tuple[float, float, float]:
        """(dice, hd95_mm, nsd) with empty cases filled: both empty = perfect, one empty = worst."""
        if self.status == "both_empty":
            return 1.0, 0.0, 1.0
        if self.status in ("ref_empty", "pred_empty"):
            return 0.0, self.diagonal_mm, 0.0
        return self.dice, self.hd95_mm, self.nsd


def paired_deltas(before: Sequence[CaseScore], after: Sequence[CaseScore]) -> dict[str, np.ndarray]:
    """Per-case values before and after, and their differences (after - before), in case order.

    Returns:
        ``dice_before``, ``dice_after``, ``dice_delta``, and the same for ``hd95_mm`` and ``nsd``:
        float64 arrays with one entry per case (empty cases filled as :meth:`CaseScore.worst_case_values`).

    Raises:
        ValueError: the two lists do not hold the same cases in the same order.
    """
    if [s.case_id for s in before] != [s.case_id for s in after]:
        raise ValueError("before and after must score the same cases in the same order")
    values_before = np.array([s.worst_case_values() for s in before], dtype=np.float64).reshape(-1, 3)
    values_after = np.array([s.worst_case_values() for s in after], dtype=np.float64).reshape(-1, 3)
    result: dict[str, np.ndarray] = {}
    for column, name in enumerate(("dice", "hd95_mm", "nsd")):
        result[f"{name}_before"] = values_before[:, column]
        result[f"{name}_after"] = values_after[:, column]
        result[f"{name}_delta"] = values_after[:, column] - values_before[:, column]
    return result


def bootstrap_ci(values: np.ndarray, *, resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> list[float]:
    """Percentile bootstrap CI of the mean of ``values`` (cases resampled with replacement).

    Returns:
        ``[low, high]``; ``[nan, nan]`` without values or resamples.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0 or resamples <= 0:
        return [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    return [float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))]


def _mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def judge(deltas: Mapping[str, np.ndarray], criteria: GateCriteria) -> dict[str, Any]:
    """Apply the criteria to one setting's per-case deltas.

    Returns:
        ``passed`` (bool), ``reasons`` (why it failed, empty when it passed), the means before and
        after, the mean deltas with their bootstrap CIs, the number and fraction of worse cases.
    """
    dice_delta = deltas["dice_delta"]
    n_cases = int(dice_delta.size)
    worse = int(np.sum(dice_delta < -criteria.worse_dice_tolerance))
    summary: dict[str, Any] = {
        "n_cases": n_cases,
        "n_worse": worse,
        "worse_fraction": worse / n_cases if n_cases else 0.0,
    }
    for name in ("dice", "hd95_mm", "nsd"):
        summary[f"mean_{name}_before"] = _mean(deltas[f"{name}_before"])
        summary[f"mean_{name}_after"] = _mean(deltas[f"{name}_after"])
        summary[f"delta_{name}"] = {
            "mean": _mean(deltas[f"{name}_delta"]),
            f"ci{round(criteria.confidence * 100)}": bootstrap_ci(
                deltas[f"{name}_delta"],
                resamples=criteria.bootstrap,
                confidence=criteria.confidence,
                seed=criteria.seed,
            ),
        }
    reasons = []
    dice_gain = summary["delta_dice"]["mean"]
    hd95_rise = summary["delta_hd95_mm"]["mean"]
    if n_cases == 0:
        reasons.append("no validation cases")
    elif not dice_gain > criteria.min_mean_dice_gain:
        reasons.append(f"mean Dice did not rise ({dice_gain:+.4f}, needs > {criteria.min_mean_dice_gain:+.4f})")
    if n_cases and not hd95_rise <= criteria.max_mean_hd95_rise_mm:
        reasons.append(f"mean HD95 rose ({hd95_rise:+.3f} mm, allowed {criteria.max_mean_hd95_rise_mm:+.3f} mm)")
    if n_cases and summary["worse_fraction"] > criteria.max_worse_fraction:
        reasons.append(
            f"{worse}/{n_cases} cases got worse ({summary['worse_fraction']:.0%}, allowed {criteria.max_worse_fraction:.0%})"
        )
    return {"passed": not reasons, "reasons": reasons, **summary}


def decide(
    results: Mapping[str, Mapping[str, np.ndarray]],
    criteria: GateCriteria,
    *,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The gate's decision for one structure, from the per-case deltas of every setting tried.

    Args:
        results: setting name -> :func:`paired_deltas` of that setting.
        criteria: the acceptance criteria.
        settings: setting name -> its parameters (copied into the decision).

    Returns:
        ``{"decision": "accepted", "setting": name, "parameters": ..., <judge's summary>, "tried": [...]}``
        with the passing setting of the largest mean Dice gain, or ``{"decision": "rejected",
        "reason": ..., "best": <summary of the setting with the largest Dice gain>, "tried": [...]}``.
    """
    judged = {name: judge(deltas, criteria) for name, deltas in results.items()}
    tried = [
        {
            "setting": name,
            "passed": verdict["passed"],
            "delta_dice": verdict["delta_dice"]["mean"],
            "delta_hd95_mm": verdict["delta_hd95_mm"]["mean"],
            "delta_nsd": verdict["delta_nsd"]["mean"],
            "worse_fraction": verdict["worse_fraction"],
        }
        for name, verdict in judged.items()
    ]
    if not judged:
        return {"decision": "rejected", "reason": "no refinement setting was tried", "tried": []}

    def gain(name: str) -> float:
        value = judged[name]["delta_dice"]["mean"]
        return value if math.isfinite(value) else -math.inf

    passing = [name for name, verdict in judged.items() if verdict["passed"]]
    if passing:
        best = max(passing, key=gain)
        verdict = {k: v for k, v in judged[best].items() if k not in ("passed", "reasons")}
        return {
            "decision": "accepted",
            "setting": best,
            "parameters": dict((settings or {}).get(best, {})),
            **verdict,
            "tried": tried,
        }
    best = max(judged, key=gain)
    verdict = {k: v for k, v in judged[best].items() if k not in ("passed",)}
    return {
        "decision": "rejected",
        "reason": f"no setting passed the gate; the best ({best}): " + "; ".join(judged[best]["reasons"]),
        "best": {"setting": best, "parameters": dict((settings or {}).get(best, {})), **verdict},
        "tried": tried,
    }
