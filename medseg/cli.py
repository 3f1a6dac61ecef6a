"""The ``medseg`` command line: a thin typed shell over the Python API.

Each verb parses its options, calls one API function and prints the result. Imports happen
inside the verbs so ``medseg --help`` and ``medseg check`` start fast and never load torch.

User errors (:class:`~medseg.errors.MedsegUserError`: a bad file, manifest or option; an
``OSError`` such as a read-only or full output folder; running out of CUDA or host memory) print
one line ``medseg: error: ...`` naming the file or option and exit with status 2; ``--debug``
shows the traceback too. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import gc
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
    architecture: str = typer.Option(
        "dynunet",
        "--architecture",
        help="Network of every configuration: dynunet, fcn, deeplabv3plus or maskrcnn (2D configurations only).",
    ),
    fast: bool = typer.Option(
        False, "--fast", help="Plan for 3 mm spacing or coarser (TotalSegmentator's --fast): ~8x fewer voxels on CT."
    ),
) -> None:
    """Fingerprint a dataset and write editable plans (3d and 2d configurations; 2D images: 2d only)."""
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
        architecture=architecture,
        fast=fast,
    )
    for name, cfg in plans["configurations"].items():
        network = cfg["network"]
        topology = (
            f"stages {len(network['strides'])} filters {network['filters']}"
            if "strides" in network
            else f"backbone {network.get('backbone')}"
        )
        typer.echo(
            f"{name}: spacing_mm {cfg['spacing_mm']} patch {cfg['patch_size']} batch {cfg['batch_size']} "
            f"{topology} architecture {cfg.get('architecture', 'dynunet')}"
        )
    typer.echo(f"augmentation: {augmentation or DEFAULT_AUGMENTATION} {plans['augmentation']}")
    typer.echo(f"wrote {out} and {out.with_name('fingerprint.json')}")


@app.command()
def train(
    manifest: Path = typer.Argument(..., help="Manifest JSON."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Folder the manifest's paths are relative to."),
    plans: Path = typer.Option(..., "--plans", help="plans.json from `medseg plan`."),
    config: str = typer.Option("3d", "--config", help="3d or 2d."),
    fold: str = typer.Option(
        "0",
        "--fold",
        help="Fold index; 'all': every training case, no validation (nnU-Net's 'all'); 'all-cv': every fold in turn, into OUT/fold_K.",
    ),
    out: Path = typer.Option(..., "--out", help="Run folder."),
    epochs: Optional[int] = typer.Option(
        None, "--epochs", min=1, help="Default: the plans' (unbounded with --time-limit-min)."
    ),
    time_limit_min: Optional[float] = typer.Option(
        None, "--time-limit-min", min=0.0, help="Wall-clock training budget; the schedule is compressed into it."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint_last.pt."),
    max_epochs_this_run: Optional[int] = typer.Option(
        None, "--max-epochs-this-run", min=1, help="Stop after this many epochs (the schedule still spans --epochs)."
    ),
    seed: int = typer.Option(0, "--seed"),
    precision: Optional[str] = typer.Option(
        None,
        "--precision",
        help="auto: autocast where the hardware computes it natively (float16 on CUDA, bfloat16 on CPUs with AMX/AVX512-BF16); mixed: always; float32: never. Default: float16 on CUDA, float32 on the CPU.",
    ),
    ema_decay: Optional[float] = typer.Option(
        None,
        "--ema-decay",
        min=0.0,
        max=0.9999,
        help="Validate, checkpoint and predict with an exponential moving average of the weights (e.g. 0.999; 0: off). Default: the plans'.",
    ),
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
    """Train a planned network on one fold (or all), with validation and checkpoints.

    Started by torchrun (`torchrun --nproc_per_node N -m medseg train ...`), the N processes train
    one model with DistributedDataParallel; rank 0 validates, writes and reports.
    """
    import os

    from medseg.training.distributed import Ranks
    from medseg.training.loop import train as train_model

    ranks = Ranks.from_torchrun(os.environ)  # torchrun's launch contract, read here and nowhere else
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
        ema_decay=ema_decay,
        precision=precision,
        num_threads=threads or None,
        loader_workers=loader_workers,
        max_epochs_this_run=max_epochs_this_run,
        progress=sys.stderr.isatty(),
        ranks=ranks,
    )
    if ranks is not None and not ranks.is_main:
        return  # rank 0 reports and chooses the postprocessing
    runs = result if isinstance(result, list) else [result]
    for run in runs:
        dice = ", ".join(f"{k} {v:.4f}" for k, v in run["final_dice"].items())
        typer.echo(
            f"fold {run['fold']}: {run['epochs']} epochs, {run['elapsed_s']:.0f} s; validation Dice: {dice}; {run['out_dir']}"
        )
    if postprocessing and fold == "all":
        typer.echo("postprocessing: not chosen (fold 'all' has no validation cases); predict uses none")
    elif postprocessing:
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
        ..., "--model", help="Run folder, folder of fold_* runs, checkpoint, or model.zip; repeat for an ensemble."
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
    output_format: str = typer.Option(
        "auto",
        "--output-format",
        help="Label files: auto (the input's format), nii.gz, nii, nrrd, mha, seg.nrrd (3D Slicer, names and "
        "colours) or dicom-seg (<case>.dcm referencing the input DICOM series). labels.itksnap.txt is always written.",
    ),
    statistics: bool = typer.Option(
        False, "--statistics", help="Also write statistics/<case>.csv and statistics.csv (ml, intensities)."
    ),
    scheduler: Optional[str] = typer.Option(
        None, "--scheduler", help="Predict on the Dask cluster of this running `dask scheduler` (tcp://host:8786)."
    ),
    dask_local: Optional[int] = typer.Option(
        None, "--dask-local", min=1, help="Predict on a local Dask cluster of N worker processes."
    ),
    dask_threads: int = typer.Option(
        1, "--dask-threads", min=1, help="torch threads of each Dask worker (each predicts one case at a time)."
    ),
    runtime: str = typer.Option(
        "auto",
        "--runtime",
        help="Network runtime: torch, onnx (onnxruntime on the CPU; exported on first use, cached beside the "
        "checkpoint) or auto (the one measured faster: torch for now, see medseg.model.onnx_export).",
    ),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads of torch and onnxruntime (0: their default)."),
    precision: str = typer.Option(
        "auto",
        "--precision",
        help="Network precision: auto (float16 on CUDA, bfloat16 on CPUs with AMX/AVX512-BF16, else float32), "
        "mixed or float32.",
    ),
    sam: Optional[Path] = typer.Option(
        None,
        "--sam",
        help="Refine with this SAM checkpoint where `medseg refine fit` accepted it (the run's refinement.json); "
        "everything else stays the U-Net's output, bit-identical.",
    ),
    max_change: Optional[float] = typer.Option(
        None,
        "--max-change",
        min=0.0,
        help="With --sam: largest fraction of a structure SAM may change (default: fitted).",
    ),
) -> None:
    """Segment images with a trained model or fold ensemble, in each input's exact geometry."""
    from medseg.inference.batch import predict_batch

    if threads:
        import torch

        torch.set_num_threads(threads)

    run_batch = predict_batch
    if sam is not None:
        from functools import partial

        from medseg.refine.apply import predict_refined

        if len(model) != 1:
            raise typer.BadParameter("--sam refines one run's predictions: give one --model", param_hint="--model")
        run_batch = partial(predict_refined, sam=sam, max_change_fraction=max_change)  # type: ignore[assignment]
    result = run_batch(
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
        output_format=output_format,
        statistics=statistics,
        progress=sys.stderr.isatty(),
        scheduler=scheduler,
        dask_local=dask_local,
        dask_threads=dask_threads,
        runtime=runtime,
        threads=threads or None,
        precision=precision,
    )
    if result.cases_per_worker:
        from medseg.evaluation.dask_runner import per_worker_text

        typer.echo(f"dask: cases predicted per worker: {per_worker_text(result.cases_per_worker)}", err=True)
    for case_id, message in result.notes:
        typer.echo(f"note: {case_id}: {message}", err=True)
    for case_id, message in result.failed:
        typer.echo(f"failed: {case_id}: {message}", err=True)
    typer.echo(
        f"predicted {len(result.predicted)}, reused {len(result.skipped)}, failed {len(result.failed)} "
        f"in {result.elapsed_s:.1f} s; wrote {output} ({result.record.name if result.record else ''})"
    )
    if result.failed:
        raise typer.Exit(EXIT_PROBLEMS_FOUND)


