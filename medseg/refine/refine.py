"""Refining one case's U-Net label map with a promptable (SAM-family) backend, slice by slice.

For each structure (a label or a region of the label map) and each slice along the slice axis
(the axis of the largest spacing; the last axis when the spacing is isotropic) where the U-Net
found the structure, every 2D connected component of the U-Net mask (of at least
:data:`MIN_COMPONENT_PIXELS` pixels) becomes one prompt: its box
widened by ``margin_mm`` (clipped to the slice) and, with ``points``, a positive point at the
component's most interior pixel (:func:`medseg.refine.prompts.slice_prompt_from_mask`). Slices and components the U-Net does not cover are
never prompted: SAM always answers inside a box, so an empty slice stays empty.

SAM's answer may move the U-Net boundary only inside a narrow band (``band_mm`` in-plane, on
either side of it). There the two are fused: a voxel belongs to the structure when
``fusion_weight * p_sam + (1 - fusion_weight) * unet > 0.5`` (``p_sam`` = sigmoid of SAM's
logits, ``unet`` = 0 or 1); ``fusion_weight`` 1 takes SAM's mask in the band, smaller weights
need SAM to be surer before it overrules the U-Net. Outside the band the U-Net's answer stands.
Among SAM's candidate masks, ``choose`` picks the one with the highest predicted IoU (``"iou"``)
or stability score (``"stability"``).

The refined mask goes back into the label map by trading voxels with the structure's
surroundings only: removed voxels take the label that surrounds the structure (the most
frequent label on its outer one-voxel ring: background for a hippocampus, edema around a tumour
core), added voxels are taken only from that surrounding label and get the structure's most
frequent label. Other structures are never overwritten.

A structure falls back to the U-Net bit-identically when SAM raises, answers nothing (every
chosen mask empty), or changes more than ``max_change_fraction`` of the structure's voxels.

The image embedding of each slice is computed once per case and shared by every structure,
prompt and setting (:class:`SliceEncoder`); :class:`CostMeter` adds up encoder and decoder time.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping, Sequence

import numpy as np
from scipy import ndimage

from medseg.core.labels import LabelSet, Structure
from medseg.core.volume import Volume
from medseg.refine.prompts import slice_prompt_from_mask
from medseg.refine.protocol import MaskCandidate, PromptBackend, SlicePrompt
from medseg.refine.windowing import intensity_window, to_uint8

__all__ = [
    "RefineSetting",
    "default_grid",
    "slice_axis",
    "SliceEncoder",
    "CostMeter",
    "Proposal",
    "propose",
    "compose",
    "refine_case",
    "structure_by_name",
]

Choice = Literal["iou", "stability"]

#: 2D components of fewer pixels are not prompted
MIN_COMPONENT_PIXELS = 10


@dataclass(frozen=True)
class RefineSetting:
    """One way of refining a structure (see the module docstring).

    Attributes:
        margin_mm: the box around each U-Net component is widened by this (in-plane mm).
        points: also give a positive point at the component's distance-transform maximum.
        fusion_weight: weight of SAM's probability in the band, in (0.5, 1]; 1 = SAM decides there.
        band_mm: SAM may move the U-Net boundary by at most this (in-plane mm, either side).
        choose: SAM candidate by predicted IoU (``"iou"``) or stability score (``"stability"``).
    """

    margin_mm: float = 2.0
    points: bool = False
    fusion_weight: float = 1.0
    band_mm: float = 3.0
    choose: Choice = "iou"

    def __post_init__(self) -> None:
        if not 0.5 < self.fusion_weight <= 1.0:
            raise ValueError(f"fusion_weight must be in (0.5, 1], got {self.fusion_weight}")
        if self.margin_mm < 0 or self.band_mm <= 0:
            raise ValueError(f"margin_mm must be >= 0 and band_mm > 0, got {self.margin_mm}, {self.band_mm}")
        if self.choose not in ("iou", "stability"):
            raise ValueError(f"choose must be 'iou' or 'stability', got {self.choose!r}")

    @property
    def name(self) -> str:
        """A readable unique name, e.g. ``margin2mm-points-w1-band3mm-iou``."""
        return (
            f"margin{self.margin_mm:g}mm-{'points' if self.points else 'box'}-w{self.fusion_weight:g}"
            f"-band{self.band_mm:g}mm-{self.choose}"
        )

    @property
    def prompt_key(self) -> tuple[float, bool]:
        """Settings with the same key share SAM's answers (only fusion and choice differ)."""
        return (self.margin_mm, self.points)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON of every field."""
        return asdict(self)

    @classmethod
    def from_json(cls, content: Mapping[str, Any]) -> RefineSetting:
        """Inverse of :meth:`to_json`."""
        return cls(
            margin_mm=float(content["margin_mm"]),
            points=bool(content["points"]),
            fusion_weight=float(content["fusion_weight"]),
            band_mm=float(content["band_mm"]),
            choose=content["choose"],
        )


def default_grid(
    *,
    margins_mm: Sequence[float] = (0.0, 3.0),
    points: Sequence[bool] = (False, True),
    fusion_weights: Sequence[float] = (0.75, 1.0),
    bands_mm: Sequence[float] = (2.0,),
    choices: Sequence[Choice] = ("iou", "stability"),
) -> list[RefineSetting]:
    """Every combination of the given values (default: 2 x 2 x 2 x 1 x 2 = 16 settings, 4 prompt kinds)."""
    return [
        RefineSetting(margin_mm=m, points=p, fusion_weight=w, band_mm=b, choose=c)
        for m in margins_mm
        for p in points
        for w in fusion_weights
        for b in bands_mm
        for c in choices
    ]


def slice_axis(spacing_mm: Sequence[float]) -> int:
    """The axis refined slice by slice: the one of the largest spacing, the last when all are within 1 %."""
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    if spacing.max() <= spacing.min() * 1.01:
        return len(spacing) - 1
    return int(np.argmax(spacing))


def structure_by_name(labels: LabelSet, name: str) -> Structure:
    """The label or region called ``name``; ValueError listing the known names otherwise."""
    for structure in labels.structures(include_regions=True):
        if structure.name == name:
            return structure
    known = [s.name for s in labels.structures(include_regions=True)]
    raise ValueError(f"unknown structure {name!r} (known: {known})")


@dataclass
class CostMeter:
    """Seconds spent in the image encoder and the prompt decoder, and how often each ran."""

    encoder_s: float = 0.0
    decoder_s: float = 0.0
    slices_embedded: int = 0
    prompts_decoded: int = 0

    def to_json(self) -> dict[str, float]:
        """Plain JSON, seconds rounded to 0.1 ms."""
        return {
            "encoder_s": round(self.encoder_s, 4),
            "decoder_s": round(self.decoder_s, 4),
            "slices_embedded": self.slices_embedded,
            "prompts_decoded": self.prompts_decoded,
        }


class SliceEncoder:
    """One case's slices as SAM sees them (windowed RGB), each embedded once and cached.

    Each used channel is windowed once per volume by :func:`medseg.refine.windowing.intensity_window`
    (a CT soft-tissue window, or the 0.5-99.5 percentiles of an MRI's non-zero voxels) and mapped
    to 0..255. One channel fills R, G and B; with two or more, ``rgb_channels`` says which channel
    feeds R, G and B (default: the first three, the last one repeated).

    Args:
        image: the case's image Volume.
        backend: the SAM backend.
        axis: the spatial axis sliced along.
        rgb_channels: image channel of R, G and B.
        meter: where encoder time is added.
    """

    def __init__(
        self,
        image: Volume,
        backend: PromptBackend,
        *,
        axis: int,
        rgb_channels: Sequence[int] | None = None,
        meter: CostMeter | None = None,
    ) -> None:
        channels = list(rgb_channels) if rgb_channels is not None else default_rgb_channels(image.num_channels)
        if len(channels) != 3 or not all(0 <= c < image.num_channels for c in channels):
            raise ValueError(f"rgb_channels must be 3 channel indices of 0..{image.num_channels - 1}, got {channels}")
        self.image = image
        self.backend = backend
        self.axis = axis
        self.rgb_channels = channels
        self.meter = meter if meter is not None else CostMeter()
        self._windows = {c: intensity_window(image.array[c]) for c in set(channels)}
        self._cache: dict[int, Any] = {}

    def rgb(self, index: int) -> np.ndarray:
        """``(H, W, 3)`` uint8 of slice ``index``."""
        planes = [
            to_uint8(np.take(self.image.array[channel], index, axis=self.axis), *self._windows[channel])
            for channel in self.rgb_channels
        ]
        return np.stack(planes, axis=-1)

    def embedding(self, index: int) -> Any:
        """The backend's embedding of slice ``index`` (computed on first use)."""
        if index not in self._cache:
            clock = time.perf_counter()
            self._cache[index] = self.backend.embed(self.rgb(index))
            self.meter.encoder_s += time.perf_counter() - clock
            self.meter.slices_embedded += 1
        return self._cache[index]

    def decode(self, index: int, prompt: SlicePrompt) -> list[MaskCandidate]:
        """SAM's candidates for a prompt on slice ``index``."""
        embedding = self.embedding(index)
        clock = time.perf_counter()
        candidates = self.backend.decode(embedding, prompt, multimask=True)
        self.meter.decoder_s += time.perf_counter() - clock
        self.meter.prompts_decoded += 1
        return list(candidates)


def default_rgb_channels(num_channels: int) -> list[int]:
    """Channels feeding R, G, B: ``[0, 0, 0]`` for one channel, else the first three (last repeated)."""
    return [min(i, num_channels - 1) for i in range(3)] if num_channels > 1 else [0, 0, 0]


def _component_prompt(
    component: np.ndarray, *, spacing_rc_mm: tuple[float, float], margin_mm: float, points: bool
) -> SlicePrompt:
    """Box (widened by ``margin_mm``, clipped) and optional positive point of one 2D component."""
    margin_px = tuple(int(math.ceil(margin_mm / s - 1e-9)) for s in spacing_rc_mm)
    return slice_prompt_from_mask(
        component,
        spacing_rc=spacing_rc_mm,
        margin_px=margin_px,
        positive_point=points,  # type: ignore[arg-type]
    )


@dataclass
class Proposal:
    """The refined mask of one structure under one setting, or why there is none.

    Attributes:
        mask: the refined 3D boolean mask, or None (the U-Net's mask stands).
        reason: empty when ``mask`` is usable, else why not (``"SAM returned no mask"``, ...).
        changed_fraction: voxels that differ from the U-Net's mask / the U-Net mask's voxels.
        counts: slices and components prompted, SAM failures, empty answers.
    """

    mask: np.ndarray | None
    reason: str = ""
    changed_fraction: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)


