"""Writing an :class:`~medseg.evaluation.result.Evaluation`: tables, ``summary.json`` and ``report.html``.

* :func:`write_outputs`: ``per_case.csv``, ``cases.csv``, ``lesions.csv`` / ``lesion_summary.csv``
  (thing structures), ``per_rater.csv`` / ``inter_rater.csv`` (several raters), ``summary.json``
  and a self-contained ``report.html`` (plots and overlays embedded), every file atomic.
* :func:`summary_json`: summaries (:func:`medseg.evaluation.summary.summarize`), mIoU (dataset
  level and mean of cases), lesion totals (with AP both as the mean of per-case APs and pooled
  over all cases' lesions as COCO reports it), the settings, the definitions and the version.

Everything here works on the evaluation's rows (:class:`~medseg.evaluation.table.Table`); pandas is
imported only for the lesion and rater sections, when there are lesions or raters to show.
"""

from __future__ import annotations

import base64
import html
import io
import json
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from medseg import __version__
from medseg.evaluation.figures import box_plot_svg, overlay_png
from medseg.evaluation.result import TABLES, Evaluation
from medseg.evaluation.summary import STATUSES, lesion_totals, nan_to_none, status_counts, summary_records
from medseg.evaluation.table import rows_by, scored_values
from medseg.io.files import write_json, write_text
from medseg.io.volumes import read_volume
from medseg.metrics.surface_search import label_boxes

if TYPE_CHECKING:
    import pandas as pd

#: a summary as :func:`~medseg.evaluation.summary.summary_records` gives it
Records = Sequence[Mapping[str, Any]]

__all__ = ["summary_json", "write_outputs", "write_report", "figure_png", "table_html"]

_AP_MEAN = (
    "lesions: mean over cases of the per-case COCO AP at IoU >= {threshold} (101-point interpolation; "
    "each case weighs equally; cases without scores or without reference lesions excluded)"
)
_AP_POOLED = (
    "lesions: COCO's dataset-level AP at IoU >= {threshold}: the scored lesions of all cases ranked together "
    "by score, each matched only within its own case (each lesion weighs equally; false positives of "
    "cases without reference lesions count); over the ap_pooled_cases cases with scores"
)


def _summary(evaluation: Evaluation, summary: Records | None) -> Records:
    return summary_records(evaluation.tables["per_case"].rows) if summary is None else summary


def summary_json(evaluation: Evaluation, *, summary: Records | None = None) -> dict[str, Any]:
    """The content of ``summary.json``: summaries, mIoU, lesion totals, definitions, version.

    ``summary`` is ``summary_records(...)`` of the per-case rows when the caller already has it (its
    bootstrap is the costly part).
    """
    summary = _summary(evaluation, summary)
    structures: dict[str, Any] = {}
    for row in summary:
        entry = structures.setdefault(
            str(row["structure"]), {"status_counts": {s: int(row[f"n_{s}"]) for s in STATUSES}}
        )
        entry[row["metric"]] = {
            "n": int(row["n"]),
            "n_scored": int(row["n_scored"]),
            **{k: float(row[k]) for k in ("mean", "sd", "median", "q25", "q75", "ci95_low", "ci95_high")},
        }
    per_case, cases = evaluation.tables["per_case"], evaluation.tables["cases"]
    spacing_known = all(value is not False for value in per_case.column("spacing_known"))
    case_miou = scored_values(cases.rows, "miou")
    lesion_rows = evaluation.tables["lesion_summary"].rows
    content = {
        "medseg_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "num_cases": len(cases),
        "case_status_counts": status_counts(cases.column("status")),
        "failed_cases": [{"case_id": r["case_id"], "message": r["message"]} for r in evaluation.failed_rows],
        "structures": structures,
        "miou": {
            "dataset_level": evaluation.dataset_miou,
            "dataset_level_definition": "mean over foreground classes of TP/(TP+FP+FN) from the confusion matrix summed over all scored cases (semantic-segmentation benchmark convention); classes absent from every reference and prediction are excluded",
            "mean_of_case_miou": float(case_miou.mean()) if len(case_miou) else float("nan"),
            "case_miou_definition": "per case, mean IoU over single-label structures present in the reference or the prediction",
        },
        "lesions": lesion_totals(evaluation.lesion_summary, evaluation.detections) if lesion_rows else {},
        "settings": evaluation.settings.to_json(),
        "field_of_view_cases": sum(1 for path in cases.column("field_of_view") if path),
        "units": "mm"
        if spacing_known
        else "pixels (the files carry no physical spacing; distances are in pixel units)",
        "definitions": {
            "dice": "2|R∩P| / (|R|+|P|)",
            "iou": "|R∩P| / |R∪P|",
            "precision": "|R∩P| / |P|",
            "recall": "|R∩P| / |R|",
            "hd_mm": "max(max d(R->P), max d(P->R)) over boundary voxels, reference spacing",
            "hd95_mm": "max(P95 d(R->P), P95 d(P->R)) (MONAI's definition)",
            "assd_mm": "mean of d(R->P) ∪ d(P->R)",
            "nsd": "surface Dice at tolerance nsd_tolerance_mm (Nikolov et al.; DeepMind surface-distance)",
            "status": "ok | both_empty (NaN) | ref_empty (dice 0, distances NaN) | pred_empty (dice 0, distances NaN) | missing_prediction (NaN) | error (NaN, message; ref_ml and image_diagonal_mm filled when the reference was readable)",
            "ap50_mean": _AP_MEAN.format(threshold="0.5"),
            "ap50_pooled": _AP_POOLED.format(threshold="0.5"),
            "ap75_mean": _AP_MEAN.format(threshold="0.75"),
            "ap75_pooled": _AP_POOLED.format(threshold="0.75"),
            "field_of_view_cases": "cases scored only inside their field-of-view mask (manifest key fov_mask): outside it every label is background and every probability 0",
            "summaries": "NaN excluded; n_scored counts values used; 95% CI = percentile bootstrap of the mean, 2000 resamples, seed 0",
        },
    }
    return nan_to_none(content)


