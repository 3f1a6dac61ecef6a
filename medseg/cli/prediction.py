"""Commands that apply trained models: ``predict`` and ``export``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from medseg.cli.app import EXIT_PROBLEMS_FOUND, app


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
