"""SAM3 (``Sam3Model``): segmentation from a text concept prompt ("liver", "tumour").

SAM3 detects every instance of a named concept in an image. Its folder must hold the tokenizer
files next to the weights (as a ``save_pretrained`` of the processor or tokenizer writes them);
nothing is downloaded. An instance is kept when its score (query score x presence score, as
``Sam3Processor.post_process_instance_segmentation`` computes it) reaches the threshold.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medseg.refine.backends import ImageTransform, SliceEmbedding, stability_score
from medseg.refine.prompts import PromptError
from medseg.refine.protocol import MaskCandidate, SlicePrompt

__all__ = ["Sam3TextBackend"]

#: SAM3's processor pads text to this many tokens
TEXT_LENGTH = 32


class Sam3TextBackend:
    """Embed a slice once, then ask for any number of text concepts on it."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        transform: ImageTransform,
        device: torch.device | str = "cpu",
        source: str = "",
    ) -> None:
        self.kind = "sam3"
        self.name = f"sam3:{source}" if source else "sam3"
        self.source = source
        self.tokenizer = tokenizer
        self.transform = transform
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    @torch.no_grad()
    def embed(self, slice_rgb: np.ndarray) -> SliceEmbedding:
        """SAM3's vision features of one ``(H, W, 3)`` uint8 slice."""
        pixels = self.transform.pixel_values(slice_rgb).to(self.device)
        features = self.model.get_vision_features(pixel_values=pixels)
        return SliceEmbedding(features=features, height=int(slice_rgb.shape[0]), width=int(slice_rgb.shape[1]))

    def decode(self, embedding: SliceEmbedding, prompt: SlicePrompt, *, multimask: bool = True) -> list[MaskCandidate]:
        """SAM3 is prompted by text here; points and boxes need a SAM, SAM-HQ or SAM2 checkpoint."""
        raise PromptError(
            f"{self.source or 'SAM3'}: a SAM3 checkpoint takes --text prompts; use SAM/SAM2 for points and boxes"
        )

    @torch.no_grad()
    def decode_text(self, embedding: SliceEmbedding, text: str, *, threshold: float = 0.5) -> list[MaskCandidate]:
        """The instances of concept ``text`` on an embedded slice scoring at least ``threshold``, best first."""
        tokens = self.tokenizer(
            [text], padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="pt"
        )
        output = self.model(
            vision_embeds=embedding.features,
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
        )
        scores = output.pred_logits[0].float().sigmoid()
        if getattr(output, "presence_logits", None) is not None:
            scores = scores * output.presence_logits[0].float().sigmoid().reshape(-1)[0]
        keep = torch.nonzero(scores >= threshold).reshape(-1)
        if keep.numel() == 0:
            return []
        low_res = output.pred_masks[0, keep].float()[None]
        logits = F.interpolate(low_res, size=(embedding.height, embedding.width), mode="bilinear", align_corners=False)[
            0
        ]
        candidates = []
        for row, query in enumerate(keep.tolist()):
            values = logits[row].cpu().numpy().astype(np.float32)
            candidates.append(
                MaskCandidate(
                    mask=values > 0,
                    predicted_iou=float(scores[query]),
                    stability=stability_score(values),
                    logits=values,
                )
            )
        return sorted(candidates, key=lambda c: -c.predicted_iou)
