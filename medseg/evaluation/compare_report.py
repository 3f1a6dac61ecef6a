"""The outputs of a paired comparison (:mod:`medseg.evaluation.comparison`): files, JSON, lines, HTML.

* :func:`write_comparison`: ``comparison.csv``, ``pairs.csv``, ``comparison.json`` and
  ``report.html``, each written atomically.
* :func:`comparison_json`: the content of ``comparison.json``: the table, the unpaired rows, the
  structures of each side, the settings, the definition of every column (:data:`DEFINITIONS`)
  and the direction of every metric, the medseg and scipy versions.
* :func:`summary_lines`: the compact table the command line prints.
* :func:`write_comparison_report`: the self-contained ``report.html`` (PNGs embedded). Per
  metric, one figure per (up to) six structures: on top a paired-dot (slope) plot, each case a
  line from its value under A to its value under B, green where B is better, red where worse,
  grey for a tie, the means in black; below a Bland-Altman-style difference plot,
  ``d_i = B_i - A_i`` against ``(A_i + B_i) / 2``, with the mean difference and its bootstrap
  CI as a band.
"""

from __future__ import annotations

import html
import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from medseg import __version__
from medseg.evaluation.report import figure_png, table_html
from medseg.evaluation.summary import nan_to_none
from medseg.io.files import atomic_path, write_json, write_text

__all__ = ["DEFINITIONS", "comparison_json", "summary_lines", "write_comparison", "write_comparison_report"]

DEFINITIONS: dict[str, str] = {
    "direction": "higher: higher is better (dice, iou, precision, recall, nsd); lower: lower is better (hd_mm, "
    "hd95_mm, assd_mm); lower_abs: the absolute value is compared, lower is better (volume_diff_ml)",
    "n_a_only / n_b_only": "rows of this structure only in A / only in B: unpaired, listed, not used",
    "n_excluded": "pairs whose value is NaN in A or B (empty or failed cases under empty='exclude'), not used",
    "n": "pairs used: the case is in both and the value is a number in both",
    "mean_a / mean_b": "mean of A / of B over the n pairs (for lower_abs metrics: of the absolute values)",
    "mean_diff": "(1/n) sum d_i with d_i = B_i - A_i (positive: B higher)",
    "ci_low / ci_high": "percentile bootstrap CI (level 1 - alpha) of mean_diff: the n pairs resampled with "
    "replacement `bootstrap` times (seed `seed`), the alpha/2 and 1 - alpha/2 percentiles of the "
    "resampled means; NaN when n < 2",
    "median_diff": "median of d_i",
    "n_nonzero": "pairs with |d_i| > 1e-9: those the Wilcoxon test ranks",
    "wilcoxon_w": "scipy's two-sided statistic: min(R+, R-), the smaller sum of the ranks of |d_i| over the "
    "positive / negative differences",
    "p_value": "two-sided Wilcoxon signed-rank test of H0 'd is symmetric about 0', scipy.stats.wilcoxon(d, "
    "zero_method='wilcox', method='auto'): d rounded to 9 decimals, |d_i| <= 1e-9 is zero and zeros are dropped "
    "before ranking (Wilcox); exact for n <= 50 without ties or zeros, an exact permutation distribution for "
    "n <= 13 with ties or zeros, else the normal approximation (no continuity correction); 1.0 when every "
    "difference is zero, NaN when n = 0",
    "p_holm": "Holm's step-down correction across the structures of each metric: the m finite p-values sorted "
    "p_(1) <= ... <= p_(m), p~_(i) = min(1, max_{j<=i} (m - j + 1) p_(j))",
    "significant": "p_holm < alpha",
    "wins / ties / losses": "pairs where B is better than A / |d_i| <= 1e-9 / B is worse, by the direction",
    "pairs.csv": "one row per case x structure x metric in both evaluations: the compared values (absolute for "
    "lower_abs metrics), difference = value_b - value_a, outcome win / tie / loss for B, or excluded (NaN)",
    "empty": "exclude: NaN values (empty or failed cases) are excluded; worst: ref_empty, pred_empty, "
    "missing_prediction and error rows are scored Dice/IoU/NSD 0 and distances = the image diagonal "
    "(as medseg.evaluation.summary.summarize)",
}


