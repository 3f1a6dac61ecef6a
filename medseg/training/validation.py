"""Validation during training: the fold's validation cases predicted and scored per structure.

The score decides ``checkpoint_best.pt``. It is computed on the preprocessed grid (the grid the
network sees), so it can differ slightly from a ``medseg predict`` + ``medseg evaluate`` run in the
input geometry; both use the one sliding-window engine.
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from medseg.metrics.overlap import dice_per_structure
from medseg.model.windows import sliding_window_logits
from medseg.training.data import CaseCache

__all__ = ["estimate_validation_seconds", "validate"]


def validate(
    network: torch.nn.Module,
    cache: CaseCache,
    *,
    cfg: Mapping[str, Any],
    structures: Sequence[tuple[str, Sequence[int]]],
    device: torch.device,
    amp_dtype: torch.dtype | None,
    num_classes: int,
) -> dict[str, float]:
    """Mean Dice per structure (and their mean, ``"mean"``) over the validation cases.

    Each case is predicted on its preprocessed grid by the same sliding-window engine prediction
    uses (:func:`medseg.model.windows.sliding_window_logits`, TTA off) and scored by
    :func:`medseg.metrics.overlap.dice_per_structure` (NaN for a structure absent from both maps,
    excluded from the mean over cases).
    """
    scores: dict[str, list[float]] = {name: [] for name, _ in structures}
    for index in range(len(cache)):
        item = cache[index]
        logits = sliding_window_logits(
            network,
            item["image"],
            plans_config=cfg,
            num_classes=num_classes,
            device=device,
            amp_dtype=amp_dtype,
            sw_batch_size=int(cfg.get("batch_size", 2)),
        )
        prediction = logits.argmax(0).cpu().numpy()
        reference = item["label"][0].numpy()
        for name, value in dice_per_structure(reference, prediction, structures=structures).items():
            scores[name].append(value)
    result = {}
    for name, values in scores.items():
        finite = [v for v in values if not math.isnan(v)]
        result[name] = float(np.mean(finite)) if finite else float("nan")
    finite = [v for v in result.values() if not math.isnan(v)]
    result["mean"] = float(np.mean(finite)) if finite else float("nan")
    return result


def estimate_validation_seconds(
    network: torch.nn.Module,
    cache: CaseCache,
    *,
    cfg: Mapping[str, Any],
    device: torch.device,
    amp_dtype: torch.dtype | None,
    num_classes: int,
    timed_slices: int = 16,
) -> float:
    """Seconds a validation of every case in ``cache`` will take, from (part of) the first case.

    A wall-clock budget reserves this for the final validation. A small warm-up pays the one-off
    start-up costs first, then:

    * 2D configurations: the middle ``timed_slices`` slices of the first case are timed and scaled
      by ``slices / timed_slices`` (windows cost the same on every slice; the middle ones hold the
      anatomy, which is where a detector's work is);
    * 3D configurations: the whole first case is timed.

    The estimate is that time x cases x 1.1. A randomly initialised detector (``maskrcnn``) answers
    slower than a trained one (every window is full of low-score detections), so for it the reserve
    errs on the safe side.
    """

    def seconds(image: torch.Tensor) -> float:
        start = time.monotonic()
        sliding_window_logits(
            network,
            image,
            plans_config=cfg,
            device=device,
            amp_dtype=amp_dtype,
            num_classes=num_classes,
            sw_batch_size=int(cfg.get("batch_size", 2)),
        )
        return time.monotonic() - start

    image = torch.as_tensor(cache[0]["image"])
    if int(cfg["spatial_dims"]) == 2 and image.ndim == 4:
        axis = int(cfg["slice_axis"]) + 1
        slices = image.shape[axis]
        count = max(1, min(slices, timed_slices))
        first = (slices - count) // 2
        seconds(image.narrow(axis, first + count // 2, 1))  # warm-up: one slice
        per_case = seconds(image.narrow(axis, first, count)) * slices / count
    else:
        patch = [int(p) for p in cfg["patch_size"]]
        seconds(image[(slice(None), *(slice(0, p) for p in patch))])  # warm-up: one window
        per_case = seconds(image)
    return per_case * len(cache) * 1.1