def write_outputs(
    evaluation: Evaluation, out: str | Path, *, report: bool = True, summary: Records | None = None
) -> dict[str, Path]:
    """Write every table, ``summary.json`` and (optionally) ``report.html`` into ``out``, atomically.

    ``summary`` is ``summary_records(...)`` of the per-case rows when the caller already has it.

    Returns:
        Mapping of output name -> path written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name in TABLES:
        table = evaluation.tables[name]
        if name in ("per_case", "cases") or len(table):
            written[name] = table.write_csv(out / f"{name}.csv")
    summary = _summary(evaluation, summary)  # once, for both
    content = summary_json(evaluation, summary=summary)
    write_json(content, out / "summary.json")
    written["summary"] = out / "summary.json"
    if report:
        written["report"] = write_report(evaluation, out / "report.html", summary=summary, content=content)
    return written


def figure_png(figure) -> str:
    """A matplotlib figure as an embeddable ``data:image/png;base64`` URI (the figure is closed)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _box_plots(per_case: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> list[tuple[str, str]]:
    """``(metric, SVG data URI)`` of each metric with values (see :func:`~medseg.evaluation.figures.box_plot_svg`)."""
    plots = []
    groups = rows_by(per_case, "structure")
    for metric in metrics:
        data = {structure: scored_values(rows, metric) for structure, rows in groups.items()}
        if not any(len(d) for d in data.values()):
            continue
        plots.append((metric, box_plot_svg(data, metric=metric)))
    return plots


def _overlay(
    reference_labels: np.ndarray,
    prediction_labels: np.ndarray,
    background: np.ndarray | None,
    label_ids: Sequence[int],
    title: str,
) -> tuple[str, str] | None:
    """``(PNG data URI, caption)``: the structure's contours on the (given, or largest) slice."""
    reference = np.isin(reference_labels, label_ids)
    prediction = np.isin(prediction_labels, label_ids)
    if reference.ndim == 3:
        area = reference.sum(axis=(0, 1)) + 0.5 * prediction.sum(axis=(0, 1))
        k = int(np.argmax(area))
        reference, prediction = reference[:, :, k], prediction[:, :, k]
        background = background[:, :, k] if background is not None and background.ndim == 3 else None
        title = f"{title} (slice k={k})"
    return overlay_png(reference, prediction, background), title


def _number(value: Any, digits: int) -> str:
    """A table cell: ``digits`` decimals (significant digits from 1000 on), NaN / None as a dash."""
    value = value.item() if isinstance(value, np.generic) else value
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1000 else f"{value:.{digits}f}"
    return str(value)


def rows_html(header: Sequence[str], rows: Sequence[Sequence[Any]], *, index_columns: int = 1, digits: int = 4) -> str:
    """A compact HTML table: the first ``index_columns`` cells of each row as row headers, numbers as in
    :func:`table_html`."""
    head = "".join(f"<th>{html.escape(str(name))}</th>" for name in header)
    body = "".join(
        "<tr>"
        + "".join(
            f"<th>{html.escape(str(cell))}</th>"
            if i < index_columns
            else f"<td>{html.escape(_number(cell, digits))}</td>"
            for i, cell in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f'<table class="t"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def table_html(frame: pd.DataFrame, *, digits: int = 4) -> str:
    """A DataFrame as a compact HTML table (``digits`` decimals, NaN as a dash)."""
    return frame.to_html(
        float_format=lambda v: _number(float(v), digits),
        na_rep="–",
        border=0,
        classes="t",
    )


def write_report(
    evaluation: Evaluation,
    path: str | Path,
    *,
    worst: int = 5,
    summary: Records | None = None,
    content: Mapping[str, Any] | None = None,
) -> Path:
    """Write a self-contained HTML report (summary table, box plots, worst-case overlays).

    ``summary`` is ``summary_records(...)`` of the per-case rows and ``content`` the matching
    :func:`summary_json` when the caller already has them.
    """
    path = Path(path)
    summary = _summary(evaluation, summary)
    content = summary_json(evaluation, summary=summary) if content is None else content
    per_case = evaluation.tables["per_case"].rows
    statistics = ("n_scored", "mean", "sd", "median", "q25", "q75", "ci95_low", "ci95_high")
    compact = rows_html(
        ("structure", "metric", *statistics),
        [(r["structure"], r["metric"], *(r[k] for k in statistics)) for r in summary],
        index_columns=2,
    )
    statuses = rows_html(
        ("structure", *STATUSES),
        [(r["structure"], *(r[f"n_{s}"] for s in STATUSES)) for r in summary if r["metric"] == "dice"],
    )
    sections = [
        f"<h1>medseg evaluation report</h1><p>{html.escape(content['created'])} · medseg "
        f"{html.escape(content['medseg_version'])} · {content['num_cases']} cases · "
        f"case status: {html.escape(json.dumps(content['case_status_counts']))} · units: {html.escape(content['units'])}</p>",
        "<h2>Summary per structure</h2>"
        "<p>NaN values (empty cases) are excluded from means; the status counts below say how many rows each "
        "structure has of each kind. CI: 95% percentile bootstrap of the mean. NSD tolerance: "
        + html.escape(", ".join(f"{k} {v:g} mm" for k, v in content["settings"]["nsd_tolerance_mm"].items()))
        + "."
        + (
            f" {content['field_of_view_cases']} cases are scored only inside their field-of-view mask."
            if content["field_of_view_cases"]
            else ""
        )
        + "</p>"
        + (compact if summary else "<p>no rows</p>"),
        "<h2>Status counts (rows per structure)</h2>" + (statuses if summary else ""),
        f"<h2>mIoU</h2><p>dataset-level (summed confusion matrix): <b>{_fmt(content['miou']['dataset_level'])}</b>; "
        f"mean of per-case mIoU: <b>{_fmt(content['miou']['mean_of_case_miou'])}</b></p>",
    ]
    if content["lesions"]:
        sections.append(
            "<h2>Lesion-wise (instance) metrics</h2><p><b>ap50_mean / ap75_mean</b>: mean of the per-case APs "
            "(each case weighs equally). <b>ap50_pooled / ap75_pooled</b>: COCO's dataset-level AP, the scored "
            "lesions of all cases ranked together (each lesion weighs equally; false positives of cases without "
            "reference lesions count). <b>*_pooled</b> lesion precision / recall / F1 come from the summed "
            "TP/FP/FN.</p>" + table_html(_frame(content["lesions"]).T)
        )
    if len(evaluation.tables["inter_rater"]):
        inter = evaluation.inter_rater.groupby(["rater_a", "rater_b", "structure"])[["dice", "hd95_mm", "nsd"]].mean()
        sections.append("<h2>Inter-rater agreement (human baseline)</h2>" + table_html(inter))
    if len(evaluation.tables["per_rater"]):
        per_rater = evaluation.per_rater.groupby(["rater", "structure"])[["dice", "hd95_mm", "nsd"]].mean()
        sections.append("<h2>Prediction against each rater and the consensus</h2>" + table_html(per_rater))
    plots = _box_plots(per_case, ["dice", "hd95_mm", "nsd"])
    if plots:
        sections.append(
            "<h2>Distributions</h2>" + "".join(f'<img alt="{html.escape(m)} box plot" src="{src}">' for m, src in plots)
        )
    sections.append(_worst_section(evaluation, worst))
    failed = evaluation.failed_rows
    if failed:
        sections.append(
            "<h2>Failed cases</h2><ul>"
            + "".join(
                f"<li><b>{html.escape(str(r['case_id']))}</b>: {html.escape(str(r['message']))}</li>" for r in failed
            )
            + "</ul>"
        )
    sections.append(
        "<h2>Definitions</h2><ul>"
        + "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>" for k, v in content["definitions"].items())
        + "</ul>"
    )
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>medseg evaluation</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table.t{border-collapse:collapse;font-size:13px}"
        "table.t td,table.t th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}"
        "img{margin:4px;border:1px solid #eee}</style></head><body>" + "\n".join(sections) + "</body></html>"
    )
    return write_text(page, path)


def _frame(content: Mapping[str, Any]) -> pd.DataFrame:
    """A DataFrame of a mapping (the lesion section: pandas is imported only when there are lesions)."""
    import pandas as pd

    return pd.DataFrame(content)


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.4f}"


