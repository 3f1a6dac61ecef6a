"""``medseg export``: a trained model as one shareable ``.zip``, or its network as ONNX.

:func:`export_model` packs run folders (one per fold, or a folder of ``fold_K`` runs) into a
model bundle (format: :mod:`medseg.model.bundle`): per fold the chosen checkpoint (``last`` by
default, as ``medseg predict`` uses) byte for byte (so its SHA-256 in prediction records, and the
checkpoint hashes ``refinement.json`` is bound to, stay those of the run), the plans and the
run's configuration with local paths removed; the postprocessing rules and refinement rules
found as the Segmenter finds them (in the run folder, or in the folder holding the fold runs); the
label map; and a model card (``model_card.json`` and ``MODEL_CARD.md``) with the training data
manifest's name and SHA-256, the folds, the validation metrics recorded in each fold's ``last``
checkpoint, the medseg/torch/MONAI versions and the SHA-256 of every file. Every ``--model``
option takes the zip back (:func:`medseg.model.checkpoint.resolve_checkpoints`).

:func:`export_onnx` writes one fold's network as an ONNX file, verified against PyTorch
(:func:`medseg.model.onnx_export.export_network`).

Example:
    >>> export = export_model(["runs/hippo/fold_0", "runs/hippo/fold_1"], out="hippo.zip")  # doctest: +SKIP
    >>> export.sha256                                                                    # doctest: +SKIP
    '3f2a...'
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from medseg import __version__
from medseg.core.labels import LabelSet
from medseg.errors import CheckpointError, MedsegUserError
from medseg.inference.postprocess import POSTPROCESSING_FILE
from medseg.io.files import atomic_path, sha256_file, write_json
from medseg.model.bundle import write_bundle
from medseg.model.checkpoint import load_checkpoint, load_fold_checkpoints, resolve_checkpoints
from medseg.model.networks import build_network
from medseg.model.onnx_export import CHECKPOINT_SHA256_KEY, OnnxVerification, export_network

__all__ = ["ModelExport", "OnnxExport", "export_model", "export_onnx", "REFINEMENT_FILE"]

REFINEMENT_FILE = "refinement.json"
#: keys of a run's resolved_config.json that name local paths, left out of a bundle
_LOCAL_KEYS = ("out_dir", "path", "data_root")


@dataclass(frozen=True)
class ModelExport:
    """A written model bundle: its path, SHA-256, size and model card."""

    path: Path
    sha256: str
    bytes: int
    card: dict[str, Any]


@dataclass(frozen=True)
class OnnxExport:
    """A written ONNX file: its path, SHA-256 and how it was verified against PyTorch."""

    path: Path
    sha256: str
    checkpoint: Path
    verification: OnnxVerification


def _shared_file(name: str, run_folders: Sequence[Path]) -> Path | None:
    """``name`` in the run folder (one run) or the folder holding the runs, as the Segmenter looks for rules."""
    folders = sorted(set(run_folders))
    candidates = [folders[0] / name] if len(folders) == 1 else []
    parents = {f.parent for f in folders}
    if len(parents) == 1:
        candidates.append(next(iter(parents)) / name)
    return next((c for c in candidates if c.is_file()), None)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def _validation_metrics(history: Any) -> dict[str, Any]:
    """The last validated epoch of a run's history: its epoch and every ``val_`` value."""
    rows = [row for row in history or [] if isinstance(row, Mapping)]
    for row in reversed(rows):
        values = {k: float(v) for k, v in row.items() if str(k).startswith("val_") and _finite(v)}
        if any(k.startswith("val_dice") for k in values):
            return {"epoch": row.get("epoch"), **{k: round(v, 6) for k, v in values.items()}}
    return {}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def _sanitized_config(resolved: Mapping[str, Any]) -> dict[str, Any]:
    """A run configuration without the keys that name local folders."""
    clean = {k: v for k, v in resolved.items() if k not in _LOCAL_KEYS}
    if isinstance(clean.get("manifest"), Mapping):
        clean["manifest"] = {k: v for k, v in clean["manifest"].items() if k not in _LOCAL_KEYS}
    return clean


def _manifest_entry(resolved: Mapping[str, Any]) -> dict[str, Any]:
    manifest = resolved.get("manifest") if isinstance(resolved.get("manifest"), Mapping) else {}
    path = manifest.get("path")
    digest = None
    if path and Path(path).is_file():
        digest = sha256_file(path)
    return {
        "manifest": manifest.get("name"),
        "manifest_file": Path(path).name if path else None,
        "manifest_sha256": digest,
        "num_cases": manifest.get("num_cases"),
    }


