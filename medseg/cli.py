"""The ``medseg`` command line: a thin typed shell over the Python API.

Each verb parses its options, calls one API function and prints the result. Imports happen
inside the verbs so ``medseg --help`` and ``medseg check`` start fast and never load torch.

User errors (:class:`~medseg.errors.MedsegUserError`: a bad file, manifest or option; an
``OSError`` such as a read-only or full output folder; running out of CUDA or host memory) print
one line ``medseg: error: ...`` naming the file or option and exit with status 2; ``--debug``
shows the traceback too. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import List, Optional

import typer

__all__ = ["app", "main"]

EXIT_USER_ERROR = 2
EXIT_PROBLEMS_FOUND = 1

app = typer.Typer(
    name="medseg",
    help="Medical image segmentation: plan, train, predict, evaluate.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for user errors too."),
) -> None:
    """medseg: 2D/3D U-Nets on MONAI, exact evaluation in millimetres."""


@app.command()
def info() -> None:
    """Versions of medseg and its libraries, the compute device, and optional extras."""
    from medseg.apps.environment import environment_report

    for key, value in environment_report().items():
        typer.echo(f"{key:<18} {value}")


@app.command()
def check(
    manifest: Path = typer.Argument(..., help="Manifest JSON (data_manifests/*.json or a dataset.json)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Folder the manifest's paths are relative to."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    tolerance_mm: float = typer.Option(1e-3, "--tolerance-mm", min=0.0, help="Allowed spacing/origin difference (mm)."),
    workers: int = typer.Option(2, "--workers", min=1, help="Parallel readers."),
) -> None:
    """Validate every case of a manifest; exit 0 only when all is well."""
    from medseg.data.check import check_manifest
    from medseg.data.manifest import load_manifest

    loaded = load_manifest(manifest, data_root=data_root)
    report = check_manifest(
        loaded, tolerance_mm=tolerance_mm, workers=workers, progress=not as_json and sys.stderr.isatty()
    )
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        for problem in report.problems:
            typer.echo(str(problem))
        typer.echo(report.summary_line())
    if not report.ok:
        raise typer.Exit(EXIT_PROBLEMS_FOUND)


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
) -> None:
    """Evaluate predictions against references: per_case.csv, summary.json, report.html."""
    from medseg.evaluation.batch import evaluate as run_evaluation
    from medseg.evaluation.report import write_outputs
    from medseg.evaluation.summary import summarize

    evaluation = run_evaluation(
        reference,
        prediction,
        labels=labels,
        data_root=data_root,
        probabilities=probabilities,
        things=things or None,
        nsd_tolerance_mm=nsd_tolerance_mm,
        match=match,  # type: ignore[arg-type]
        connectivity=connectivity,
        resample_prediction=resample_prediction,
        subset=subset,
        workers=workers,
        out=out,
        progress=sys.stderr.isatty(),
    )
    written = write_outputs(evaluation, out, report=not no_report)
    summary = summarize(evaluation.per_case, metrics=("dice", "hd95_mm", "nsd"))
    if not summary.empty:
        table = summary["mean"].unstack("metric")
        table["n_scored"] = summary["n_scored"].xs("dice", level="metric")
        typer.echo(table.to_string(float_format=lambda v: f"{v:.4f}"))
    for row in evaluation.failed.itertuples():
        typer.echo(f"failed: {row.case_id}: {row.message}", err=True)
    counts = evaluation.cases["status"].value_counts().to_dict()
    typer.echo(
        f"evaluated {len(evaluation.cases)} cases ({', '.join(f'{v} {k}' for k, v in counts.items())}); "
        f"dataset mIoU {evaluation.dataset_miou:.4f}; wrote {', '.join(p.name for p in written.values())} to {out}"
    )
    if len(evaluation.failed):
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
    from medseg.evaluation.compare import DEFAULT_COMPARE_METRICS, default_names
    from medseg.evaluation.compare import compare as run_comparison

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


@app.command()
def plan(
    manifest: Path = typer.Argument(..., help="Manifest JSON (data_manifests/*.json or a dataset.json)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Folder the manifest's paths are relative to."),
    out: Path = typer.Option(Path("plans.json"), "--out", help="Plans file; fingerprint.json is written beside it."),
    workers: int = typer.Option(2, "--workers", min=1, help="Threads reading cases."),
    memory_budget_gb: float = typer.Option(
        8.0, "--memory-budget-gb", min=0.01, help="Activation memory of one training batch."
    ),
    base_features: int = typer.Option(
        16, "--base-features", min=1, help="Features of the first U-Net stage (nnU-Net: 32)."
    ),
    augmentation: Optional[str] = typer.Option(
        None,
        "--augmentation",
        help="Augmentation preset: light (default, for CPU-hour budgets), mirror, or nnunet (for ~1000 GPU epochs).",
    ),
) -> None:
    """Fingerprint a dataset and write editable plans (3d and 2d configurations)."""
    from medseg.planning.plans import plan_dataset
    from medseg.planning.presets import DEFAULT_AUGMENTATION

    plans = plan_dataset(
        manifest,
        data_root=data_root,
        out=out,
        workers=workers,
        memory_budget_gb=memory_budget_gb,
        base_features=base_features,
        augmentation=augmentation or DEFAULT_AUGMENTATION,
    )
    for name, cfg in plans["configurations"].items():
        typer.echo(
            f"{name}: spacing_mm {cfg['spacing_mm']} patch {cfg['patch_size']} batch {cfg['batch_size']} "
            f"stages {len(cfg['network']['strides'])} filters {cfg['network']['filters']}"
        )
    typer.echo(f"augmentation: {augmentation or DEFAULT_AUGMENTATION} {plans['augmentation']}")
    typer.echo(f"wrote {out} and {out.with_name('fingerprint.json')}")


@app.command()
def train(
    manifest: Path = typer.Argument(..., help="Manifest JSON."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Folder the manifest's paths are relative to."),
    plans: Path = typer.Option(..., "--plans", help="plans.json from `medseg plan`."),
    config: str = typer.Option("3d", "--config", help="3d or 2d."),
    fold: str = typer.Option("0", "--fold", help="Fold index, or 'all' for every fold in turn."),
    out: Path = typer.Option(..., "--out", help="Run folder."),
    epochs: Optional[int] = typer.Option(
        None, "--epochs", min=1, help="Default: the plans' (unbounded with --time-limit-min)."
    ),
    time_limit_min: Optional[float] = typer.Option(
        None, "--time-limit-min", min=0.0, help="Wall-clock training budget; the schedule is compressed into it."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint_last.pt."),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(0, "--threads", min=0, help="torch CPU threads (0: torch's default)."),
    loader_workers: Optional[int] = typer.Option(
        None,
        "--loader-workers",
        min=0,
        max=1,
        help="Background process making batches: 0 or 1 (default: 1 on CUDA or when a core is free of torch's threads).",
    ),
    postprocessing: bool = typer.Option(
        True,
        "--postprocessing/--no-postprocessing",
        help="Afterwards, choose keep-largest / remove-small rules on the validation cases (kept only where they raise Dice).",
    ),
) -> None:
    """Train a planned U-Net on one fold (or all), with validation and checkpoints."""
    from medseg.training.loop import train as train_model

    result = train_model(
        manifest,
        data_root=data_root,
        plans=plans,
        config=config,
        fold=fold,
        out_dir=out,
        epochs=epochs,
        time_limit_min=time_limit_min,
        device=device,
        resume=resume,
        seed=seed,
        num_threads=threads or None,
        loader_workers=loader_workers,
        progress=sys.stderr.isatty(),
    )
    runs = result if isinstance(result, list) else [result]
    for run in runs:
        dice = ", ".join(f"{k} {v:.4f}" for k, v in run["final_dice"].items())
        typer.echo(
            f"fold {run['fold']}: {run['epochs']} epochs, {run['elapsed_s']:.0f} s; validation Dice: {dice}; {run['out_dir']}"
        )
    if postprocessing:
        from medseg.inference.crossval import determine_postprocessing_for_runs

        rules = determine_postprocessing_for_runs(
            [r["out_dir"] for r in runs],
            manifest=manifest,
            data_root=data_root,
            device=device,
            progress=sys.stderr.isatty(),
        )
        typer.echo(
            f"postprocessing chosen on the validation cases (checkpoint_{rules.get('checkpoint', 'last')}.pt): "
            f"{json.dumps(rules.get('rules', rules))}"
        )


@app.command()
def predict(
    model: List[Path] = typer.Option(
        ..., "--model", help="Run folder, folder of fold_* runs, or checkpoint; repeat for an ensemble."
    ),
    input: Path = typer.Option(..., "--input", help="An image file, a folder of images, or a manifest (.json)."),
    output: Path = typer.Option(..., "--output", help="Output folder: one label file per input, same name and format."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Data root of a manifest input."),
    subset: Optional[str] = typer.Option(None, "--subset", help="Only this case list of a manifest (e.g. test)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    tta: bool = typer.Option(True, "--tta/--no-tta", help="Mirroring test-time augmentation."),
    overlap: float = typer.Option(0.5, "--overlap", min=0.0, max=0.95, help="Sliding-window overlap fraction."),
    save_probabilities: bool = typer.Option(
        False, "--save-probabilities", help="Also write probabilities/<case>.nii.gz."
    ),
    watershed: bool = typer.Option(False, "--watershed", help="Split touching instances of thing structures."),
    checkpoint: str = typer.Option(
        "last",
        "--checkpoint",
        help="Checkpoint of run folders: last (default) or best (chosen on the run's own validation cases, so optimistic there).",
    ),
    no_postprocessing: bool = typer.Option(False, "--no-postprocessing", help="Ignore the run's postprocessing.json."),
) -> None:
    """Segment images with a trained model or fold ensemble, in each input's exact geometry."""
    from medseg.inference.batch import predict_batch

    result = predict_batch(
        model[0] if len(model) == 1 else model,
        input,
        output,
        data_root=data_root,
        subset=subset,
        device=device,
        tta=tta,
        overlap=overlap,
        save_probabilities=save_probabilities,
        watershed=watershed,
        which=checkpoint,
        postprocessing=None if no_postprocessing else "auto",
        progress=sys.stderr.isatty(),
    )
    for case_id, message in result.failed:
        typer.echo(f"failed: {case_id}: {message}", err=True)
    typer.echo(
        f"predicted {len(result.predicted)}, reused {len(result.skipped)}, failed {len(result.failed)} "
        f"in {result.elapsed_s:.1f} s; wrote {output} ({result.record.name if result.record else ''})"
    )
    if result.failed:
        raise typer.Exit(EXIT_PROBLEMS_FOUND)


