"""Commands that plan and train networks: ``plan`` and ``train``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from medseg.cli.app import app


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
        if time_limit_min and run["validation_reserve_s"] > 30.0 * time_limit_min:
            typer.echo(
                f"note: fold {run['fold']}'s final validation needed {run['validation_reserve_s'] / 60:.1f} of the "
                f"{time_limit_min:g} min budget, more than half; give more time for more training",
                err=True,
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
