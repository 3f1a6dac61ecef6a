"""Where networks run: the device choice every torch stage shares.

``"auto"`` takes the first CUDA GPU when torch sees one and the CPU otherwise; asking for
``"cuda"`` without a GPU is a user error, never a silent fall-back to the CPU.
"""

from __future__ import annotations

import torch

from medseg.errors import MedsegUserError

__all__ = ["select_device"]


def select_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MedsegUserError("device 'cuda' asked for, but torch sees no CUDA GPU")
    if device != "cpu" and not device.startswith("cuda"):
        raise MedsegUserError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    return torch.device(device)
