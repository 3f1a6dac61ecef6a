"""The pieces of a training run's state: optimizer, random-number states, history, background loading.

Small helpers of :mod:`medseg.training.loop`, kept apart so the loop reads as the schedule it is.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from medseg.errors import MedsegUserError
from medseg.io.files import write_text

__all__ = ["loader_workers", "make_optimizer", "rng_state", "set_rng_state", "write_history"]


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def make_optimizer(network: torch.nn.Module, settings: Mapping[str, Any], lr0: float) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (default, nnU-Net) or AdamW, from the plans' ``training`` section."""
    name = str(settings.get("optimizer", "sgd")).lower()
    weight_decay = float(settings.get("weight_decay", 3e-5))
    if name == "sgd":
        return torch.optim.SGD(
            network.parameters(),
            lr=lr0,
            momentum=float(settings.get("momentum", 0.99)),
            nesterov=bool(settings.get("nesterov", True)),
            weight_decay=weight_decay,
        )
    if name == "adamw":
        return torch.optim.AdamW(network.parameters(), lr=lr0, weight_decay=weight_decay)
    raise MedsegUserError(f"plans: training.optimizer must be 'sgd' or 'adamw', got {name!r}")


def write_history(history: list[dict[str, Any]], path: Path) -> None:
    columns: list[str] = []
    for row in history:
        columns += [c for c in row if c not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(history)
    write_text(buffer.getvalue(), path)


def loader_workers(requested: int | None, *, device: torch.device) -> int:
    """Background batch workers: as asked, else 1 when a core is free of torch's threads (always on CUDA)."""
    if requested is not None:
        return min(int(requested), 1)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    return 1 if device.type == "cuda" or cores > torch.get_num_threads() else 0
