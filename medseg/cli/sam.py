"""Segment-Anything commands: ``segment``, ``refine fit`` and ``train-sam``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from medseg.cli.app import app


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