_COLOURS = {"win": "#2a9d8f", "tie": "#8d99ae", "loss": "#e63946"}
_PER_FIGURE = 6


def _paired_figures(table: pd.DataFrame, pairs: pd.DataFrame, metric: str, names: tuple[str, str]) -> list[str]:
    """PNG data URLs: slope plots (top) and difference plots (bottom) of ``metric``, six structures a figure."""
    # a pyplot-free Figure: no backend switch, so a notebook's own plots keep showing after a report
    from matplotlib.figure import Figure

    rows = table[table["metric"] == metric]
    structures = [s for s in rows["structure"] if ((pairs["structure"] == s) & (pairs["metric"] == metric)).any()]
    images = []
    for start in range(0, len(structures), _PER_FIGURE):
        chunk = structures[start : start + _PER_FIGURE]
        figure = Figure(figsize=(3.1 * len(chunk) + 0.4, 5.8))
        axes = figure.subplots(2, len(chunk), squeeze=False)
        for column, structure in enumerate(chunk):
            stats = rows[rows["structure"] == structure].iloc[0]
            used = pairs[(pairs["structure"] == structure) & (pairs["metric"] == metric)]
            used = used[used["outcome"] != "excluded"]
            top, bottom = axes[0][column], axes[1][column]
            for outcome, colour in _COLOURS.items():
                part = used[used["outcome"] == outcome]
                if len(part):
                    top.plot([0, 1], [part["value_a"], part["value_b"]], color=colour, alpha=0.55, lw=1, marker="o", ms=3)  # fmt: skip
                    mean = (part["value_a"] + part["value_b"]) / 2
                    bottom.scatter(mean, part["value_b"] - part["value_a"], s=12, color=colour, label=outcome)
            top.plot([0, 1], [stats["mean_a"], stats["mean_b"]], color="black", lw=2.2, marker="s", ms=5)
            top.set_xticks([0, 1], [names[0], names[1]])
            top.set_xlim(-0.25, 1.25)
            better = "higher" if stats["direction"] == "higher" else "lower"
            absolute = "|" if stats["direction"] == "lower_abs" else ""
            top.set_title(f"{structure}: {absolute}{metric}{absolute} ({better} is better)", fontsize=9)
            top.grid(axis="y", alpha=0.3)
            bottom.axhline(0.0, color="grey", lw=0.8)
            if not math.isnan(stats["mean_diff"]):
                bottom.axhline(stats["mean_diff"], color="black", lw=1.2)
            if not (math.isnan(stats["ci_low"]) or math.isnan(stats["ci_high"])):
                bottom.axhspan(stats["ci_low"], stats["ci_high"], color="black", alpha=0.12, lw=0)
            bottom.set_xlabel("(A + B) / 2", fontsize=8)
            bottom.set_ylabel("B - A", fontsize=8)
            p = stats["p_holm"]
            bottom.set_title(
                f"n={int(stats['n'])}  W/T/L {int(stats['wins'])}/{int(stats['ties'])}/{int(stats['losses'])}"
                f"  p_Holm={'-' if math.isnan(p) else f'{p:.3g}'}",
                fontsize=8,
            )
            bottom.grid(alpha=0.3)
        figure.suptitle(f"{metric}: {names[1]} (B) against {names[0]} (A), paired by case", fontsize=10)
        figure.tight_layout()
        images.append(figure_png(figure))
    return images