def _band(unet_slice: np.ndarray, spacing_rc_mm: tuple[float, float], band_mm: float) -> np.ndarray:
    """Voxels within ``band_mm`` of the U-Net boundary, inside or outside."""
    inside = ndimage.distance_transform_edt(np.pad(unet_slice, 1), sampling=spacing_rc_mm)[1:-1, 1:-1]
    outside = ndimage.distance_transform_edt(~unet_slice, sampling=spacing_rc_mm)
    return (unet_slice & (inside <= band_mm)) | (~unet_slice & (outside <= band_mm))


def _choose(candidates: Sequence[MaskCandidate], choose: Choice) -> MaskCandidate | None:
    if not candidates:
        return None
    key = (lambda c: c.predicted_iou) if choose == "iou" else (lambda c: c.stability)
    return max(candidates, key=key)


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(logits.astype(np.float64), -60.0, 60.0)))


def propose(
    encoder: SliceEncoder,
    unet_mask: np.ndarray,
    *,
    settings: Sequence[RefineSetting],
    max_change_fraction: float = 0.5,
    min_component_pixels: int = MIN_COMPONENT_PIXELS,
) -> dict[str, Proposal]:
    """SAM-refined masks of one structure under several settings, SAM asked once per prompt kind.

    Args:
        encoder: the case's slices and embeddings (its ``axis`` is the slice axis).
        unet_mask: the U-Net's 3D boolean mask of the structure.
        settings: the settings to try.
        max_change_fraction: a proposal changing more than this fraction of the U-Net mask's
            voxels is refused (its ``mask`` is None).
        min_component_pixels: 2D components smaller than this are not prompted (they stay as
            the U-Net has them): a box around a speck says nothing SAM can use.

    Returns:
        setting name -> :class:`Proposal`. A backend exception gives every setting a Proposal
        with ``mask=None`` and the reason.
    """
    axis = encoder.axis
    spacing = encoder.image.spacing_mm
    spacing_rc = tuple(float(s) for i, s in enumerate(spacing) if i != axis)
    assert len(spacing_rc) == 2, "refinement slices 3D volumes"
    total = int(np.count_nonzero(unet_mask))
    if total == 0:
        return {s.name: Proposal(None, "the U-Net found no voxels (nothing to prompt)") for s in settings}
    indices = [int(i) for i in np.nonzero(np.any(unet_mask, axis=tuple(a for a in range(3) if a != axis)))[0]]
    answers: dict[tuple[float, bool], dict[int, list[tuple[np.ndarray, list[MaskCandidate]]]]] = {}
    counts = {"slices": len(indices), "components": 0, "sam_failures": 0, "empty_answers": 0}
    try:
        for index in indices:
            unet_slice = np.take(unet_mask, index, axis=axis)
            components, count = ndimage.label(unet_slice, structure=np.ones((3, 3), bool))
            counts["components"] += count
            sizes = np.bincount(components.ravel(), minlength=count + 1)
            for key in {s.prompt_key for s in settings}:
                per_slice = answers.setdefault(key, {}).setdefault(index, [])
                for label in range(1, count + 1):
                    if sizes[label] < min_component_pixels:
                        continue
                    component = components == label
                    prompt = _component_prompt(component, spacing_rc_mm=spacing_rc, margin_mm=key[0], points=key[1])
                    per_slice.append((component, encoder.decode(index, prompt)))
    except Exception as error:  # noqa: BLE001 - a third-party model failing must not lose the U-Net's answer
        reason = f"SAM failed ({type(error).__name__}: {str(error).strip().splitlines()[0][:120] if str(error).strip() else ''})"
        return {s.name: Proposal(None, reason, counts={**counts, "sam_failures": 1}) for s in settings}
    proposals: dict[str, Proposal] = {}
    for setting in settings:
        refined = unet_mask.copy()
        empty = 0
        answered = 0
        for index in indices:
            unet_slice = np.take(unet_mask, index, axis=axis)
            probability = np.zeros(unet_slice.shape, dtype=np.float64)
            any_answer = False
            for _component, candidates in answers[setting.prompt_key][index]:
                chosen = _choose(candidates, setting.choose)
                if chosen is None or not np.any(chosen.mask):
                    empty += 1
                    continue
                any_answer = True
                answered += 1
                probability = np.maximum(probability, _sigmoid(np.asarray(chosen.logits)))
            if not any_answer:
                continue
            band = _band(unet_slice, spacing_rc, setting.band_mm)
            w = setting.fusion_weight
            fused = w * probability + (1.0 - w) * unet_slice > 0.5
            new_slice = np.where(band, fused, unet_slice)
            _put_slice(refined, index, axis, new_slice)
        setting_counts = {**counts, "empty_answers": empty, "answered": answered}
        changed = int(np.count_nonzero(refined != unet_mask))
        fraction = changed / total
        if answered == 0:
            proposals[setting.name] = Proposal(None, "SAM returned no mask", 0.0, setting_counts)
        elif fraction > max_change_fraction:
            proposals[setting.name] = Proposal(
                None,
                f"SAM changed {fraction:.0%} of the structure's voxels (limit {max_change_fraction:.0%})",
                fraction,
                setting_counts,
            )
        else:
            proposals[setting.name] = Proposal(refined, "", fraction, setting_counts)
    return proposals


