"""The network side: devices, network builders, MONAI transform chains, checkpoints, the sliding-window engine.

``model`` owns everything that touches a network but not a training or prediction run: choosing
the device (:mod:`~medseg.model.device`), building the planned network
(:mod:`~medseg.model.networks`: the U-Net, or FCN / DeepLabV3+ from
:mod:`~medseg.model.architectures`), the MONAI transform chains for preprocessing and augmentation
(:mod:`~medseg.model.transforms`), writing and reading checkpoints safely
(:mod:`~medseg.model.checkpoint`, ``weights_only=True``) and the one sliding-window + mirroring-TTA
engine that training validation and prediction share (:mod:`~medseg.model.windows`). It imports
torch and MONAI; training and inference build on it.
"""

from __future__ import annotations

from medseg.model.checkpoint import load_checkpoint, resolve_checkpoints, save_checkpoint
from medseg.model.device import select_device
from medseg.model.networks import build_network, deep_supervision_outputs
from medseg.model.windows import sliding_window_logits

__all__ = [
    "build_network",
    "deep_supervision_outputs",
    "load_checkpoint",
    "resolve_checkpoints",
    "save_checkpoint",
    "select_device",
    "sliding_window_logits",
]
