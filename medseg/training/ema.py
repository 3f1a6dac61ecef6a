"""An exponential moving average (EMA) of a network's weights, kept beside the trained weights.

After every optimiser step ``t`` (counted from 0) each floating-point entry of the state dict moves
towards the trained weights::

    d_t = min(decay, (1 + t) / (10 + t))        # warm-up: early averages forget the random start
    ema <- d_t * ema + (1 - d_t) * w

(integer entries, e.g. counters, are copied). ``decay = 0.999`` averages roughly the last 1000
steps. The average is what validation scores and what ``checkpoint_*.pt`` stores as ``model``, so
prediction, ensembles and export use it with no special case; the trained weights travel in the
checkpoint's ``training`` state for ``--resume``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["WeightAverage"]


class WeightAverage:
    """EMA of ``network``'s state dict (see the module docstring for the update rule).

    Args:
        network: the network being trained (its current weights start the average).
        decay: the largest ``d_t``, in (0, 1).
    """

    def __init__(self, network: torch.nn.Module, *, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.weights = {name: value.detach().clone() for name, value in network.state_dict().items()}

    @torch.no_grad()
    def update(self, network: torch.nn.Module) -> None:
        """One step of the average towards ``network``'s current weights."""
        rate = 1.0 - min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        averaged, current = [], []
        for name, value in network.state_dict().items():
            if value.is_floating_point():
                averaged.append(self.weights[name])
                current.append(value.detach())
            else:
                self.weights[name].copy_(value)
        if averaged:
            torch._foreach_lerp_(averaged, current, rate)
        self.updates += 1

    @contextmanager
    def applied(self, network: torch.nn.Module) -> Iterator[None]:
        """Run the block with the average loaded into ``network``; the trained weights come back after."""
        trained = {name: value.detach().clone() for name, value in network.state_dict().items()}
        network.load_state_dict(self.weights)
        try:
            yield
        finally:
            network.load_state_dict(trained)

    def cpu_weights(self) -> dict[str, torch.Tensor]:
        """The averaged state dict on the CPU (what a checkpoint stores as ``model``)."""
        return {name: value.detach().cpu() for name, value in self.weights.items()}

    def state(self) -> dict[str, Any]:
        """Counters for a checkpoint (the weights travel as its ``model``)."""
        return {"decay": self.decay, "updates": self.updates}

    def restore(self, weights: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> None:
        """Continue an average saved by :meth:`cpu_weights` and :meth:`state`."""
        for name, value in weights.items():
            self.weights[name].copy_(value)
        self.updates = int(state["updates"])