def _versions() -> dict[str, str]:
    import monai

    return {
        "medseg": __version__,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
    }


def _markdown(card: Mapping[str, Any], files: Mapping[str, str]) -> str:
    """MODEL_CARD.md: the card for people (the SHA-256 of every other file included)."""
    labels = card["labels"]["labels"]
    lines = [
        f"# {card['name']}",
        "",
        f"medseg model bundle, exported {card['created']} with medseg {card['versions']['medseg']} "
        f"(torch {card['versions']['torch']}, MONAI {card['versions']['monai']}).",
        "",
        f"- Structures: {', '.join(f'{k} {v}' for k, v in labels.items())}",
        f"- Input channels: {', '.join(card['channels'])}; configuration `{card['config']}`; "
        f"checkpoint `{card['checkpoint']}` of {len(card['folds'])} fold(s)",
    ]
    for entry in card["training_data"]:
        lines.append(
            f"- Training data: manifest `{entry['manifest']}` ({entry['manifest_file']}, "
            f"SHA-256 {entry['manifest_sha256'] or 'not available at export'}), {entry['num_cases']} cases"
        )
    lines += ["", "| fold | folder | epochs | validation (last checkpoint) |", "|---|---|---|---|"]
    for fold in card["folds"]:
        metrics = fold["validation"]
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("val_dice")) or "not recorded"
        epoch = f" (epoch {metrics['epoch']})" if metrics.get("epoch") is not None else ""
        lines.append(f"| {fold['fold']} | {fold['folder']} | {fold['epochs']} | {shown}{epoch} |")
    lines += [
        "",
        "Use: `medseg predict --model THIS.zip --input IMAGES --output OUT`; the zip is checked against",
        "the SHA-256 values in model_card.json before anything is loaded.",
        "",
        "| file | SHA-256 |",
        "|---|---|",
        *[f"| {name} | {digest} |" for name, digest in sorted(files.items())],
        "",
    ]
    return "\n".join(lines)


def _snapshot(path: Path, copy: Path) -> Path:
    """Copy ``path`` to ``copy`` (a missing or unreadable file is a one-line error naming ``path``)."""
    copy.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(path, copy)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read ({error.strerror or error})") from None
    return copy