def _put_slice(volume: np.ndarray, index: int, axis: int, plane: np.ndarray) -> None:
    selector: list[Any] = [slice(None)] * volume.ndim
    selector[axis] = index
    volume[tuple(selector)] = plane


def _mode(values: np.ndarray, default: int) -> int:
    if values.size == 0:
        return default
    uniques, counts = np.unique(values, return_counts=True)
    return int(uniques[int(np.argmax(counts))])


def compose(label_array: np.ndarray, structure: Structure, refined: np.ndarray) -> np.ndarray:
    """The label map with ``structure`` replaced by ``refined``, trading voxels only with its surroundings.

    Args:
        label_array: the spatial label array (label ids).
        structure: the label or region refined.
        refined: its refined boolean mask, same shape.

    Returns:
        A new array (the input when nothing changes): removed voxels take the structure's
        surrounding label, added voxels are taken from that label only and get the structure's
        most frequent member label.
    """
    members = np.isin(label_array, structure.label_ids)
    if not np.any(members) or np.array_equal(members, refined):
        return label_array
    where = np.nonzero(members | refined)
    lower = [max(int(w.min()) - 1, 0) for w in where]
    upper = [min(int(w.max()) + 2, n) for w, n in zip(where, label_array.shape)]
    crop = tuple(slice(a, b) for a, b in zip(lower, upper))
    labels_crop = label_array[crop]
    members_crop = members[crop]
    ring = ndimage.binary_dilation(members_crop, structure=np.ones((3,) * label_array.ndim, bool)) & ~members_crop
    surround = _mode(labels_crop[ring], 0)
    fill = _mode(labels_crop[members_crop], structure.label_ids[0])
    refined_crop = refined[crop]
    out = label_array.copy()
    out_crop = out[crop]
    out_crop[refined_crop & ~members_crop & (labels_crop == surround)] = fill
    out_crop[members_crop & ~refined_crop] = surround
    return out


