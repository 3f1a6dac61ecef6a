"""SAM2 video propagation through the slices of a volume (``Sam2VideoModel``).

The slices along one axis are treated as the frames of a video. The user's prompt goes on a key
slice; SAM2's memory carries the object to the next slice, and the next, in both directions from
the key slice, and stops at the first slice where the object is gone (an empty mask, or SAM2's
object score saying "not present"). Slices beyond are never segmented.

Frames are prepared lazily, one slice at a time, so a long volume never sits in memory as a
``(T, 3, S, S)`` float tensor. transformers' ``Sam2VideoProcessor`` needs torchvision, so the
prompt encoding it does (points scaled to the ``S x S`` input; a box as two points labelled 2
and 3) is done here directly.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from medseg.refine.backends import ImageTransform, SliceEmbedding, candidates_from_logits
from medseg.refine.protocol import MaskCandidate, SlicePrompt

__all__ = ["Sam2VideoBackend"]


class _LazyFrames(Mapping[int, torch.Tensor]):
    """The session's frames, each made from its slice when SAM2 asks for it (not kept)."""

    def __init__(self, count: int, make: Callable[[int], torch.Tensor]) -> None:
        self._count = count
        self._make = make

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self._count:
            raise KeyError(index)
        return self._make(index)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[int]:
        return iter(range(self._count))


class Sam2VideoBackend:
    """A ``Sam2VideoModel``: slice-by-slice prompts (the protocol) and propagation through a volume.

    ``embed``/``decode`` run each prompt as a one-frame video (so the encoder runs in ``decode``;
    ``embed`` only prepares the pixels). :meth:`propagate` is the reason to load this model.
    """

    def __init__(
        self, model: torch.nn.Module, *, transform: ImageTransform, device: torch.device | str = "cpu", source: str = ""
    ) -> None:
        self.kind = "sam2_video"
        self.name = f"sam2_video:{source}" if source else "sam2_video"
        self.source = source
        self.transform = transform
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    # -- the protocol --------------------------------------------------------------------------
    def embed(self, slice_rgb: np.ndarray) -> SliceEmbedding:
        """The slice's encoder input (the encoder itself runs when decoding)."""
        pixels = self.transform.pixel_values(slice_rgb)[0]
        return SliceEmbedding(features=pixels, height=int(slice_rgb.shape[0]), width=int(slice_rgb.shape[1]))

    @torch.no_grad()
    def decode(self, embedding: SliceEmbedding, prompt: SlicePrompt, *, multimask: bool = True) -> list[MaskCandidate]:
        """One candidate: SAM2's mask for the prompt; ``predicted_iou`` is its object-presence probability."""
        session = self._session(1, lambda _: embedding.features, embedding.height, embedding.width)
        self._add_prompt(session, 0, prompt, embedding.height, embedding.width)
        output = self.model(inference_session=session, frame_idx=0)
        logits, present = self._frame_logits(output, embedding.height, embedding.width)
        return candidates_from_logits(logits[None], [present])

    # -- propagation ---------------------------------------------------------------------------
    @torch.no_grad()
    def propagate(
        self,
        slice_rgb: Callable[[int], np.ndarray],
        *,
        num_slices: int,
        key_index: int,
        prompt: SlicePrompt,
        presence_threshold: float = 0.5,
    ) -> dict[int, np.ndarray]:
        """Masks of one object from the key slice outwards, both directions, until it disappears.

        Args:
            slice_rgb: returns the ``(H, W, 3)`` uint8 slice ``index`` (windowed).
            num_slices: how many slices the volume has along the axis.
            key_index: the slice holding the prompt.
            prompt: the prompt on the key slice (points and/or a box).
            presence_threshold: a slice whose object-presence probability is below this, or whose
                mask is empty, ends the propagation in that direction (and is not kept).

        Returns:
            ``{slice index: boolean (H, W) mask}`` for the key slice and the slices reached.
        """
        if not 0 <= key_index < num_slices:
            raise ValueError(f"key slice {key_index} is outside 0..{num_slices - 1}")
        first = np.asarray(slice_rgb(key_index))
        height, width = int(first.shape[0]), int(first.shape[1])
        session = self._session(num_slices, lambda i: self.transform.pixel_values(slice_rgb(i))[0], height, width)
        self._add_prompt(session, key_index, prompt, height, width)
        masks: dict[int, np.ndarray] = {}
        output = self.model(inference_session=session, frame_idx=key_index)
        logits, present = self._frame_logits(output, height, width)
        key_mask = logits.numpy() > 0
        if present < presence_threshold or not key_mask.any():
            return masks
        masks[key_index] = key_mask
        for reverse, indices in ((False, range(key_index + 1, num_slices)), (True, range(key_index - 1, -1, -1))):
            for index in indices:
                output = self.model(inference_session=session, frame_idx=index, reverse=reverse)
                logits, present = self._frame_logits(output, height, width)
                mask = logits.numpy() > 0
                if present < presence_threshold or not mask.any():
                    break
                masks[index] = mask
        return masks

    # -- helpers -------------------------------------------------------------------------------
    def _session(self, count: int, make: Callable[[int], torch.Tensor], height: int, width: int) -> Any:
        from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoInferenceSession

        session = Sam2VideoInferenceSession(
            video_height=height,
            video_width=width,
            inference_device=self.device,
            inference_state_device=self.device,
            video_storage_device=self.device,
            dtype=torch.float32,
        )
        session.processed_frames = _LazyFrames(count, make)
        return session

    def _add_prompt(self, session: Any, frame_index: int, prompt: SlicePrompt, height: int, width: int) -> None:
        """Prompt encoding of ``Sam2VideoProcessor.process_new_points_or_boxes_for_video_frame``."""
        scale_x, scale_y = self.transform.size / width, self.transform.size / height
        coords: list[list[float]] = []
        labels: list[int] = []
        if prompt.box_rc is not None:
            r0, c0, r1, c1 = (float(v) for v in prompt.box_rc)
            coords += [[c0 * scale_x, r0 * scale_y], [c1 * scale_x, r1 * scale_y]]
            labels += [2, 3]
        if prompt.points_rc is not None and len(prompt.points_rc):
            points = np.asarray(prompt.points_rc, dtype=np.float64).reshape(-1, 2)
            point_labels = (
                np.ones(len(points), np.int64) if prompt.point_labels is None else np.asarray(prompt.point_labels)
            )
            coords += [[float(c) * scale_x, float(r) * scale_y] for r, c in points]
            labels += [int(v) for v in point_labels]
        if not coords:
            raise ValueError("a SlicePrompt needs points or a box")
        object_index = session.obj_id_to_idx(1)
        session.add_point_inputs(
            object_index,
            frame_index,
            {
                "point_coords": torch.tensor([[coords]], dtype=torch.float32),
                "point_labels": torch.tensor([[labels]], dtype=torch.int32),
            },
        )
        session.remove_mask_inputs(object_index, frame_index)
        session.obj_with_new_inputs = [1]

    @staticmethod
    def _frame_logits(output: Any, height: int, width: int) -> tuple[torch.Tensor, float]:
        """``(H, W)`` logits of the (single) object on the slice grid, and its presence probability."""
        low_res = output.pred_masks[0:1].float().reshape(1, 1, *output.pred_masks.shape[-2:])
        logits = F.interpolate(low_res, size=(height, width), mode="bilinear", align_corners=False)[0, 0].cpu()
        score = output.object_score_logits
        present = float(torch.sigmoid(score.float().reshape(-1)[0])) if score is not None else 1.0
        return logits, present