def _largest_slice(
    reference: np.ndarray,
    prediction: np.ndarray,
    boxes: tuple[Mapping[int, tuple[slice, ...] | None], Mapping[int, tuple[slice, ...] | None]],
    label_ids: Sequence[int],
) -> int | None:
    """The slice ``k`` (last axis) where ``area(reference) + 0.5 area(prediction)`` of the labels is largest.

    Only a box holding the labels (:func:`~medseg.metrics.surface_search.label_boxes`) is searched, so the
    cost follows the structure, not the volume; the slices outside it have no area, so the answer is the
    same as over the whole volume.
    """
    found = [b for box in boxes for i in label_ids if (b := box.get(i)) is not None]
    if not found:
        return None
    union = tuple(slice(min(b[d].start for b in found), max(b[d].stop for b in found)) for d in range(3))
    area = np.isin(reference[union], label_ids).sum(axis=(0, 1)) + 0.5 * np.isin(prediction[union], label_ids).sum(
        axis=(0, 1)
    )
    return union[2].start + int(np.argmax(area))


def _dice_order(row: Mapping[str, Any]) -> tuple[bool, float]:
    """Sort key: lowest Dice first, NaN last."""
    dice = row.get("dice")
    missing = dice is None or np.isnan(dice)
    return missing, 0.0 if missing else float(dice)


