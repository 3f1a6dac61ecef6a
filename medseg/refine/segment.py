"""Interactive promptable segmentation of a volume: points, boxes or a structure name -> a label volume.

The image is windowed once for the whole volume (:mod:`medseg.refine.windowing`), sliced along
one axis, and every slice a prompt covers is embedded once (:class:`~medseg.refine.backends.CachedBackend`)
and decoded. The answer is a label :class:`~medseg.core.volume.Volume` on the input's exact grid
(same shape and affine, the input's header fields kept), holding ``label_value`` where SAM found
the object.

Prompt kinds:

* ``points`` / ``negative_points`` / ``boxes``: voxel indices ``(i, j, k)`` or, with
  ``world=True``, RAS millimetres as 3D Slicer shows them (:mod:`medseg.refine.prompts`).
* ``text`` with a SAM3 checkpoint: SAM3's concept prompt on every slice.
* ``text`` with ``model=`` (a trained medseg run): the name is looked up in the run's label map
  (:mod:`medseg.refine.structures`), the U-Net segments the volume, and its mask of that structure
  gives box + point prompts per component and slice.
* ``propagate=True`` (a ``sam2_video`` checkpoint): each object's prompt goes on its key slice and
  SAM2 carries it through the neighbouring slices in both directions until the object ends.

A mask SAM returns for a box prompt is cut to that box (SAM's answer outside its box is not
what was asked for).

Example:
    >>> labels = prompt_segment(ms.read_volume("ct.nii.gz"), "sam-vit-base/",
    ...                         boxes=[(40, 52, 10, 80, 96, 22)])    # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from medseg.core.volume import Volume
from medseg.io.volumes import read_volume
from medseg.refine.backends import CachedBackend
from medseg.refine.prompts import (
    PromptError,
    SliceJob,
    box_to_voxels,
    points_to_voxels,
    prompts_from_mask,
    user_prompts,
)
from medseg.refine.protocol import SlicePrompt
from medseg.refine.windowing import Modality, intensity_window, slice_to_rgb

__all__ = ["PromptSegmentation", "prompt_segment", "segment_with_prompts"]


@dataclass(frozen=True)
class PromptSegmentation:
    """What :func:`segment_with_prompts` did.

    Attributes:
        labels: the label Volume on the input's grid.
        slices_prompted: indices (along ``axis``) of the slices SAM decoded or propagated to.
        num_objects: how many prompted objects (components, boxes, point groups).
        encoder_calls: image encodings computed (with propagation: slice images SAM2 encoded).
        notes: human-readable remarks (e.g. the U-Net found nothing to prompt with).
    """

    labels: Volume
    slices_prompted: tuple[int, ...]
    num_objects: int
    encoder_calls: int
    notes: tuple[str, ...] = field(default=())


def prompt_segment(volume: Volume | str | os.PathLike[str], sam: Any, **options: Any) -> Volume:
    """Segment what the prompts point at; returns the label Volume (see :func:`segment_with_prompts`)."""
    return segment_with_prompts(volume, sam, **options).labels


def segment_with_prompts(
    volume: Volume | str | os.PathLike[str],
    sam: Any,
    *,
    points: Sequence[Sequence[float]] | None = None,
    negative_points: Sequence[Sequence[float]] | None = None,
    boxes: Sequence[Sequence[float]] | None = None,
    text: str | None = None,
    model: Any = None,
    world: bool = False,
    propagate: bool = False,
    axis: int = 2,
    modality: Modality = "auto",
    window: tuple[float, float] | None = None,
    channel: int = 0,
    margin_mm: float = 5.0,
    text_threshold: float = 0.5,
    synonyms: Mapping[str, Sequence[str]] | None = None,
    label_value: int = 1,
    device: str = "auto",
) -> PromptSegmentation:
    """Promptable segmentation of one image.

    Args:
        volume: a Volume or an image path.
        sam: a checkpoint path (see :func:`~medseg.refine.loading.load_sam`) or a loaded backend.
        points: positive points, ``(i, j, k)`` voxel indices (``(i, j)`` for 2D images) or RAS mm.
        negative_points: points outside the object, same units.
        boxes: 3D boxes ``(i0, j0, k0, i1, j1, k1)`` (inclusive corners), same units.
        text: a structure name: SAM3's concept prompt, or (with ``model``) a label of the model.
        model: a trained medseg run (path) or a :class:`~medseg.inference.segmenter.Segmenter`
            whose mask of ``text`` supplies the prompts.
        world: points and boxes are RAS millimetres, not voxel indices.
        propagate: SAM2 video propagation from each object's key slice (``sam2_video`` checkpoint).
        axis: the axis slices are taken across (``2``: axial for an RAS-ordered volume).
        modality: ``"ct"``, ``"mri"`` or ``"auto"`` intensity windowing; ``window`` overrides it.
        window: an explicit ``(low, high)`` intensity window.
        channel: the image channel SAM sees.
        margin_mm: box margin around U-Net components (text with ``model``).
        text_threshold: SAM3 instance score needed to keep an instance.
        synonyms: extra structure synonyms for ``text`` with ``model``.
        label_value: the value written where the object is.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.

    Raises:
        PromptError: no prompt, a prompt outside the image, an unknown structure name, or a
            prompt kind the checkpoint cannot take.
        CheckpointError: a missing, corrupt or non-SAM checkpoint.
    """
    image = volume if isinstance(volume, Volume) else read_volume(volume)
    if not 0 <= channel < image.num_channels:
        raise PromptError(f"channel {channel} does not exist (the image has {image.num_channels})")
    has_geometry = bool(points) or bool(boxes)
    if not has_geometry and text is None:
        raise PromptError("no prompt: give points, boxes or a structure name (text)")
    if has_geometry and text is not None:
        raise PromptError("give either points/boxes or a structure name (text), not both")
    if negative_points and not has_geometry:
        raise PromptError("negative points need a positive point or a box on the same slice")
    array = image.array[channel]
    flat = array.ndim == 2
    if flat:
        array, axis = array[:, :, None], 2
    shape = array.shape
    if axis not in (0, 1, 2):
        raise PromptError(f"axis must be 0, 1 or 2, got {axis}")
    low, high = intensity_window(array, modality=modality, window=window)

    def slice_rgb(index: int) -> np.ndarray:
        return slice_to_rgb(np.take(array, index, axis=axis), low, high)

    backend = _backend(sam, device=device)
    kind = getattr(backend, "kind", "")
    if propagate and kind != "sam2_video":
        raise PromptError(
            f"propagation needs a SAM2 video checkpoint (config model_type 'sam2_video'), not {kind or 'this backend'}"
        )
    notes: list[str] = []
    cached = CachedBackend(backend)
    output = np.zeros(shape, dtype=bool)

    if text is not None and model is None:
        if kind != "sam3":
            raise PromptError(
                f"text prompts need a SAM3 checkpoint, or --model RUN (a trained medseg model); {kind or 'this'} takes points/boxes"
            )
        prompted = _segment_text(cached, slice_rgb, output, axis=axis, text=text, threshold=text_threshold)
        return _result(image, output, flat, prompted, 1, cached, notes, label_value)

    if text is not None:
        jobs, note = _jobs_from_model(
            image, model, text, axis=axis, margin_mm=margin_mm, synonyms=synonyms, device=device
        )
        notes += [note] if note else []
    else:
        jobs = _jobs_from_user(image, shape, points, negative_points, boxes, axis=axis, world=world, flat=flat)

    if propagate:
        prepared = [0]

        def counted_rgb(index: int) -> np.ndarray:
            prepared[0] += 1
            return slice_rgb(index)

        prompted = _propagate(backend, counted_rgb, output, jobs, axis=axis, num_slices=shape[axis])
        cached.encoder_calls = prepared[0]  # propagation encodes each slice it visits (SAM2 keeps no cache)
    else:
        prompted = _decode_jobs(cached, slice_rgb, output, jobs, axis=axis)
    return _result(image, output, flat, prompted, len({j.object_id for j in jobs}), cached, notes, label_value)


# -- prompt sources -------------------------------------------------------------------------------
def _jobs_from_user(
    image: Volume,
    shape: tuple[int, ...],
    points: Sequence[Sequence[float]] | None,
    negative_points: Sequence[Sequence[float]] | None,
    boxes: Sequence[Sequence[float]] | None,
    *,
    axis: int,
    world: bool,
    flat: bool,
) -> list[SliceJob]:
    def lift(items: Sequence[Sequence[float]] | None, size: int) -> list[list[float]]:
        """2D images take (i, j) points and (i0, j0, i1, j1) boxes: add k = 0."""
        result = []
        for item in items or ():
            values = [float(v) for v in item]
            if flat and len(values) == size - (1 if size == 3 else 2):
                values = values + [0.0] if size == 3 else values[:2] + [0.0] + values[2:] + [0.0]
            result.append(values)
        return result

    affine = image.affine
    point_voxels = points_to_voxels(lift(points, 3), shape=shape, affine=affine, world=world) if points else None
    negative_voxels = (
        points_to_voxels(lift(negative_points, 3), shape=shape, affine=affine, world=world) if negative_points else None
    )
    box_voxels = [box_to_voxels(b, shape=shape, affine=affine, world=world) for b in lift(boxes, 6)]
    jobs = user_prompts(shape, points=point_voxels, negative_points=negative_voxels, boxes=box_voxels, axis=axis)
    if not jobs:
        raise PromptError("the prompts cover no slice (negative points alone do not prompt)")
    return jobs


def _jobs_from_model(
    image: Volume,
    model: Any,
    text: str,
    *,
    axis: int,
    margin_mm: float,
    synonyms: Mapping[str, Sequence[str]] | None,
    device: str,
) -> tuple[list[SliceJob], str]:
    from medseg.inference.segmenter import Segmenter
    from medseg.refine.structures import find_structure, synonyms_from_run

    known = dict(synonyms or {})
    if isinstance(model, Segmenter) or (hasattr(model, "predict") and hasattr(model, "labels")):
        segmenter = model
    else:
        known = {**synonyms_from_run(model), **known}
        segmenter = Segmenter.from_checkpoint(model, device=device)
    structure = find_structure(text, segmenter.labels, synonyms=known)
    predicted = segmenter.predict(image).array[0]
    mask = np.isin(predicted, structure.label_ids)
    if mask.ndim == 2:
        mask = mask[:, :, None]
    jobs = prompts_from_mask(mask, spacing_mm=_spacing3(image), axis=axis, margin_mm=margin_mm)
    note = "" if jobs else f"the model found no {structure.name!r} to prompt with; the output is empty"
    return jobs, note


def _spacing3(image: Volume) -> tuple[float, float, float]:
    spacing = image.spacing_mm
    return (spacing[0], spacing[1], spacing[2] if len(spacing) > 2 else 1.0)


# -- decoding -------------------------------------------------------------------------------------
def _backend(sam: Any, *, device: str) -> Any:
    if hasattr(sam, "embed") and hasattr(sam, "decode"):
        return sam
    from medseg.refine.loading import load_sam

    if not isinstance(sam, (str, os.PathLike)):
        raise TypeError(f"sam must be a checkpoint path or a backend, got {type(sam).__name__}")
    return load_sam(Path(sam), device=device)


def _put(output: np.ndarray, axis: int, index: int, mask: np.ndarray) -> None:
    view = np.take(output, index, axis=axis)  # a copy
    where: list[Any] = [slice(None)] * 3
    where[axis] = index
    output[tuple(where)] = view | mask


def _within_box(mask: np.ndarray, prompt: SlicePrompt) -> np.ndarray:
    if prompt.box_rc is None:
        return mask
    r0, c0, r1, c1 = (int(round(v)) for v in prompt.box_rc)
    cut = np.zeros_like(mask)
    cut[r0 : r1 + 1, c0 : c1 + 1] = mask[r0 : r1 + 1, c0 : c1 + 1]
    return cut


def _decode_jobs(
    backend: CachedBackend,
    slice_rgb: Callable[[int], np.ndarray],
    output: np.ndarray,
    jobs: list[SliceJob],
    *,
    axis: int,
) -> set[int]:
    prompted: set[int] = set()
    for job in jobs:
        embedding = backend.embed(slice_rgb(job.slice_index))
        single_point = job.prompt.box_rc is None and (job.prompt.points_rc is None or len(job.prompt.points_rc) <= 1)
        candidates = backend.decode(embedding, job.prompt, multimask=single_point)
        prompted.add(job.slice_index)
        if candidates:
            _put(output, axis, job.slice_index, _within_box(candidates[0].mask, job.prompt))
    return prompted


def _segment_text(
    backend: CachedBackend,
    slice_rgb: Callable[[int], np.ndarray],
    output: np.ndarray,
    *,
    axis: int,
    text: str,
    threshold: float,
) -> set[int]:
    for index in range(output.shape[axis]):
        embedding = backend.embed(slice_rgb(index))
        for candidate in backend.backend.decode_text(embedding, text, threshold=threshold):
            _put(output, axis, index, candidate.mask)
    return set(range(output.shape[axis]))


def _propagate(
    backend: Any,
    slice_rgb: Callable[[int], np.ndarray],
    output: np.ndarray,
    jobs: list[SliceJob],
    *,
    axis: int,
    num_slices: int,
) -> set[int]:
    """One propagation per object, from its middle prompted slice; a box object stays in its box's slices."""
    prompted: set[int] = set()
    by_object: dict[int, list[SliceJob]] = {}
    for job in jobs:
        by_object.setdefault(job.object_id, []).append(job)
    for object_jobs in by_object.values():
        ordered = sorted(object_jobs, key=lambda j: j.slice_index)
        with_points = [j for j in ordered if j.prompt.points_rc is not None and len(j.prompt.points_rc)]
        key = (with_points or ordered)[len(with_points or ordered) // 2]
        masks = backend.propagate(slice_rgb, num_slices=num_slices, key_index=key.slice_index, prompt=key.prompt)
        has_box = key.prompt.box_rc is not None
        allowed = {j.slice_index for j in ordered} if has_box else set(masks)
        for index, mask in masks.items():
            if index in allowed:
                _put(output, axis, index, mask)
                prompted.add(index)
    return prompted


def _result(
    image: Volume,
    output: np.ndarray,
    flat: bool,
    prompted: set[int],
    num_objects: int,
    cached: CachedBackend,
    notes: list[str],
    label_value: int,
) -> PromptSegmentation:
    dtype = np.uint8 if 0 < label_value < 256 else np.uint16
    labels = output[:, :, 0] if flat else output
    volume = image.with_array((labels.astype(dtype) * dtype(label_value))[None], kind="label")
    return PromptSegmentation(
        labels=volume,
        slices_prompted=tuple(sorted(prompted)),
        num_objects=num_objects,
        encoder_calls=cached.encoder_calls,
        notes=tuple(notes),
    )
