"""Training: one fold (or every fold) of a planned network, seeded, resumable, validated, checkpointed.

``training`` owns ``medseg train``: the run's options as one frozen dataclass
(:mod:`~medseg.training.options`), the cached cases and patch batches
(:mod:`~medseg.training.data`), validation with the shared sliding-window engine
(:mod:`~medseg.training.validation`) and the loop with its schedule, checkpoints and history
(:mod:`~medseg.training.loop`), run by one process or by several under ``torchrun``
(:mod:`~medseg.training.distributed`). It builds on ``model`` and ``planning``.
"""

from __future__ import annotations

from medseg.training.loop import train, train_fold
from medseg.training.options import TrainOptions

__all__ = ["TrainOptions", "train", "train_fold"]
