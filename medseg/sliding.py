"""Sliding-window prediction on a preprocessed image: the shared core of validation and inference.

3D configurations slide a patch-sized window (Gaussian blending, MONAI
``SlidingWindowInferer``); 2D configurations run the 2D network on every slice along the plans'
``slice_axis`` (the slices go through the same 2D sliding window as a batch). Optional mirroring
test-time augmentation averages the softmax over flips of every spatial axis combination.

Example:
    >>> probabilities = predict_probabilities(net, image, plans_config=plans["configurations"]["3d"])  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping

import torch
from monai.inferers import SlidingWindowInferer

__all__ = ["predict_probabilities"]


def _inferer(patch: list[int], *, overlap: float, batch: int, device: torch.device) -> SlidingWindowInferer:
    return SlidingWindowInferer(
        roi_size=patch,
        sw_batch_size=batch,
        overlap=overlap,
        mode="gaussian",
        sigma_scale=0.125,
        padding_mode="constant",
        cval=0.0,
        sw_device=device,
        device=torch.device("cpu"),
    )


@torch.no_grad()
def predict_probabilities(
    network: torch.nn.Module,
    image: torch.Tensor,
    *,
    plans_config: Mapping[str, Any],
    device: str | torch.device = "cpu",
    overlap: float = 0.5,
    mirror: bool = False,
    amp: bool = False,
    sw_batch_size: int = 2,
) -> torch.Tensor:
    """Softmax probabilities ``(classes, *spatial)`` of a preprocessed ``(C, *spatial)`` image.

    Args:
        network: the trained network (put in eval mode here).
        image: one preprocessed case, channel-first, 3 spatial axes (for 2D configurations too).
        plans_config: the configuration of the plans (``spatial_dims``, ``patch_size``, ``slice_axis``).
        device: where the network runs; the result is on the CPU.
        overlap: fraction of window overlap.
        mirror: average over flips of every combination of spatial axes (test-time augmentation).
        amp: float16 autocast (CUDA only).
        sw_batch_size: windows per forward pass.
    """
    device = torch.device(device)
    network.eval()
    patch = [int(p) for p in plans_config["patch_size"]]
    dims = int(plans_config["spatial_dims"])
    inferer = _inferer(patch, overlap=overlap, batch=sw_batch_size, device=device)
    x = torch.as_tensor(image).float()
    if hasattr(x, "as_tensor"):
        x = x.as_tensor()
    if dims == 2:
        slice_axis = int(plans_config["slice_axis"])
        # (C, X, Y, Z) -> (slices, C, H, W)
        batch = torch.movedim(x, slice_axis + 1, 0)
    else:
        batch = x[None]

    def run(inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp and device.type == "cuda"):
            logits = inferer(inputs, network)
        return torch.softmax(logits.float(), dim=1)

    flips: list[tuple[int, ...]] = [()]
    if mirror:
        axes = [a + 2 for a in range(dims)]
        flips = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]
    total = None
    for axes in flips:
        inputs = torch.flip(batch, axes) if axes else batch
        probs = run(inputs)
        probs = torch.flip(probs, axes) if axes else probs
        total = probs if total is None else total + probs
    probabilities = total / len(flips)
    if dims == 2:
        return torch.movedim(probabilities, 0, int(plans_config["slice_axis"]) + 1)
    return probabilities[0]