@app.command()
def demo(
    out: Path = typer.Option(Path("medseg_demo"), "--out", help="Folder for the data, model, predictions and report."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="Run on this dataset instead of synthetic data."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Data root of --manifest."),
    train_minutes: float = typer.Option(2.0, "--train-minutes", min=0.05, help="Wall-clock training budget (minutes)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    tta: bool = typer.Option(True, "--tta/--no-tta", help="Mirroring test-time augmentation when predicting."),
    threads: int = typer.Option(1, "--threads", min=0, help="torch CPU threads (0: one per core)."),
) -> None:
    """Synthetic (or your) data -> plan -> train briefly -> predict held-out cases -> evaluate -> report.html."""
    from medseg.apps.demo import run_demo
    from medseg.errors import MedsegUserError

    if data_root is not None and manifest is None:
        raise MedsegUserError("--data-root needs --manifest")
    result = run_demo(
        out,
        manifest=manifest,
        data_root=data_root,
        train_minutes=train_minutes,
        device=device,
        tta=tta,
        num_threads=threads or None,
        progress=sys.stderr.isatty(),
    )
    typer.echo(
        f"held-out Dice ({result.num_heldout} cases): "
        + ", ".join(f"{name} {value:.3f}" for name, value in result.dice.items())
    )
    typer.echo(f"report: {result.report}")


def _user_error_message(error: BaseException) -> str | None:
    """The one-line message of an error the user can fix, or None for a bug (which keeps its traceback).

    User errors: :class:`~medseg.errors.MedsegUserError`; an ``OSError`` (read-only or full output
    folder, permission denied, missing file), named by its file; running out of memory (CUDA or
    host), with what to try instead.
    """
    from medseg.errors import MedsegUserError

    if isinstance(error, MedsegUserError):
        return str(error)
    if isinstance(error, OSError):
        where = error.filename if error.filename is not None else "file system"
        return f"{where}: {error.strerror or error}"
    if type(error).__name__ == "OutOfMemoryError" or isinstance(error, MemoryError):
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return (
            f"out of memory ({type(error).__name__}{': ' + first[:160] if first else ''}); "
            "try --device cpu, fewer --workers or a smaller --overlap"
        )
    return None


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``medseg`` console script; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        app(args=args, prog_name="medseg")  # standalone mode: always ends in SystemExit
    except SystemExit as done:
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except Exception as error:  # noqa: BLE001 - the boundary between user errors and bugs
        message = _user_error_message(error)
        if message is None:
            raise
        if debug:
            traceback.print_exc()
        typer.echo(f"medseg: error: {message}", err=True)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
