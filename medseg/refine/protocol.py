"""The one small protocol every Segment-Anything backend implements.

A backend embeds one 2D slice once (the image encoder: the expensive part) and then decodes
any number of prompts against that embedding (the prompt encoder and mask decoder: ~50 ms).
Adding a backend is one class with these two methods.

Coordinates are the slice array's own: a slice is an ``(H, W)`` array, ``row`` indexes its
first axis and ``col`` its second. Points are ``(row, col)`` pairs; boxes are
``(row0, col0, row1, col1)`` with both corners inside the box (inclusive). Backends convert
to SAM's ``(x, y)`` = ``(col, row)`` convention themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["MaskCandidate", "PromptBackend", "SlicePrompt"]


@dataclass(frozen=True)
class SlicePrompt:
    """Prompts for one slice: positive/negative points and at most one box, all in slice indices.

    ``points_rc``: ``(N, 2)`` float array of ``(row, col)``; ``point_labels``: ``(N,)`` int array,
    1 = inside the object, 0 = outside. ``box_rc``: ``(row0, col0, row1, col1)`` or ``None``.
    """

    points_rc: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    box_rc: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class MaskCandidate:
    """One mask a backend proposes for a prompt.

    ``mask``: boolean ``(H, W)`` in the slice's grid. ``predicted_iou``: the model's own estimate
    of the mask's IoU with the object (SAM's IoU head), in [0, 1]. ``stability``: the stability
    score, IoU between the masks thresholded at logit +1 and -1 (SAM's definition), in [0, 1].
    ``logits``: float32 ``(H, W)`` mask logits at the slice's resolution.
    """

    mask: np.ndarray
    predicted_iou: float
    stability: float
    logits: np.ndarray


@runtime_checkable
class PromptBackend(Protocol):
    """Embed a slice once, decode many prompts against it."""

    name: str

    def embed(self, slice_rgb: np.ndarray) -> Any:
        """The image embedding of one ``(H, W, 3)`` uint8 slice (already windowed to 0..255)."""
        ...

    def decode(self, embedding: Any, prompt: SlicePrompt, *, multimask: bool = True) -> list[MaskCandidate]:
        """The candidate masks for one prompt on an embedded slice, best first by predicted IoU."""
        ...