@app.command()
def export(
    runs: List[Path] = typer.Argument(..., help="Run folder(s), one per fold, or a folder of fold_* runs."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="model.zip to write (with --onnx: the .onnx file, default beside the checkpoint)."
    ),
    onnx: bool = typer.Option(False, "--onnx", help="Export one run's network as ONNX, verified against PyTorch."),
    checkpoint: str = typer.Option("last", "--checkpoint", help="Checkpoint of each run folder: last or best."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name on the model card (default: the zip's name)."),
) -> None:
    """Pack trained runs into one shareable model.zip (with a model card and hashes), or export ONNX."""
    from medseg.errors import MedsegUserError

    if checkpoint not in ("last", "best"):
        raise MedsegUserError(f"--checkpoint must be last or best, got {checkpoint!r}")
    if onnx:
        from medseg.inference.export import export_onnx

        if len(runs) != 1:
            raise MedsegUserError("--onnx exports one run's network; give one run folder")
        result = export_onnx(runs[0], out=out, which=checkpoint)
        typer.echo(result.verification.line())
        typer.echo(f"wrote {result.path} (SHA-256 {result.sha256}) from {result.checkpoint}")
        return
    from medseg.inference.export import export_model

    if out is None:
        raise MedsegUserError("--out model.zip is required (or --onnx)")
    bundle = export_model(runs[0] if len(runs) == 1 else runs, out=out, which=checkpoint, name=name)
    card = bundle.card
    typer.echo(
        f"wrote {bundle.path}: {len(card['folds'])} fold(s), checkpoint {card['checkpoint']}, "
        f"{len(card['files'])} files, {bundle.bytes / 1e6:.1f} MB"
    )
    typer.echo(f"SHA-256 {bundle.sha256}  (publish it: `medseg predict --model {bundle.path.name}` checks the files)")


@app.command()
def stats(
    image: Path = typer.Option(
        ..., "--image", help="Image file or DICOM series folder (values as stored after rescaling: HU for CT)."
    ),
    labels: Path = typer.Option(
        ..., "--labels", help="Label map on the image's grid (NIfTI, NRRD, MHA, .seg.nrrd or a DICOM-SEG .dcm)."
    ),
    labels_from: Optional[Path] = typer.Option(
        None,
        "--labels-from",
        help="Manifest whose label map names the values (default: a DICOM-SEG's segment labels, else the values).",
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the table to FILE.csv or FILE.json."),
) -> None:
    """Volume (ml), voxel count and intensity mean/sd/median/p5/p95/min/max of every structure."""
    from medseg.evaluation.statistics import check_statistics_path, structure_statistics, write_statistics
    from medseg.io.volumes import read_volume

    if out is not None:
        check_statistics_path(out)
    label_set = None
    if labels_from is not None:
        from medseg.evaluation.pairing import resolve_labels

        label_set = resolve_labels(labels_from, None, None)[0]
    image_volume = read_volume(image)
    label_volume = read_volume(labels, kind="label")
    if label_set is None and label_volume.meta.get("dicom_seg_segments"):
        from medseg.core.labels import LabelSet

        segments = label_volume.meta["dicom_seg_segments"]
        label_set = LabelSet({0: "background", **{int(v): name for v, name in segments.items()}})
    table = structure_statistics(image_volume, label_volume, labels=label_set)
    shown = table if image_volume.num_channels > 1 else table.drop(columns="channel")
    typer.echo(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if out is not None:
        write_statistics(table, out, image=str(image), labels=str(labels), spacing_mm=list(image_volume.spacing_mm))
        typer.echo(f"wrote {out}")


@app.command()
def segment(
    image: Path = typer.Argument(..., help="The image to segment (NIfTI, NRRD, MHA, DICOM folder, PNG)."),
    sam: Path = typer.Option(..., "--sam", help="SAM checkpoint: Hugging Face folder (sam*, sam2*, sam3) or .pth."),
    output: Path = typer.Option(..., "--output", help="Label file to write, or a folder (then the input's file name)."),
    point: Optional[List[str]] = typer.Option(None, "--point", help="Positive point i,j,k (repeatable)."),
    negative_point: Optional[List[str]] = typer.Option(None, "--negative-point", help="Negative point i,j,k."),
    box: Optional[List[str]] = typer.Option(None, "--box", help="Box i0,j0,k0,i1,j1,k1 (inclusive; repeatable)."),
    text: Optional[str] = typer.Option(None, "--text", help="Structure name: SAM3 concept, or a label of --model."),
    model: Optional[Path] = typer.Option(None, "--model", help="Trained medseg run: its mask of --text prompts SAM."),
    world: bool = typer.Option(False, "--world", help="Points and boxes in RAS mm (as 3D Slicer shows them)."),
    propagate: bool = typer.Option(False, "--propagate", help="SAM2 video propagation from the key slice."),
    axis: int = typer.Option(2, "--axis", min=0, max=2, help="Axis the slices are taken across."),
    modality: str = typer.Option("auto", "--modality", help="Intensity window: auto, ct or mri."),
    window: Optional[str] = typer.Option(None, "--window", help="Explicit intensity window low,high (e.g. -160,240)."),
    channel: int = typer.Option(0, "--channel", min=0, help="Image channel SAM sees."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
) -> None:
    """Segment what points, boxes or a structure name point at, with a Segment-Anything model."""
    from medseg.errors import MedsegUserError
    from medseg.io.volumes import read_volume, volume_suffix, write_volume
    from medseg.refine.segment import segment_with_prompts

    def numbers(values: Optional[List[str]], option: str, counts: tuple[int, ...]) -> list[list[float]]:
        parsed = []
        for value in values or []:
            try:
                items = [float(v) for v in value.replace(" ", "").split(",")]
            except ValueError:
                raise MedsegUserError(f"{option} {value!r}: expected comma-separated numbers") from None
            if len(items) not in counts:
                raise MedsegUserError(f"{option} {value!r}: expected {' or '.join(map(str, counts))} numbers")
            parsed.append(items)
        return parsed

    if modality not in ("auto", "ct", "mri"):
        raise MedsegUserError(f"--modality must be auto, ct or mri, got {modality!r}")
    window_values = numbers([window] if window else None, "--window", (2,))
    volume = read_volume(image)
    name = image.name if volume_suffix(image) else f"{image.name}.nii.gz"  # a DICOM folder becomes NIfTI
    target = output if volume_suffix(output) else output / name
    result = segment_with_prompts(
        volume,
        sam,
        points=numbers(point, "--point", (2, 3)) or None,
        negative_points=numbers(negative_point, "--negative-point", (2, 3)) or None,
        boxes=numbers(box, "--box", (4, 6)) or None,
        text=text,
        model=model,
        world=world,
        propagate=propagate,
        axis=axis,
        modality=modality,  # type: ignore[arg-type]
        window=tuple(window_values[0]) if window_values else None,  # type: ignore[arg-type]
        channel=channel,
        device=device,
    )
    write_volume(result.labels, target)
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    voxels = int((result.labels.array > 0).sum())
    typer.echo(
        f"segmented {voxels} voxels on {len(result.slices_prompted)} slices ({result.num_objects} objects, "
        f"{result.encoder_calls} slice embeddings); wrote {target}"
    )


refine_app = typer.Typer(
    help="SAM-prompted refinement of a trained U-Net, kept only where it was measured to help.",
    no_args_is_help=True,
)
app.add_typer(refine_app, name="refine")


@refine_app.command("fit")
def refine_fit(
    model: Path = typer.Option(..., "--model", help="The fold's run folder (or its checkpoint)."),
    sam: Path = typer.Option(..., "--sam", help="SAM checkpoint: a Hugging Face folder (e.g. from train-sam) or .pth."),
    manifest: Path = typer.Option(..., "--manifest", help="The manifest the run was trained on."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Folder the manifest's paths are relative to."),
    fold: int = typer.Option(0, "--fold", min=0, help="The run's fold: its validation cases are refined and scored."),
    structures: Optional[List[str]] = typer.Option(
        None, "--structure", help="Structure (label or region) to refine; repeatable (default: all)."
    ),
    max_worse_fraction: float = typer.Option(
        0.2, "--max-worse-fraction", min=0.0, max=1.0, help="Largest fraction of cases whose Dice may fall."
    ),
    max_change: float = typer.Option(
        0.5, "--max-change", min=0.0, help="Refinement changing more than this fraction of a structure falls back."
    ),
    max_cases: Optional[int] = typer.Option(None, "--max-cases", min=1, help="Only the first N validation cases."),
    checkpoint: str = typer.Option("last", "--checkpoint", help="last (default) or best, as for predict."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    tta: bool = typer.Option(True, "--tta/--no-tta", help="Mirroring TTA of the U-Net (as predict will use)."),
) -> None:
    """Refine the fold's validation cases with several settings; accept per structure only what helps."""
    from medseg.refine.fit import fit_refinement
    from medseg.refine.gate import GateCriteria

    content = fit_refinement(
        model,
        sam,
        manifest=manifest,
        data_root=data_root,
        fold=fold,
        which=checkpoint,
        device=device,
        tta=tta,
        structures=structures or None,
        criteria=GateCriteria(max_worse_fraction=max_worse_fraction),
        max_change_fraction=max_change,
        max_cases=max_cases,
        progress=sys.stderr.isatty(),
    )
    for name, decision in content["structures"].items():
        if decision["decision"] == "accepted":
            low, high = decision["delta_dice"]["ci95"]
            typer.echo(
                f"{name}: accepted {decision['setting']}: Dice {decision['delta_dice']['mean']:+.4f} "
                f"[{low:+.4f}, {high:+.4f}], HD95 {decision['delta_hd95_mm']['mean']:+.2f} mm, "
                f"worse {decision['n_worse']}/{decision['n_cases']}"
            )
        else:
            typer.echo(f"{name}: rejected: {decision['reason']}")
    typer.echo(f"{len(content['validation_cases'])} validation cases; wrote {content['written']}")


@app.command("train-sam")
def train_sam_command(
    sam: str = typer.Option(..., "--sam", help="Start from this SAM/MedSAM checkpoint (folder or .pth), or 'tiny'."),
    manifest: Path = typer.Option(..., "--manifest", help="Manifest JSON."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Folder the manifest's paths are relative to."),
    fold: int = typer.Option(0, "--fold", min=0, help="Train on the fold's training cases, validate on the rest."),
    out: Path = typer.Option(..., "--out", help="Output folder (Hugging Face format + train_sam.json)."),
    structures: Optional[List[str]] = typer.Option(
        None, "--structure", help="Structure (label or region) to train on; repeatable (default: all)."
    ),
    time_limit_min: Optional[float] = typer.Option(None, "--time-limit-min", min=0.01, help="Wall-clock budget."),
    steps: int = typer.Option(1000, "--steps", min=1, help="Optimisation steps at most."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Prompts per step."),
    lr: Optional[float] = typer.Option(None, "--lr", min=0.0, help="Learning rate (default 1e-4; tiny: 1e-3)."),
    max_slices: int = typer.Option(1000, "--max-slices", min=1, help="Training slices embedded at most."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Fine-tune SAM's prompt encoder and mask decoder (image encoder frozen) on a fold's slices."""
    from medseg.refine.train_sam import TrainSamOptions, train_sam

    options = TrainSamOptions(
        steps=steps,
        time_limit_min=time_limit_min,
        batch_size=batch_size,
        lr=lr,
        max_train_slices=max_slices,
        device=device,
        seed=seed,
    )
    record = train_sam(
        sam,
        manifest=manifest,
        data_root=data_root,
        fold=fold,
        out=out,
        structures=structures or None,
        options=options,
        progress=sys.stderr.isatty(),
    )
    typer.echo(
        f"{record['steps_done']} steps on {record['train_samples']} prompts ({record['elapsed_s']:.0f} s); "
        f"validation Dice {record['val_dice_before']:.4f} -> {record['val_dice_after']:.4f}; wrote {out}"
    )


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


def _import_nibabel_without_pydicom() -> None:
    """Import nibabel while pydicom is hidden from it, saving 0.15 s of every command's start.

    nibabel imports pydicom, when installed, only to decode DICOM extensions inside NIfTI headers, which
    medseg never reads (nibabel then keeps such an extension as raw bytes). pydicom itself stays importable:
    DICOM series and DICOM-SEG read it as usual. Only the console script does this, since it owns its
    process; a notebook's nibabel is left as it is.
    """
    if "nibabel" in sys.modules or "pydicom" in sys.modules:
        return
    sys.modules["pydicom"] = None  # type: ignore[assignment]  # `import pydicom` now raises ImportError
    try:
        import nibabel  # noqa: F401
    finally:
        del sys.modules["pydicom"]


def console() -> None:
    """The ``medseg`` console script and ``python -m medseg``: :func:`main`, then a quick exit.

    nibabel is imported first, without pydicom (:func:`_import_nibabel_without_pydicom`).

    Before the interpreter shuts down, every object left is frozen (``gc.freeze``): the final
    garbage collection then skips them instead of walking numpy's, pandas' and scipy's module
    objects, which took 0.25 s of a 2 s ``medseg evaluate``. Exit handlers still run; nothing
    is skipped but that walk. (Not in :func:`main`, which tests call in one long process.)
    """
    _import_nibabel_without_pydicom()
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    console()
