"""The training objective of a network: one call from a batch to a scalar loss, for every architecture.

* Dense networks (``dynunet``, ``fcn``, ``deeplabv3plus``): Dice + cross-entropy
  (MONAI ``DiceCELoss``: softmax, background excluded from the Dice term, batch Dice, smoothing
  1e-5) on every deep-supervision head, the heads weighted ``2^-k`` and normalised
  (``DeepSupervisionLoss(weight_mode="exp")``), as nnU-Net.
* Networks that compute their own loss (``computes_own_loss = True``: Mask R-CNN's summed
  detector losses, :class:`~medseg.model.architectures.maskrcnn.MaskRCNNSegmenter`) are called
  as ``model(images, labels)``.

The training loop calls ``objective(model, images, labels)`` under autocast and never asks which
architecture it trains.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from medseg.model.networks import deep_supervision_outputs

__all__ = ["Objective", "make_objective"]

#: ``objective(model, images, labels) -> loss``: ``model`` may be the DDP wrapper of the network
Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def make_objective(network: nn.Module, plans_config: Mapping[str, Any]) -> Objective:
    """The objective of ``network`` (built from ``plans_config``); see the module docstring."""
    if getattr(network, "computes_own_loss", False):
        return lambda model, images, labels: model(images, labels)
    from monai.losses import DeepSupervisionLoss, DiceCELoss

    loss_fn = DeepSupervisionLoss(
        DiceCELoss(
            include_background=False, to_onehot_y=True, softmax=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5
        ),
        weight_mode="exp",
    )
    spatial_dims = int(plans_config["spatial_dims"])

    def dense(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        outputs = deep_supervision_outputs(model(images), spatial_dims=spatial_dims)
        return loss_fn([o.float() for o in outputs], labels)

    return dense
