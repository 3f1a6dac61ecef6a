"""Commands about data and the machine: ``info``, ``check``, ``stats``, ``demo``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from medseg.cli.app import EXIT_PROBLEMS_FOUND, app


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