def write_comparison_report(
    content: dict[str, Any], table: pd.DataFrame, pairs: pd.DataFrame, path: str | Path
) -> Path:
    """Write the comparison's self-contained HTML report.

    Args:
        content: the content of ``comparison.json`` (:meth:`~medseg.evaluation.comparison.Comparison.to_json`).
        table: the comparison table (one row per structure x metric).
        pairs: the paired per-case values.
        path: the ``report.html`` to write.

    Returns:
        The path written.
    """
    names = (content["names"]["a"], content["names"]["b"])
    settings = content["settings"]
    a, b = (html.escape(n) for n in names)
    sections = [
        f"<h1>medseg paired comparison: {b} (B) against {a} (A)</h1><p>{html.escape(content['created'])} · medseg "
        f"{html.escape(content['medseg_version'])} · A: {html.escape(str(content['sources']['a']))} · "
        f"B: {html.escape(str(content['sources']['b']))} · settings: {html.escape(json.dumps(settings))}</p>",
        "<h2>Paired statistics per structure and metric</h2><p>Differences are B - A over the cases scored in "
        f"both; mean_diff with its {settings['ci_level']:.0%} percentile-bootstrap CI ({settings['bootstrap']} "
        "resamples of the pairs, seed "
        f"{settings['seed']}); p_value: two-sided Wilcoxon signed-rank test (zero differences dropped, "
        "zero_method='wilcox'); p_holm: Holm-corrected across the structures of each metric; wins / ties / "
        "losses: cases where B is better / equal (|d| &le; 1e-9) / worse, by the metric's direction. "
        "volume_diff_ml is compared as its absolute value.</p>"
        + (table_html(table.set_index(["structure", "metric"])) if len(table) else "<p>no pairs</p>"),
    ]
    structures = content["structures"]
    unpaired = pd.DataFrame(content["unpaired"]["rows"], columns=["case_id", "structure", "only_in", "status"])
    notes = []
    for name, key in zip(names, ("only_in_a", "only_in_b")):
        if structures[key]:
            notes.append(f"<li>structures only in <b>{html.escape(name)}</b> (not compared): "
                         f"{html.escape(', '.join(structures[key]))}</li>")  # fmt: skip
        rows = unpaired[(unpaired["only_in"] == name) & unpaired["structure"].isin(structures["common"])]
        if len(rows):
            listed = ", ".join(f"{r.case_id}/{r.structure}" for r in rows.itertuples())
            notes.append(f"<li>{len(rows)} case x structure rows only in <b>{html.escape(name)}</b> (not used): "
                         f"{html.escape(listed)}</li>")  # fmt: skip
    sections.append(
        "<h2>Unpaired cases and structures</h2>"
        + (f"<ul>{''.join(notes)}</ul>" if notes else "<p>every case and structure is in both evaluations</p>")
    )
    images = []
    for metric in settings["metrics"]:
        images += [f'<img alt="{html.escape(metric)} paired plots" src="{src}">' for src in _paired_figures(table, pairs, metric, names)]  # fmt: skip
    if images:
        sections.append(
            "<h2>Paired plots</h2><p>Top: each case a line from A to B (green: B better, red: B worse, grey: tie; "
            "black: the means). Bottom: difference B - A against the mean of the two (Bland-Altman style); "
            "black line: mean difference, band: its bootstrap CI.</p>" + "<br>".join(images)
        )
    definitions = {k: v for k, v in content["definitions"].items() if k != "directions"}
    definitions["directions"] = ", ".join(f"{k}: {v}" for k, v in content["definitions"]["directions"].items())
    sections.append(
        "<h2>Definitions</h2><ul>"
        + "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>" for k, v in definitions.items())
        + "</ul>"
    )
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>medseg comparison</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table.t{border-collapse:collapse;font-size:13px}"
        "table.t td,table.t th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}"
        "img{margin:4px;border:1px solid #eee;max-width:100%}</style></head><body>"
        + "\n".join(sections)
        + "</body></html>"
    )
    return write_text(page, path)


