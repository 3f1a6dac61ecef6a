"""`TrainOptions`: every option of a training run, in one frozen, JSON-able dataclass.

:func:`medseg.training.loop.train` takes them as keywords (the notebook and CLI view) and builds
one ``TrainOptions``; each fold's run receives that object unchanged, and ``resolved_config.json``
records it. Values left ``None`` come from the plans' ``training`` section.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from medseg.errors import MedsegUserError

__all__ = ["TrainOptions"]


@dataclass(frozen=True)
class TrainOptions:
    """Options of one training run (every fold of a ``fold="all-cv"`` run shares them).

    Attributes:
        config: ``"3d"`` or ``"2d"`` (a key of ``plans["configurations"]``).
        epochs: epochs; default the plans' ``training.epochs``, or unbounded with a time limit.
        time_limit_min: wall-clock training budget (minutes); the schedule is compressed into it.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        resume: continue from ``out_dir/checkpoint_last.pt``.
        seed: seed of sampling, augmentation and initialisation.
        batch_size: patches per iteration (default: the plans').
        iterations_per_epoch: iterations per epoch (default: the plans').
        validate_every: epochs between validations (default: the plans').
        learning_rate: initial learning rate (default: the plans').
        precision: ``auto`` (autocast where the hardware computes it natively: float16 on CUDA,
            bfloat16 on CPUs with AMX or AVX512-BF16), ``mixed`` (always) or ``float32`` (never);
            see :func:`medseg.model.device.autocast_dtype`. Default (None): float16 on CUDA,
            float32 on the CPU (bfloat16 CPU training is opt-in: see the README's benchmarks).
        ema_decay: keep an exponential moving average of the weights with this decay and validate,
            checkpoint and predict with it (:mod:`medseg.training.ema`); 0 turns it off. Default:
            the plans' ``training.ema_decay`` (0 when absent).
        max_epochs_this_run: stop after this many epochs in this call (the schedule still spans
            ``epochs``); resume later to continue.
        num_threads: torch CPU threads during training (restored afterwards); default unchanged.
        workers: threads preprocessing cases; default the CPUs available (at most 8).
        loader_workers: background processes making the batches (0 or 1; batches are identical
            either way). Default: 1 on CUDA, or when a CPU core is left free of torch's threads.
        progress: show a tqdm progress bar.
    """

    config: str = "3d"
    epochs: int | None = None
    time_limit_min: float | None = None
    device: str = "auto"
    resume: bool = False
    seed: int = 0
    batch_size: int | None = None
    iterations_per_epoch: int | None = None
    validate_every: int | None = None
    learning_rate: float | None = None
    ema_decay: float | None = None
    precision: str | None = None
    max_epochs_this_run: int | None = None
    num_threads: int | None = None
    workers: int | None = None
    loader_workers: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.time_limit_min is not None and not self.time_limit_min > 0:
            raise MedsegUserError(f"time limit must be > 0 minutes, got {self.time_limit_min}")
        for name in (
            "epochs",
            "batch_size",
            "iterations_per_epoch",
            "validate_every",
            "max_epochs_this_run",
            "num_threads",
            "workers",
        ):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise MedsegUserError(f"{name} must be a positive integer, got {value!r}")
        if self.loader_workers is not None and self.loader_workers not in (0, 1):
            raise MedsegUserError(f"loader_workers must be 0 or 1, got {self.loader_workers!r}")
        if self.precision not in (None, "auto", "mixed", "float32"):
            raise MedsegUserError(f"precision must be auto, mixed or float32, got {self.precision!r}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise MedsegUserError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise MedsegUserError(f"learning_rate must be > 0, got {self.learning_rate}")

    def to_json(self) -> dict[str, Any]:
        """Plain JSON."""
        return asdict(self)
