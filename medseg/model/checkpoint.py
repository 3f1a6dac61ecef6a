"""Checkpoints: tensors and plain values only, written atomically, read with ``weights_only=True``.

A checkpoint is a dict:

=====================  =====================================================================
key                    value
=====================  =====================================================================
``format``             ``"medseg-checkpoint"``
``format_version``     :data:`CHECKPOINT_FORMAT_VERSION`; a newer one is refused
``medseg_version``     the version that wrote it
``model``              the network's state dict
``plans``, ``config``  the plans (plain JSON) and the configuration name (``"3d"`` / ``"2d"``)
``labels``             the label map and regions (``LabelSet.to_json()``)
``channels``           input channel names
``training``           optimizer state, epoch, iteration, elapsed seconds, best metric, history,
                       RNG states (torch CPU/CUDA as uint8 tensors, numpy's as a tensor + ints)
=====================  =====================================================================

Nothing in it needs unpickling of arbitrary classes, so ``torch.load(path, weights_only=True)``
reads it; :func:`load_checkpoint` turns every failure into a :class:`CheckpointError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from medseg import __version__
from medseg.errors import CheckpointError
from medseg.io.files import atomic_path
from medseg.model.bundle import bundle_checkpoints, is_bundle

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_FORMAT_VERSION",
    "save_checkpoint",
    "load_checkpoint",
    "load_fold_checkpoints",
    "resolve_checkpoint",
    "resolve_checkpoints",
]

CHECKPOINT_FORMAT = "medseg-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1


def save_checkpoint(content: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a checkpoint atomically, adding ``format``, ``format_version`` and ``medseg_version``.

    Args:
        content: tensors and plain values only (dict, list, str, int, float, bool, None).
        path: target file (``.pt``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "medseg_version": __version__,
        **dict(content),
    }
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)
    return path


def resolve_checkpoint(path: str | os.PathLike[str], *, which: str = "best") -> Path:
    """A checkpoint file, or ``checkpoint_{which}.pt`` inside a run folder."""
    path = Path(path)
    if path.is_dir():
        candidate = path / f"checkpoint_{which}.pt"
        if not candidate.is_file():
            raise CheckpointError(f"{path}: run folder holds no checkpoint_{which}.pt")
        return candidate
    return path


def load_checkpoint(
    path: str | os.PathLike[str], *, which: str = "best", map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` and check its format.

    Args:
        path: a checkpoint file, or a run folder (then ``checkpoint_{which}.pt``).
        which: ``"best"`` or ``"last"`` when ``path`` is a folder.
        map_location: where tensors are loaded.

    Raises:
        CheckpointError: missing file, not a checkpoint, truncated or corrupt file, not a medseg
            checkpoint, or a newer format version than this medseg reads.
    """
    path = resolve_checkpoint(path, which=which)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        content = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # zip errors, unpickling errors, EOF: all mean "not readable"
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated, corrupt or not a torch file: {message[:200]})"
        ) from None
    if not isinstance(content, dict) or content.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a medseg checkpoint (no format {CHECKPOINT_FORMAT!r})")
    version = content.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: checkpoint has no integer format_version")
    if version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version} is newer than this medseg reads "
            f"({CHECKPOINT_FORMAT_VERSION}); upgrade medseg (written by medseg "
            f"{content.get('medseg_version', 'unknown')})"
        )
    for key in ("model", "plans", "config", "labels"):
        if key not in content:
            raise CheckpointError(f"{path}: medseg checkpoint lacks {key!r}")
    return content


def load_fold_checkpoints(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Load the checkpoints of one model's folds (an ensemble) and check they belong together.

    Raises:
        CheckpointError: a checkpoint that cannot be read (see :func:`load_checkpoint`), or one whose
            plans, configuration or label map differ from the first's: folds of one model share them.
    """
    contents: list[dict[str, Any]] = []
    for path in paths:
        content = load_checkpoint(path)
        if contents:
            for key in ("plans", "config", "labels"):
                if content[key] != contents[0][key]:
                    raise CheckpointError(
                        f"{path}: {key} differ from those of {paths[0]}; folds of one model must share them"
                    )
        contents.append(content)
    return contents


def resolve_checkpoints(
    model: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *, which: str = "last"
) -> list[Path]:
    """Checkpoint files of a model given as a file, a run folder, a folder of ``fold_K`` runs, a bundle, or a list.

    A model bundle (``model.zip`` from ``medseg export``) is checked file by file against its model
    card and extracted to a cache (:func:`medseg.model.bundle.open_bundle`); its checkpoints are the
    ones it was exported with, whatever ``which`` says.

    Raises:
        CheckpointError: a path that is neither a checkpoint nor a run folder holding one; a bundle
            that is unsafe, incomplete or changed.
    """
    items = [model] if isinstance(model, (str, os.PathLike)) else list(model)
    if not items:
        raise CheckpointError("no model given")
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if is_bundle(path):
            found += bundle_checkpoints(path)
        elif path.is_file():
            found.append(path)
        elif (path / f"checkpoint_{which}.pt").is_file():
            found.append(path / f"checkpoint_{which}.pt")
        elif path.is_dir():
            folds = sorted(
                p / f"checkpoint_{which}.pt" for p in path.glob("fold_*") if (p / f"checkpoint_{which}.pt").is_file()
            )
            if not folds:
                raise CheckpointError(f"{path}: holds neither checkpoint_{which}.pt nor fold_*/checkpoint_{which}.pt")
            found += folds
        else:
            raise CheckpointError(f"{path}: checkpoint not found")
    return found
