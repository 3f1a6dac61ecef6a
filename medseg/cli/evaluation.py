"""Commands that score predictions: ``evaluate`` and ``compare``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from medseg.cli.app import EXIT_PROBLEMS_FOUND, app


@app.command()
def evaluate(
    reference: Path = typer.Option(..., "--reference", help="Folder of reference labels, or a manifest."),
    prediction: Path = typer.Option(..., "--prediction", help="Folder of predicted labels named <case_id>.<ext>."),
    out: Path = typer.Option(..., "--out", help="Output folder (tables, summary.json, report.html)."),
    labels: Optional[Path] = typer.Option(
        None, "--labels", help="Manifest whose label map to use (default: the reference manifest's)."
    ),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Data root of a reference manifest."),
    workers: int = typer.Option(1, "--workers", min=1, help="Processes scoring cases in parallel."),
    probabilities: Optional[Path] = typer.Option(
        None, "--probabilities", help="Folder of probability maps (scores lesions for AP)."
    ),
    scores: Optional[Path] = typer.Option(
        None,
        "--scores",
        help="Folder of a detection model's instance maps and score tables (OUT/instances of `medseg predict` with a maskrcnn model): its lesions and scores (AP).",
    ),
    resample_prediction: bool = typer.Option(
        False,
        "--resample-prediction",
        help="Resample predictions onto the reference grid (nearest) instead of reporting a mismatch.",
    ),
    things: Optional[List[str]] = typer.Option(
        None, "--thing", help="Score this structure as instances (repeatable; default: the manifest's things)."
    ),
    match: str = typer.Option("iou", "--match", help="Lesion matching: 'iou' (IoU > 0.5) or 'overlap'."),
    connectivity: Optional[int] = typer.Option(
        None, "--connectivity", min=1, max=3, help="Lesion connectivity: 1 = faces ... ndim = full (default)."
    ),
    nsd_tolerance_mm: Optional[float] = typer.Option(
        None,
        "--nsd-tolerance-mm",
        min=0.0,
        help="NSD tolerance for every structure (default: the manifest's, else 1 mm).",
    ),
    subset: Optional[str] = typer.Option(
        None, "--subset", help="Only cases of this manifest list (e.g. test_labelled)."
    ),
    no_report: bool = typer.Option(False, "--no-report", help="Skip report.html."),
    baseline: Optional[Path] = typer.Option(
        None,
        "--baseline",
        help="Predictions to compare against (e.g. the U-Net's, when --prediction holds SAM-refined output): "
        "evaluated into OUT/baseline, then paired before/after in OUT/before_after (as `medseg compare`).",
    ),
    scheduler: Optional[str] = typer.Option(
        None, "--scheduler", help="Score cases on the Dask cluster of this running `dask scheduler` (tcp://host:8786)."
    ),
    dask_local: Optional[int] = typer.Option(
        None, "--dask-local", min=1, help="Score cases on a local Dask cluster of N worker processes."
    ),
    dask_threads: int = typer.Option(1, "--dask-threads", min=1, help="Threads of each --dask-local worker."),
    whole_image: bool = typer.Option(
        False,
        "--whole-image",
        help="Score every pixel, also outside the field-of-view masks a manifest gives (fov_mask, as DRIVE's).",
    ),
) -> None:
    """Evaluate predictions against references: per_case.csv, summary.json, report.html."""
    from medseg.evaluation.batch import evaluate as run_evaluation
    from medseg.evaluation.report import write_outputs
    from medseg.evaluation.summary import status_counts, summary_records, summary_text

    options = dict(
        labels=labels,
        data_root=data_root,
        probabilities=probabilities,
        scores=scores,
        things=things or None,
        nsd_tolerance_mm=nsd_tolerance_mm,
        match=match,  # type: ignore[arg-type]
        connectivity=connectivity,
        resample_prediction=resample_prediction,
        subset=subset,
        workers=workers,
        progress=sys.stderr.isatty(),
        scheduler=scheduler,
        dask_local=dask_local,
        dask_threads=dask_threads,
        field_of_view=not whole_image,
    )
    evaluation = run_evaluation(reference, prediction, out=out, **options)  # type: ignore[arg-type]
    if evaluation.cases_per_worker:
        from medseg.evaluation.dask_runner import per_worker_text

        typer.echo(f"dask: cases scored per worker: {per_worker_text(evaluation.cases_per_worker)}", err=True)
    summary = summary_records(evaluation.tables["per_case"].rows)  # once: the files and the table below
    written = write_outputs(evaluation, out, report=not no_report, summary=summary)
    if summary:
        typer.echo(summary_text(summary))
    for row in evaluation.failed_rows:
        typer.echo(f"failed: {row['case_id']}: {row['message']}", err=True)
    counts = status_counts(evaluation.tables["cases"].column("status"))
    typer.echo(
        f"evaluated {len(evaluation.tables['cases'])} cases ({', '.join(f'{v} {k}' for k, v in counts.items())}); "
        f"dataset mIoU {evaluation.dataset_miou:.4f}; wrote {', '.join(p.name for p in written.values())} to {out}"
    )
    if baseline is not None:
        from medseg.evaluation.comparison import compare as run_comparison

        baseline_options = {**options, "probabilities": None, "scores": None}  # they belong to --prediction
        before = run_evaluation(reference, baseline, out=out / "baseline", **baseline_options)  # type: ignore[arg-type]
        write_outputs(before, out / "baseline", report=not no_report)
        comparison = run_comparison(out / "baseline", out, names=("baseline", prediction.name or "prediction"))
        comparison.write(out / "before_after", report=not no_report)
        for line in comparison.summary_lines():
            typer.echo(line)
        typer.echo(f"before/after: {out / 'before_after'}")
    if evaluation.failed_rows:
        raise typer.Exit(EXIT_PROBLEMS_FOUND)


@app.command()
def compare(
    eval_a: Path = typer.Argument(
        ..., help="Evaluation folder of method A (holds per_case.csv from `medseg evaluate`)."
    ),
    eval_b: Path = typer.Argument(..., help="Evaluation folder of method B, of the same cases."),
    out: Path = typer.Option(
        ..., "--out", help="Output folder (comparison.csv, pairs.csv, comparison.json, report.html)."
    ),
    name_a: Optional[str] = typer.Option(None, "--name-a", help="Name of A (default: its folder name)."),
    name_b: Optional[str] = typer.Option(None, "--name-b", help="Name of B (default: its folder name)."),
    metrics: Optional[List[str]] = typer.Option(
        None, "--metric", help="Metric to compare (repeatable; default: dice, hd95_mm, nsd)."
    ),
    bootstrap: int = typer.Option(2000, "--bootstrap", min=0, help="Bootstrap resamples of the CI (0: none)."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    alpha: float = typer.Option(0.05, "--alpha", help="1 - CI level; significant: Holm p < alpha."),
    empty: str = typer.Option(
        "exclude", "--empty", help="Empty/failed cases: exclude (NaN) or worst (Dice 0, diagonal)."
    ),
    no_report: bool = typer.Option(False, "--no-report", help="Skip report.html."),
) -> None:
    """Paired comparison B vs A per structure and metric: mean difference [CI], Wilcoxon + Holm, wins/ties/losses."""
    from medseg.evaluation.comparison import DEFAULT_COMPARE_METRICS, default_names
    from medseg.evaluation.comparison import compare as run_comparison

    default_a, default_b = default_names(eval_a, eval_b)
    comparison = run_comparison(
        eval_a,
        eval_b,
        metrics=metrics or DEFAULT_COMPARE_METRICS,
        names=(name_a or default_a, name_b or default_b),
        bootstrap=bootstrap,
        seed=seed,
        alpha=alpha,
        empty=empty,  # type: ignore[arg-type]
    )
    written = comparison.write(out, report=not no_report)
    for line in comparison.summary_lines():
        typer.echo(line)
    typer.echo(f"wrote {', '.join(p.name for p in written.values())} to {out}")
