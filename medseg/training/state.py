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
from medseg.training.ema import WeightAverage

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


def restore_run(
    checkpoint: Mapping[str, Any],
    *,
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    average: WeightAverage | None,
    seed: int,
    world_size: int,
    path: Path,
) -> dict[str, Any]:
    """Put a run back where ``checkpoint_last.pt`` (``path``, loaded as ``checkpoint``) stopped.

    Restores the trained weights (with an EMA, ``"model"`` holds the average that prediction uses and
    the training state the trained weights), the EMA, the optimiser, the gradient scaler (``None``:
    not used) and every random generator, and returns the counters: ``epoch``, ``iteration``,
    ``elapsed_s``, ``best_dice``, ``best_epoch``, ``history``.

    Raises:
        MedsegUserError: the run was trained with(out) an EMA, another seed, or another number of
            processes than this resumption would use: it would not continue the same run.
    """
    state = checkpoint["training"]
    network.load_state_dict(state.get("network", checkpoint["model"]))
    if average is not None:
        if "ema" not in state:
            raise MedsegUserError(f"{path}: run was trained without an EMA; resume it without ema_decay")
        average.restore(checkpoint["model"], state["ema"])
    elif "ema" in state:
        raise MedsegUserError(f"{path}: run was trained with an EMA; resume it with the same ema_decay")
    optimizer.load_state_dict(state["optimizer"])
    if "scaler" in state and scaler is not None:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    saved_seed = state.get("seed")
    if saved_seed is not None and int(saved_seed) != int(seed):
        raise MedsegUserError(
            f"{path}: run was started with seed {int(saved_seed)}; resume with the same --seed "
            f"(got {seed}) or it would not continue the same run"
        )
    saved_world_size = int(state.get("world_size", 1))
    if saved_world_size != world_size:
        raise MedsegUserError(
            f"{path}: run was trained by {saved_world_size} process(es); resume it with as many "
            f"(got {world_size}) or it would not continue the same run"
        )
    return {
        "epoch": int(state["epoch"]),
        "iteration": int(state["iteration"]),
        "elapsed_s": float(state["elapsed_s"]),
        "best_dice": float(state["best_dice"]),
        "best_epoch": int(state["best_epoch"]),
        "history": [dict(row) for row in state["history"]],
    }


def run_snapshot(
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    average: WeightAverage | None,
    *,
    counters: Mapping[str, Any],
    facts: Mapping[str, Any],
) -> dict[str, Any]:
    """What ``checkpoint_*.pt`` holds: ``model`` (the weights prediction uses: the EMA's when there is
    one), the run's ``facts`` (plans, config, labels, channels, fold) and ``training``: the optimiser,
    the ``counters`` (epoch, iteration, elapsed_s, best_dice, best_epoch, history, seed, world_size),
    every random generator's state, the gradient scaler's (``None``: not used) and, with an EMA, the
    trained weights and the EMA's state, so that :func:`restore_run` continues exactly."""
    training_state = {"optimizer": optimizer.state_dict(), **counters, "rng": rng_state()}
    if scaler is not None:
        training_state["scaler"] = scaler.state_dict()
    trained = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    if average is not None:
        training_state["network"] = trained
        training_state["ema"] = average.state()
    model = average.cpu_weights() if average is not None else trained
    return {"model": model, **facts, "training": training_state}