def export_model(
    runs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    out: str | os.PathLike[str],
    which: str = "last",
    name: str | None = None,
) -> ModelExport:
    """Pack trained runs into a model bundle ``out`` (see the module docstring).

    Args:
        runs: run folders (one per fold), a folder of ``fold_K`` runs, or checkpoint files.
        out: the ``.zip`` to write (atomically).
        which: checkpoint of each run folder, ``"last"`` (default) or ``"best"``.
        name: the model's name on its card (default: ``out``'s stem).

    Raises:
        CheckpointError: a run without the checkpoint, an unreadable checkpoint, or folds that
            disagree on plans, configuration or labels.
        MedsegUserError: ``out`` does not end in ``.zip``.
    """
    out = Path(out)
    if out.suffix.lower() != ".zip":
        raise MedsegUserError(f"{out}: a model bundle is a .zip file")
    paths = resolve_checkpoints(runs, which=which)
    if len(set(paths)) != len(paths):
        raise CheckpointError(f"{paths[0]}: the same checkpoint is given twice")
    files: dict[str, Path] = {}
    folds: list[dict[str, Any]] = []
    training_data: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="medseg-export-") as staging_name:
        staging = Path(staging_name)
        # each checkpoint is copied once and everything below reads the copy: a run still training
        # replaces its checkpoint (atomically) at any time, and the hash must be of the file packed
        snapshots = [_snapshot(path, staging / f"fold_{index}" / path.name) for index, path in enumerate(paths)]
        try:
            contents = load_fold_checkpoints(snapshots)
        except CheckpointError as error:  # name the user's file, not the copy
            message = str(error)
            for path, copy in zip(paths, snapshots):
                message = message.replace(str(copy), str(path))
            raise CheckpointError(message) from None
        first = contents[0]
        for index, (path, snapshot, content) in enumerate(zip(paths, snapshots, contents)):
            folder = f"fold_{index}"
            training = content.get("training") if isinstance(content.get("training"), Mapping) else {}
            last_path = path.parent / "checkpoint_last.pt"
            history = training.get("history")
            if path.name != last_path.name and last_path.is_file():
                last_training = load_checkpoint(last_path).get("training")
                history = last_training.get("history") if isinstance(last_training, Mapping) else history
            files[f"{folder}/{path.name}"] = snapshot  # as trained: read above with weights_only=True
            write_json(content["plans"], staging / folder / "plans.json")
            files[f"{folder}/plans.json"] = staging / folder / "plans.json"
            resolved = _read_json(path.parent / "resolved_config.json")
            if resolved:
                write_json(_sanitized_config(resolved), staging / folder / "resolved_config.json")
                files[f"{folder}/resolved_config.json"] = staging / folder / "resolved_config.json"
                entry = _manifest_entry(resolved)
                if entry not in training_data:
                    training_data.append(entry)
            folds.append(
                {
                    "folder": folder,
                    "fold": content.get("fold", resolved.get("fold")),
                    "source_run": path.parent.name,
                    "source_checkpoint_sha256": sha256_file(snapshot),
                    "epochs": training.get("epoch"),
                    "validation": _validation_metrics(history),
                    "validation_cases": len(resolved.get("validation_cases", [])) if resolved else None,
                }
            )
        labels = LabelSet.from_manifest(first["labels"]["labels"], regions=first["labels"].get("regions"))
        channels = [
            str(c) for c in first.get("channels") or [n.get("channel") for n in first["plans"]["normalization"]]
        ]
        write_json({**labels.to_json(), "channels": channels}, staging / "labels.json")
        files["labels.json"] = staging / "labels.json"
        run_folders = [p.parent for p in paths]
        for rules in (POSTPROCESSING_FILE, REFINEMENT_FILE):
            found = _shared_file(rules, run_folders)
            if found is not None:
                files[rules] = found
        card = {
            "name": name or out.stem,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
            "checkpoint": which,
            "config": str(first["config"]),
            "labels": labels.to_json(),
            "channels": channels,
            "training_data": training_data,
            "folds": folds,
            "checkpoints": [f"{fold['folder']}/{path.name}" for fold, path in zip(folds, paths)],
            "postprocessing": POSTPROCESSING_FILE in files,
            "refinement": REFINEMENT_FILE in files,
        }
        hashes = {name_: sha256_file(file) for name_, file in files.items()}
        written, card = write_bundle(files, card, out, markdown=_markdown(card, hashes))
    return ModelExport(path=written, sha256=sha256_file(written), bytes=written.stat().st_size, card=card)


def export_onnx(
    run: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] | None = None,
    which: str = "last",
    threads: int | None = None,
) -> OnnxExport:
    """Export one run's network to ONNX, verified against PyTorch.

    Args:
        run: a run folder, a checkpoint file, or a one-fold bundle.
        out: the ``.onnx`` file (default: beside the checkpoint, ``checkpoint_last.onnx``; then it is
            also the cache ``--runtime onnx`` uses).
        which: checkpoint of a run folder.
        threads: onnxruntime threads for the check.

    Raises:
        CheckpointError: an unreadable checkpoint, several folds (export them one by one), or an
            export that differs from PyTorch beyond the tolerance.
        MedsegUserError: onnx or onnxruntime missing.
    """
    paths = resolve_checkpoints(run, which=which)
    if len(paths) != 1:
        raise CheckpointError(f"{run}: holds {len(paths)} folds; export the ONNX network of one fold at a time")
    path = paths[0]
    content = load_checkpoint(path)
    cfg = content["plans"]["configurations"][content["config"]]
    labels = LabelSet.from_manifest(content["labels"]["labels"], regions=content["labels"].get("regions"))
    channels = len(content["plans"]["normalization"])
    network = build_network(cfg, in_channels=channels, out_channels=labels.num_classes)
    try:
        network.load_state_dict(content["model"])
    except RuntimeError as error:
        raise CheckpointError(
            f"{path}: weights do not fit the planned network ({str(error).splitlines()[0]})"
        ) from None
    digest = sha256_file(path)
    model, verification = export_network(
        network,
        plans_config=cfg,
        in_channels=channels,
        metadata={CHECKPOINT_SHA256_KEY: digest},
        source=str(path),
        threads=threads,
    )
    target = Path(out) if out is not None else path.with_suffix(".onnx")
    if target.suffix.lower() != ".onnx":
        raise MedsegUserError(f"{target}: an ONNX export is a .onnx file")
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as temporary:
        temporary.write_bytes(model)
    return OnnxExport(path=target, sha256=sha256_file(target), checkpoint=path, verification=verification)
