"""Segment-Anything backends on ``transformers`` models: SAM (incl. MedSAM ports), SAM-HQ and SAM2 images.

One class, :class:`SamImageBackend`, implements :class:`~medseg.refine.protocol.PromptBackend`
for the three families, which share the prompt encoder / mask decoder interface. What differs
is how an image is brought to the encoder's square input, and back:

==========  ==========================================================  =====================
family      image -> encoder input                                     masks -> slice
==========  ==========================================================  =====================
SAM, HQ     longest side resized to S, padded bottom/right to S x S     upsample to S, crop
                                                                        the padding, resize
SAM2        resized to S x S (aspect ratio not kept)                    resize to the slice
==========  ==========================================================  =====================

Pixel values are rescaled to [0, 1] and normalised by the folder's ``preprocessor_config.json``
(``image_mean``/``image_std``) when it has one, else by ImageNet's mean and std (what
``SamImageProcessor``/``Sam2ImageProcessor`` use). Points and boxes are scaled from slice pixels
to the resized image exactly as those processors do (``x * new_w / old_w``).

:class:`CachedBackend` wraps any backend and computes each slice's embedding once (per wrapper
object: a session, not a module-level cache). Loading from disk lives in
:mod:`medseg.refine.loading`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medseg.refine.protocol import MaskCandidate, PromptBackend, SlicePrompt

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CachedBackend",
    "ImageTransform",
    "SamImageBackend",
    "SliceEmbedding",
    "candidates_from_logits",
    "stability_score",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ResizeMode = Literal["longest_side", "square"]


@dataclass(frozen=True)
class ImageTransform:
    """How a slice of ``(height, width)`` pixels becomes the encoder's ``size x size`` input."""

    size: int
    mode: ResizeMode
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """The slice's shape after resizing (before padding)."""
        if self.mode == "square":
            return self.size, self.size
        scale = self.size / max(height, width)
        return int(height * scale + 0.5), int(width * scale + 0.5)

    def pixel_values(self, slice_rgb: np.ndarray) -> torch.Tensor:
        """``(1, 3, size, size)`` float32 encoder input of an ``(H, W, 3)`` uint8 slice."""
        rgb = np.asarray(slice_rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"a backend embeds (H, W, 3) RGB slices, got shape {rgb.shape}")
        image = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        new_h, new_w = self.resized_shape(rgb.shape[0], rgb.shape[1])
        if (new_h, new_w) != rgb.shape[:2]:
            image = F.interpolate(image, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        image = (image - mean) / std
        if self.mode == "longest_side":
            image = F.pad(image, (0, self.size - new_w, 0, self.size - new_h))
        return image

    def scale_rc(self, height: int, width: int) -> tuple[float, float]:
        """Factors taking slice (row, col) pixel positions to the resized image."""
        new_h, new_w = self.resized_shape(height, width)
        return new_h / height, new_w / width

    def logits_to_slice(self, low_res: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``(N, h, w)`` decoder logits -> ``(N, height, width)`` logits on the slice grid."""
        logits = low_res[None].float()
        if self.mode == "longest_side":
            new_h, new_w = self.resized_shape(height, width)
            logits = F.interpolate(logits, size=(self.size, self.size), mode="bilinear", align_corners=False)
            logits = logits[..., :new_h, :new_w]
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        return logits[0]


@dataclass(frozen=True)
class SliceEmbedding:
    """A slice's image embedding and what is needed to map prompts and masks to and from it."""

    features: Any
    height: int
    width: int


def stability_score(logits: np.ndarray | torch.Tensor, *, threshold: float = 0.0, offset: float = 1.0) -> float:
    """SAM's stability score: IoU of the masks at ``logits > threshold + offset`` and ``> threshold - offset``.

    The first mask lies inside the second, so the IoU is the ratio of their areas; 0 when both are empty.
    """
    values = torch.as_tensor(logits)
    inner = int((values > threshold + offset).sum())
    outer = int((values > threshold - offset).sum())
    return float(inner / outer) if outer else 0.0


def candidates_from_logits(logits: torch.Tensor, scores: Sequence[float]) -> list[MaskCandidate]:
    """:class:`MaskCandidate` objects for ``(N, H, W)`` slice logits and N predicted IoUs, best first."""
    candidates = []
    for index in range(logits.shape[0]):
        values = logits[index].detach().float().cpu().numpy().astype(np.float32, copy=False)
        candidates.append(
            MaskCandidate(
                mask=values > 0,
                predicted_iou=float(min(max(scores[index], 0.0), 1.0)),
                stability=stability_score(values),
                logits=values,
            )
        )
    return sorted(candidates, key=lambda c: -c.predicted_iou)


class SamImageBackend:
    """Embed-once, decode-many access to a ``SamModel``, ``SamHQModel`` or ``Sam2Model``.

    Args:
        model: the loaded transformers model (in eval mode).
        kind: ``"sam"``, ``"sam_hq"`` or ``"sam2"`` (config.json's ``model_type``).
        transform: how slices are resized and normalised for this model.
        device: where the model runs.
        source: the checkpoint path (for messages and records).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        kind: str,
        transform: ImageTransform,
        device: torch.device | str = "cpu",
        source: str = "",
    ) -> None:
        if kind not in ("sam", "sam_hq", "sam2"):
            raise ValueError(f"SamImageBackend serves sam, sam_hq and sam2 models, got {kind!r}")
        self.kind = kind
        self.name = f"{kind}:{source}" if source else kind
        self.source = source
        self.transform = transform
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    @torch.no_grad()
    def embed(self, slice_rgb: np.ndarray) -> SliceEmbedding:
        """Run the image encoder on one ``(H, W, 3)`` uint8 slice."""
        pixels = self.transform.pixel_values(slice_rgb).to(self.device)
        features = self.model.get_image_embeddings(pixels)
        return SliceEmbedding(features=features, height=int(slice_rgb.shape[0]), width=int(slice_rgb.shape[1]))

    @torch.no_grad()
    def decode(self, embedding: SliceEmbedding, prompt: SlicePrompt, *, multimask: bool = True) -> list[MaskCandidate]:
        """Candidate masks for one prompt, best first by predicted IoU."""
        inputs = self._prompt_tensors(prompt, embedding.height, embedding.width)
        if self.kind == "sam_hq":
            image_embeddings, intermediate = embedding.features
            inputs["intermediate_embeddings"] = intermediate
        else:
            image_embeddings = embedding.features
        output = self.model(image_embeddings=image_embeddings, multimask_output=multimask, **inputs)
        low_res = output.pred_masks[0, 0]  # (num_masks, h, w)
        scores = output.iou_scores[0, 0].float().cpu().tolist()
        logits = self.transform.logits_to_slice(low_res, embedding.height, embedding.width)
        return candidates_from_logits(logits, scores)

    def _prompt_tensors(self, prompt: SlicePrompt, height: int, width: int) -> dict[str, torch.Tensor]:
        scale_r, scale_c = self.transform.scale_rc(height, width)
        inputs: dict[str, torch.Tensor] = {}
        if prompt.points_rc is not None and len(prompt.points_rc):
            points_rc = np.asarray(prompt.points_rc, dtype=np.float32).reshape(-1, 2)
            labels = (
                np.ones(len(points_rc), np.int64)
                if prompt.point_labels is None
                else np.asarray(prompt.point_labels, dtype=np.int64).reshape(-1)
            )
            xy = np.stack([points_rc[:, 1] * scale_c, points_rc[:, 0] * scale_r], axis=1)
            inputs["input_points"] = torch.from_numpy(xy).view(1, 1, -1, 2).to(self.device)
            inputs["input_labels"] = torch.from_numpy(labels).view(1, 1, -1).to(self.device)
        if prompt.box_rc is not None:
            r0, c0, r1, c1 = (float(v) for v in prompt.box_rc)
            box = [c0 * scale_c, r0 * scale_r, c1 * scale_c, r1 * scale_r]
            inputs["input_boxes"] = torch.tensor([[box]], dtype=torch.float32, device=self.device)
        if not inputs:
            raise ValueError("a SlicePrompt needs points or a box")
        return inputs

    def __repr__(self) -> str:
        return f"SamImageBackend(kind={self.kind!r}, input={self.transform.size}, source={self.source!r})"


class CachedBackend:
    """Wrap a backend so each distinct slice is embedded once (for the lifetime of this object).

    Slices are keyed by a hash of their bytes and shape, so the same slice windowed the same way
    hits the cache whoever asks. ``encoder_calls`` counts the embeddings actually computed.
    """

    def __init__(self, backend: PromptBackend, *, max_slices: int | None = None) -> None:
        self.backend = backend
        self.name = getattr(backend, "name", type(backend).__name__)
        self.max_slices = max_slices
        self.encoder_calls = 0
        self._embeddings: dict[str, Any] = {}

    def embed(self, slice_rgb: np.ndarray) -> Any:
        """The cached embedding of ``slice_rgb``, computed on first use."""
        array = np.ascontiguousarray(slice_rgb)
        key = hashlib.sha1(array.tobytes() + str(array.shape).encode()).hexdigest()
        if key not in self._embeddings:
            if self.max_slices is not None and len(self._embeddings) >= self.max_slices:
                self._embeddings.pop(next(iter(self._embeddings)))
            self._embeddings[key] = self.backend.embed(array)
            self.encoder_calls += 1
        return self._embeddings[key]

    def decode(self, embedding: Any, prompt: SlicePrompt, *, multimask: bool = True) -> list[MaskCandidate]:
        """Decode with the wrapped backend."""
        return self.backend.decode(embedding, prompt, multimask=multimask)

    def __getattr__(self, name: str) -> Any:  # kind, source, model, ... of the wrapped backend
        if name == "backend":
            raise AttributeError(name)
        return getattr(self.backend, name)