def _worst_section(evaluation: Evaluation, worst: int) -> str:
    scorable = [r for r in evaluation.tables["per_case"] if r["status"] in ("ok", "pred_empty", "ref_empty")]
    rows = [SimpleNamespace(**row) for row in sorted(scorable, key=_dice_order)[:worst]]
    if not rows:
        return ""
    cases = {row["case_id"]: SimpleNamespace(**row) for row in evaluation.tables["cases"]}
    sources: dict[int, tuple[str, str] | None] = {}
    # the volumes of each case are read once, however many of its structures are among the worst
    for case_id in dict.fromkeys(row.case_id for row in rows):
        case = cases[case_id]
        if not isinstance(case.reference, str) or not isinstance(case.prediction, str):
            continue
        try:
            kept = evaluation.label_arrays  # what a serial run already read
            reference = kept.get(case.reference)
            if reference is None:
                reference = read_volume(case.reference, kind="label").array[0]
            prediction = kept.get(case.prediction)
            if prediction is None:
                prediction = read_volume(case.prediction, kind="label").array[0]
        except Exception:  # noqa: BLE001 - a broken overlay must not lose the report
            continue
        background = None
        image_path = getattr(case, "image", None)
        if isinstance(image_path, str) and image_path:
            try:
                background = read_volume(image_path).array[0]
            except Exception:  # noqa: BLE001 - an overlay without its image is still useful
                background = None
        boxes = None
        if reference.ndim == 3 and prediction.shape == reference.shape and reference.dtype.kind in "uib":
            wanted = {int(v) for row in rows if row.case_id == case_id for v in str(row.label).split("+")}
            boxes = (label_boxes(reference, sorted(wanted)), label_boxes(prediction, sorted(wanted)))
        for position, row in enumerate(rows):
            if row.case_id != case_id:
                continue
            label_ids = [int(v) for v in str(row.label).split("+")]
            title = f"{row.case_id} · {row.structure} · Dice {row.dice:.3f}"
            try:
                k = None
                if boxes is not None and prediction.dtype.kind in "uib":
                    k = _largest_slice(reference, prediction, boxes, label_ids)
                if k is None:  # 2D, or an unusual map: the overlay searches the whole volume
                    sources[position] = _overlay(reference, prediction, background, label_ids, title)
                    continue
                sources[position] = _overlay(
                    reference[:, :, k],
                    prediction[:, :, k],
                    background[:, :, k] if background is not None and background.ndim == 3 else None,
                    label_ids,
                    f"{title} (slice k={k})",
                )
            except Exception:  # noqa: BLE001 - a broken overlay must not lose the report
                sources[position] = None
        del reference, prediction, background
    images = [
        f'<figure style="display:inline-block;margin:4px"><img alt="overlay {html.escape(str(row.case_id))}" '
        f'src="{figure[0]}"><figcaption style="font-size:12px">{html.escape(figure[1])}</figcaption></figure>'
        for position, row in enumerate(rows)
        if (figure := sources.get(position))
    ]
    return (
        ("<h2>Worst cases</h2><p>Lowest Dice; reference contour green, prediction red.</p>" + "".join(images))
        if images
        else ""
    )