def comparison_json(
    *,
    table: pd.DataFrame,
    unpaired: pd.DataFrame,
    structures: Mapping[str, list[str]],
    names: Sequence[str],
    sources: Sequence[str],
    settings: Mapping[str, Any],
    directions: Mapping[str, str],
) -> dict[str, Any]:
    """The content of ``comparison.json`` (NaN as null); see the module docstring."""
    import scipy

    only = unpaired["only_in"]
    content = {
        "medseg_version": __version__,
        "scipy_version": scipy.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "names": {"a": names[0], "b": names[1]},
        "sources": {"a": sources[0], "b": sources[1]},
        "settings": dict(settings),
        "structures": dict(structures),
        "unpaired": {
            "only_in_a": int((only == names[0]).sum()),
            "only_in_b": int((only == names[1]).sum()),
            "rows": unpaired.to_dict("records"),
        },
        "table": table.to_dict("records"),
        "definitions": {
            "difference": f"B - A = {names[1]} - {names[0]}",
            "directions": dict(directions),
            **DEFINITIONS,
        },
    }
    return nan_to_none(content)


def _signed(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:+.4g}"


def summary_lines(
    *,
    table: pd.DataFrame,
    unpaired: pd.DataFrame,
    structures: Mapping[str, list[str]],
    names: Sequence[str],
    ci_level: float,
    max_unpaired: int = 10,
) -> list[str]:
    """The command line's lines: a legend, the table (structure, metric, n, mean diff [CI], p Holm, W/T/L),
    then the structures and the case x structure rows found in only one evaluation."""
    a, b = names
    lines = [
        f"{b} (B) against {a} (A): mean difference B - A [{ci_level:.0%} bootstrap CI]; p: Wilcoxon signed-rank, "
        "Holm-corrected across structures; W/T/L: pairs where B is better/tied/worse"
    ]
    if len(table):
        rows = [
            {
                "structure": r.structure,
                "metric": r.metric,
                "n": int(r.n),
                "mean diff [CI]": f"{_signed(r.mean_diff)} [{_signed(r.ci_low)}, {_signed(r.ci_high)}]",
                "p Holm": "-" if math.isnan(r.p_holm) else f"{r.p_holm:.4g}",
                "W/T/L": f"{r.wins}/{r.ties}/{r.losses}",
            }
            for r in table.itertuples()
        ]
        lines.append(pd.DataFrame(rows).to_string(index=False))
    for name, key in ((a, "only_in_a"), (b, "only_in_b")):
        if structures[key]:
            lines.append(f"structures only in {name} (not compared): {', '.join(structures[key])}")
        rows = unpaired[(unpaired["only_in"] == name) & unpaired["structure"].isin(structures["common"])]
        if len(rows):
            shown = ", ".join(f"{r.case_id}/{r.structure}" for r in rows.head(max_unpaired).itertuples())
            more = f" and {len(rows) - max_unpaired} more" if len(rows) > max_unpaired else ""
            lines.append(f"unpaired: {len(rows)} case x structure rows only in {name} (not used): {shown}{more}")
    return lines


def write_comparison(
    table: pd.DataFrame,
    pairs: pd.DataFrame,
    content: Mapping[str, Any],
    out: str | os.PathLike[str],
    *,
    report: bool = True,
) -> dict[str, Path]:
    """Write ``comparison.csv``, ``pairs.csv``, ``comparison.json`` and (optionally) ``report.html``, atomically.

    Returns:
        Mapping of output name -> path written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, frame in (("comparison", table), ("pairs", pairs)):
        with atomic_path(out / f"{name}.csv") as temporary:
            frame.to_csv(temporary, index=False)
        written[name] = out / f"{name}.csv"
    written["json"] = write_json(content, out / "comparison.json")
    if report:
        written["report"] = write_comparison_report(dict(content), table, pairs, out / "report.html")
    return written