def refine_case(
    image: Volume,
    unet_labels: Volume,
    *,
    labels: LabelSet,
    plan: Mapping[str, RefineSetting],
    backend: PromptBackend,
    max_change_fraction: float = 0.5,
    rgb_channels: Sequence[int] | None = None,
    skipped: Mapping[str, str] | None = None,
    meter: CostMeter | None = None,
) -> tuple[Volume, dict[str, str]]:
    """Refine the planned structures of one case; everything else passes through bit-identically.

    Args:
        image: the case's image (same grid as ``unet_labels``).
        unet_labels: the U-Net's label Volume.
        labels: the label map (structures and regions).
        plan: structure name -> the accepted setting; structures not in it are not refined.
        backend: the SAM backend.
        max_change_fraction: refuse a refinement changing more than this fraction of a structure.
        rgb_channels: image channels feeding R, G, B (default: :func:`default_rgb_channels`).
        skipped: structure name -> why it is not refined (e.g. rejected by the gate), recorded as is.
        meter: where encoder and decoder time are added.

    Returns:
        The label Volume (the input object itself when nothing was applied) and, per structure of
        ``labels``, ``"applied"`` or ``"skipped: <reason>"``.
    """
    if unet_labels.spatial_ndim != 3:
        reason = f"skipped: refinement needs a 3D image, this one is {unet_labels.spatial_ndim}D"
        return unet_labels, {s.name: reason for s in labels.structures(include_regions=True)}
    axis = slice_axis(image.spacing_mm)
    encoder = SliceEncoder(image, backend, axis=axis, rgb_channels=rgb_channels, meter=meter)
    original = unet_labels.array[0]
    array = original
    status: dict[str, str] = {}
    for structure in labels.structures(include_regions=True):
        if structure.name not in plan:
            reason = (skipped or {}).get(structure.name, "not in the refinement plan")
            status[structure.name] = f"skipped: {reason}"
            continue
        setting = plan[structure.name]
        proposal = propose(
            encoder,
            np.isin(array, structure.label_ids),
            settings=[setting],
            max_change_fraction=max_change_fraction,
        )[setting.name]
        if proposal.mask is None:
            status[structure.name] = f"skipped: {proposal.reason}"
            continue
        array = compose(array, structure, proposal.mask)
        status[structure.name] = "applied"
    if array is original:
        return unet_labels, status
    return unet_labels.with_array(array[None]), status
