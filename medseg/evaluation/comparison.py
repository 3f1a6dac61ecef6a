"""Paired comparison of two evaluations of the same cases: method B against method A.

:func:`compare` pairs the rows of two ``per_case`` tables (evaluation folders written by
``medseg evaluate --out``, :class:`~medseg.evaluation.result.Evaluation` objects or DataFrames) by
``case_id`` and ``structure``. Rows present in only one evaluation are listed in
:attr:`Comparison.unpaired` and counted (``n_a_only``, ``n_b_only``), never used in a statistic;
structures present in only one are listed in :attr:`Comparison.structures`. For each structure
and metric, over the n pairs whose value is a number in both (a NaN in either, an empty case under
``empty="exclude"``, is counted in ``n_excluded``), with ``d_i = B_i - A_i``:

* ``mean_a``, ``mean_b``, ``mean_diff = (1/n) sum d_i``, ``median_diff``;
* ``ci_low, ci_high``: percentile bootstrap of ``mean_diff`` (resampling the n pairs with
  replacement ``bootstrap`` times, fixed ``seed``): the ``alpha/2`` and ``1 - alpha/2``
  percentiles of the resampled means;
* ``p_value``: two-sided Wilcoxon signed-rank test (``scipy.stats.wilcoxon``,
  ``zero_method="wilcox"``: zero differences are dropped before ranking; ``method="auto"``).
  Differences are rounded to 9 decimals first and ``|d_i| <= 1e-9`` counts as zero, so float
  noise of the subtraction neither breaks ties nor makes zeros non-zero. 1.0 when every difference
  is zero, NaN without pairs;
* ``p_holm``: Holm's step-down correction across the structures of each metric: with the m
  finite p-values sorted, ``p~_(i) = min(1, max_{j <= i} (m - j + 1) p_(j))``;
* ``wins, ties, losses``: pairs where B is better than A, ``|d_i| <= 1e-9``, or worse, by the
  metric's direction (:data:`METRIC_DIRECTIONS`). ``volume_diff_ml`` is compared as its absolute
  value (lower is better) everywhere: means, differences, test.

``empty="worst"`` scores empty and failed cases as :func:`~medseg.evaluation.summary.summarize`
does (Dice/IoU/NSD 0, distances = the image diagonal) before pairing.

Example:
    >>> result = compare("eval_unet/", "eval_nnunet/", names=("U-Net", "nnU-Net"))  # doctest: +SKIP
    >>> result.table[["structure", "metric", "mean_diff", "p_holm"]]                  # doctest: +SKIP
    >>> result.write("comparison/")                                                   # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import pandas as pd

from medseg.errors import MedsegUserError
from medseg.evaluation.compare_report import comparison_json, summary_lines, write_comparison
from medseg.evaluation.summary import worst_case_table

__all__ = [
    "METRIC_DIRECTIONS",
    "DEFAULT_COMPARE_METRICS",
    "Comparison",
    "compare",
    "holm",
    "paired_statistics",
    "default_names",
]

#: how each metric is ranked: "higher" / "lower" is better; "lower_abs": the absolute value, lower is better
METRIC_DIRECTIONS: dict[str, str] = {
    "dice": "higher",
    "iou": "higher",
    "precision": "higher",
    "recall": "higher",
    "nsd": "higher",
    "hd_mm": "lower",
    "hd95_mm": "lower",
    "assd_mm": "lower",
    "volume_diff_ml": "lower_abs",
}

DEFAULT_COMPARE_METRICS = ("dice", "hd95_mm", "nsd")

#: |d| <= this is a tie (and a zero difference for the Wilcoxon test)
TIE_TOLERANCE = 1e-9

TABLE_COLUMNS = [
    "structure", "metric", "direction", "n_a_only", "n_b_only", "n_excluded", "n", "mean_a", "mean_b",
    "mean_diff", "ci_low", "ci_high", "median_diff", "n_nonzero", "wilcoxon_w", "p_value", "p_holm",
    "significant", "wins", "ties", "losses",
]  # fmt: skip

PAIR_COLUMNS = ["case_id", "structure", "metric", "status_a", "status_b", "value_a", "value_b", "difference", "outcome"]


@dataclass
class Comparison:
    """A paired comparison of method B against method A (see the module docstring).

    Attributes:
        table: one row per structure x metric (:data:`TABLE_COLUMNS`).
        pairs: the paired per-case values (:data:`PAIR_COLUMNS`).
        unpaired: rows in only one evaluation: ``case_id, structure, only_in, status``.
        structures: ``common``, ``only_in_a``, ``only_in_b`` structure names.
        names: the names of A and B.
        sources: where A and B came from (folder, ``DataFrame`` or ``Evaluation``).
        settings: the options used.
    """

    table: pd.DataFrame
    pairs: pd.DataFrame
    unpaired: pd.DataFrame
    structures: dict[str, list[str]]
    names: tuple[str, str]
    sources: tuple[str, str]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The content of ``comparison.json`` (NaN as null)."""
        directions = {m: METRIC_DIRECTIONS[m] for m in self.settings.get("metrics", METRIC_DIRECTIONS)}
        return comparison_json(
            table=self.table,
            unpaired=self.unpaired,
            structures=self.structures,
            names=self.names,
            sources=self.sources,
            settings=self.settings,
            directions=directions,
        )

    def summary_lines(self, *, max_unpaired: int = 10) -> list[str]:
        """The lines the command line prints: the compact table, then what is in only one evaluation."""
        return summary_lines(
            table=self.table,
            unpaired=self.unpaired,
            structures=self.structures,
            names=self.names,
            ci_level=float(self.settings.get("ci_level", 0.95)),
            max_unpaired=max_unpaired,
        )

    def write(self, out: str | os.PathLike[str], *, report: bool = True) -> dict[str, Path]:
        """Write ``comparison.csv``, ``pairs.csv``, ``comparison.json`` and ``report.html`` into ``out``, atomically.

        Returns:
            Mapping of output name -> path written.

        Raises:
            MedsegUserError: ``out`` is one of the evaluation folders (its report.html would be replaced).
        """
        target = Path(out).resolve()
        for source in self.sources:
            folder = Path(source) if source not in ("DataFrame", "Evaluation") else None
            if folder is not None and (folder if folder.is_dir() else folder.parent).resolve() == target:
                raise MedsegUserError(f"{out}: is the evaluation folder {source}; write the comparison elsewhere")
        return write_comparison(self.table, self.pairs, self.to_json(), out, report=report)

    def _repr_html_(self) -> str:  # notebooks
        return self.table.to_html(index=False, float_format=lambda v: f"{v:.4g}")


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (NaN entries stay NaN and are not counted in m).

    With the m finite p-values sorted ``p_(1) <= ... <= p_(m)``:
    ``p~_(i) = min(1, max_{j <= i} (m - j + 1) p_(j))``. Example: ``[0.01, 0.04, 0.03]`` ->
    ``[0.03, 0.06, 0.06]``.
    """
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    finite = np.flatnonzero(~np.isnan(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, (len(order) - rank) * p[index])
        adjusted[index] = min(1.0, running)
    return adjusted


def _bootstrap_ci(d: np.ndarray, *, resamples: int, seed: int, alpha: float) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(d), resampling the pairs (in blocks of <= 4M indices)."""
    if len(d) < 2 or resamples < 1:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    block = max(1, 4_000_000 // len(d))
    for start in range(0, resamples, block):
        count = min(block, resamples - start)
        means[start : start + count] = d[rng.integers(0, len(d), size=(count, len(d)))].mean(axis=1)
    low, high = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def paired_statistics(
    a: np.ndarray, b: np.ndarray, *, direction: str, bootstrap: int = 2000, seed: int = 0, alpha: float = 0.05
) -> dict[str, Any]:
    """Statistics of the pairs ``(a_i, b_i)`` (no NaN), differences ``d_i = b_i - a_i`` (module docstring).

    Args:
        a: values of method A (already absolute for ``lower_abs`` metrics).
        b: values of method B, paired with ``a``.
        direction: ``"higher"`` or ``"lower"``/``"lower_abs"`` is better.
        bootstrap: bootstrap resamples of the CI (0: no CI).
        seed: bootstrap seed.
        alpha: the CI level is ``1 - alpha``.

    Returns:
        ``n, mean_a, mean_b, mean_diff, ci_low, ci_high, median_diff, n_nonzero, wilcoxon_w,
        p_value, wins, ties, losses``.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = b - a
    tested = np.round(d, 9)
    tested[np.abs(tested) <= TIE_TOLERANCE] = 0.0
    nonzero = int(np.count_nonzero(tested))
    w, p = float("nan"), float("nan")
    if nonzero:
        from scipy.stats import wilcoxon

        result = wilcoxon(tested, zero_method="wilcox", alternative="two-sided", method="auto")
        w, p = float(result.statistic), float(result.pvalue)
    elif len(d):
        w, p = 0.0, 1.0  # every difference is a tie: no evidence of any difference
    better = tested > 0 if direction == "higher" else tested < 0
    low, high = _bootstrap_ci(d, resamples=bootstrap, seed=seed, alpha=alpha)
    empty = not len(d)
    return {
        "n": int(len(d)),
        "mean_a": float("nan") if empty else float(a.mean()),
        "mean_b": float("nan") if empty else float(b.mean()),
        "mean_diff": float("nan") if empty else float(d.mean()),
        "ci_low": low,
        "ci_high": high,
        "median_diff": float("nan") if empty else float(np.median(d)),
        "n_nonzero": nonzero,
        "wilcoxon_w": w,
        "p_value": p,
        "wins": int(np.count_nonzero(better)),
        "ties": int(len(d) - nonzero),
        "losses": int(nonzero - np.count_nonzero(better)),
    }


def _read_per_case(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise MedsegUserError(f"{path}: not a readable per_case table ({str(error).strip().splitlines()[0]})") from None
    for column in [c for c in table.columns if c in METRIC_DIRECTIONS or c == "image_diagonal_mm"]:
        text = table[column].str.strip()
        blank = text.str.lower().isin(["", "nan", "na", "n/a", "none", "null"])
        values = pd.to_numeric(text.where(~blank, "nan"), errors="coerce")
        bad = values.isna() & ~blank
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise MedsegUserError(
                f"{path}: line {row + 2}, column {column}: {table[column].iloc[row]!r} is not a number"
            )
        table[column] = values.astype(float)
    return table


def _load(source: Any) -> tuple[pd.DataFrame, str]:
    """A per_case table and where it came from: a folder (or its per_case.csv), an Evaluation, a DataFrame."""
    if isinstance(source, pd.DataFrame):
        return source.copy(), "DataFrame"
    if isinstance(getattr(source, "per_case", None), pd.DataFrame):
        return source.per_case.copy(), "Evaluation"
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"compare() takes evaluation folders, Evaluations or DataFrames, not {type(source).__name__}")
    path = Path(source)
    if path.is_dir():
        if not (path / "per_case.csv").is_file():
            raise MedsegUserError(f"{path}: no per_case.csv in this folder (write one with `medseg evaluate --out`)")
        return _read_per_case(path / "per_case.csv"), str(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return _read_per_case(path), str(path)
    if path.exists():
        raise MedsegUserError(f"{path}: not an evaluation folder (nor a per_case.csv)")
    raise MedsegUserError(f"{path}: evaluation folder not found")


def _prepare(table: pd.DataFrame, *, where: str, metrics: Sequence[str], empty: str) -> pd.DataFrame:
    """Check the columns and the uniqueness of case x structure; apply ``empty``; keep the needed columns."""
    needed = ["case_id", "structure", *metrics] + (["status", "image_diagonal_mm"] if empty == "worst" else [])
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise MedsegUserError(f"{where}: the per_case table has no column {', '.join(missing)}")
    table = table.copy()
    table["case_id"], table["structure"] = table["case_id"].astype(str), table["structure"].astype(str)
    if "status" not in table.columns:
        table["status"] = ""
    for column in [*metrics, *(["image_diagonal_mm"] if empty == "worst" else [])]:
        try:
            table[column] = table[column].astype(float)
        except (TypeError, ValueError):
            raise MedsegUserError(f"{where}: column {column} holds values that are not numbers") from None
    duplicated = table.duplicated(["case_id", "structure"])
    if duplicated.any():
        first = table[duplicated].iloc[0]
        raise MedsegUserError(
            f"{where}: {int(duplicated.sum())} duplicate case x structure rows (e.g. {first.case_id}/{first.structure})"
        )
    if empty == "worst":
        table = worst_case_table(table)
    return table[["case_id", "structure", "status", *metrics]].reset_index(drop=True)


def _check_options(
    metrics: Sequence[str], names: Sequence[str], bootstrap: int, seed: int, alpha: float, empty: str
) -> None:
    unknown = [m for m in metrics if m not in METRIC_DIRECTIONS]
    if not metrics or unknown:
        raise MedsegUserError(f"metrics: unknown {unknown or 'none given'}; choose from {', '.join(METRIC_DIRECTIONS)}")
    if len(set(metrics)) != len(metrics):
        raise MedsegUserError(f"metrics: each metric once, got {list(metrics)}")
    if len(names) != 2 or not all(isinstance(n, str) and n.strip() for n in names) or names[0] == names[1]:
        raise MedsegUserError(f"names: two different non-empty names for A and B, got {list(names)!r}")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, (int, np.integer)) or bootstrap < 0:
        raise MedsegUserError(f"bootstrap: a number of resamples >= 0, got {bootstrap!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise MedsegUserError(f"seed: an integer >= 0, got {seed!r}")
    if not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise MedsegUserError(f"alpha: between 0 and 1 (exclusive), got {alpha!r}")
    if empty not in ("exclude", "worst"):
        raise MedsegUserError(f"empty: 'exclude' or 'worst', got {empty!r}")


def default_names(a: Any, b: Any) -> tuple[str, str]:
    """Names for two sources: the folder names (of a per_case.csv: its folder's), else "A" and "B".

    When both folder names are equal, the parent folder is prefixed (``run1/eval``, ``run2/eval``).
    """

    def folder(source: Any) -> Path | None:
        if not isinstance(source, (str, os.PathLike)):
            return None
        path = Path(source).absolute()
        return path.parent if path.suffix.lower() == ".csv" else path

    fa, fb = folder(a), folder(b)
    if fa is None or fb is None:
        return "A", "B"
    if fa.name != fb.name:
        return fa.name, fb.name
    pa, pb = f"{fa.parent.name}/{fa.name}", f"{fb.parent.name}/{fb.name}"
    return (pa, pb) if pa != pb else ("A", "B")


def compare(
    a: str | os.PathLike[str] | pd.DataFrame | Any,
    b: str | os.PathLike[str] | pd.DataFrame | Any,
    *,
    metrics: Sequence[str] = DEFAULT_COMPARE_METRICS,
    names: Sequence[str] = ("A", "B"),
    bootstrap: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    empty: Literal["exclude", "worst"] = "exclude",
) -> Comparison:
    """Compare method B against method A case by case (see the module docstring for every formula).

    Args:
        a: evaluation of A: a folder holding ``per_case.csv`` (or the file), an Evaluation or a per_case DataFrame.
        b: evaluation of B, of the same cases.
        metrics: the metric columns to compare (keys of :data:`METRIC_DIRECTIONS`).
        names: the names of A and B in the outputs.
        bootstrap: bootstrap resamples of the CI of the mean difference (0: no CI).
        seed: bootstrap seed (the same resampling for every structure and metric of equal n).
        alpha: 1 - the CI level; ``significant`` is ``p_holm < alpha``.
        empty: ``"exclude"`` NaN values, or score empty and failed cases as the ``"worst"`` case.

    Returns:
        The :class:`Comparison`; :meth:`Comparison.write` writes its files.

    Raises:
        MedsegUserError: an invalid option (named); a missing folder or one without per_case.csv,
            a table without a needed column or with duplicate rows (named); no case x structure in both.
    """
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    names = (names,) if isinstance(names, str) else tuple(names)
    _check_options(metrics, names, bootstrap, seed, alpha, empty)
    (raw_a, source_a), (raw_b, source_b) = _load(a), _load(b)
    where_a = source_a if source_a not in ("DataFrame", "Evaluation") else f"{names[0]} ({source_a})"
    where_b = source_b if source_b not in ("DataFrame", "Evaluation") else f"{names[1]} ({source_b})"
    table_a = _prepare(raw_a, where=where_a, metrics=metrics, empty=empty)
    table_b = _prepare(raw_b, where=where_b, metrics=metrics, empty=empty)
    paired = table_a.merge(table_b, on=["case_id", "structure"], how="inner", suffixes=("_a", "_b"))
    if paired.empty:
        raise MedsegUserError(
            f"{where_a} and {where_b}: no case x structure in common ({len(table_a)} and {len(table_b)} rows; "
            "are they evaluations of the same cases?)"
        )
    structures_a, structures_b = list(dict.fromkeys(table_a["structure"])), list(dict.fromkeys(table_b["structure"]))
    structures = {
        "common": [s for s in structures_a if s in set(structures_b)],
        "only_in_a": [s for s in structures_a if s not in set(structures_b)],
        "only_in_b": [s for s in structures_b if s not in set(structures_a)],
    }
    keys_a = pd.MultiIndex.from_frame(table_a[["case_id", "structure"]])
    keys_b = pd.MultiIndex.from_frame(table_b[["case_id", "structure"]])
    unpaired = pd.concat(
        [
            table_a.loc[~keys_a.isin(keys_b), ["case_id", "structure", "status"]].assign(only_in=names[0]),
            table_b.loc[~keys_b.isin(keys_a), ["case_id", "structure", "status"]].assign(only_in=names[1]),
        ],
        ignore_index=True,
    )[["case_id", "structure", "only_in", "status"]]
    records, pair_frames = [], []
    for structure in structures["common"]:
        group = paired[paired["structure"] == structure]
        for metric in metrics:
            direction = METRIC_DIRECTIONS[metric]
            va, vb = group[f"{metric}_a"].to_numpy(dtype=float), group[f"{metric}_b"].to_numpy(dtype=float)
            if direction == "lower_abs":
                va, vb = np.abs(va), np.abs(vb)
            used = ~(np.isnan(va) | np.isnan(vb))
            stats = paired_statistics(va[used], vb[used], direction=direction, bootstrap=bootstrap, seed=seed, alpha=alpha)  # fmt: skip
            only = unpaired[unpaired["structure"] == structure]["only_in"]
            records.append(
                {
                    "structure": structure,
                    "metric": metric,
                    "direction": direction,
                    "n_a_only": int((only == names[0]).sum()),
                    "n_b_only": int((only == names[1]).sum()),
                    "n_excluded": int((~used).sum()),
                    **stats,
                }
            )
            difference = vb - va
            rounded = np.round(difference, 9)
            better = rounded > TIE_TOLERANCE if direction == "higher" else rounded < -TIE_TOLERANCE
            outcome = np.where(np.abs(rounded) <= TIE_TOLERANCE, "tie", np.where(better, "win", "loss"))
            pair_frames.append(
                pd.DataFrame(
                    {
                        "case_id": group["case_id"].to_numpy(),
                        "structure": structure,
                        "metric": metric,
                        "status_a": group["status_a"].to_numpy(),
                        "status_b": group["status_b"].to_numpy(),
                        "value_a": va,
                        "value_b": vb,
                        "difference": difference,
                        "outcome": np.where(used, outcome, "excluded"),
                    }
                )
            )
    table = pd.DataFrame(records)
    table["p_holm"] = np.nan
    for metric in metrics:
        rows = table["metric"] == metric
        table.loc[rows, "p_holm"] = holm(table.loc[rows, "p_value"].to_numpy(dtype=float))
    table["significant"] = table["p_holm"] < alpha
    settings = {
        "metrics": list(metrics),
        "bootstrap": int(bootstrap),
        "seed": int(seed),
        "alpha": float(alpha),
        "ci_level": 1 - float(alpha),
        "empty": empty,
        "tie_tolerance": TIE_TOLERANCE,
        "test": "Wilcoxon signed-rank, two-sided, scipy.stats.wilcoxon(zero_method='wilcox', method='auto')",
        "multiple_comparisons": "Holm across the structures of each metric",
    }
    return Comparison(
        table=table[TABLE_COLUMNS],
        pairs=pd.concat(pair_frames, ignore_index=True) if pair_frames else pd.DataFrame(columns=PAIR_COLUMNS),
        unpaired=unpaired,
        structures=structures,
        names=(names[0], names[1]),
        sources=(source_a, source_b),
        settings=settings,
    )
