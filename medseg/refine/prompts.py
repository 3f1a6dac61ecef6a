"""Prompts for Segment-Anything, derived from a mask or given by a user; pure numpy/scipy, no torch.

A volume is prompted slice by slice along one axis (``axis=2``: the slices ``array[:, :, k]``).
In a slice, ``row`` is the first remaining voxel axis and ``col`` the second (for ``axis=2``:
row = i, col = j), the coordinates :class:`~medseg.refine.protocol.SlicePrompt` uses.

* **From a mask** (:func:`prompts_from_mask`): per 3D connected component and per slice it
  touches: a box around the component's pixels, widened by a margin in millimetres and clipped to
  the image; a positive point at the component's most interior pixel (the maximum of the distance
  transform, in mm); and optionally negative points in the box, as far from the object as the box
  allows.
* **From a user** (:func:`user_prompts`): points and boxes as voxel indices ``(i, j, k)``, or as
  world millimetres (RAS, as 3D Slicer shows them) converted with the volume's affine
  (:func:`world_to_voxel`). A 3D box becomes one 2D box on every slice of its extent.

Slices and components a prompt does not cover are never prompted: SAM always answers inside a
box, so a box on an empty slice would invent an object.

Example:
    >>> import numpy as np
    >>> mask = np.zeros((20, 20, 3), bool); mask[5:10, 6:12, 1] = True
    >>> [(job.slice_index, job.prompt.box_rc) for job in prompts_from_mask(mask, spacing_mm=(1, 1, 1), margin_mm=2)]
    [(1, (3, 4, 11, 13))]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from medseg.core.components import connected_components
from medseg.errors import MedsegUserError
from medseg.refine.protocol import SlicePrompt

__all__ = [
    "PromptError",
    "SliceJob",
    "in_plane_axes",
    "prompts_from_mask",
    "slice_prompt_from_mask",
    "user_prompts",
    "world_to_voxel",
    "points_to_voxels",
    "box_to_voxels",
]


class PromptError(MedsegUserError):
    """A prompt that cannot be used: outside the image, malformed, or covering nothing."""


@dataclass(frozen=True)
class SliceJob:
    """One prompt on one slice of a volume.

    Attributes:
        slice_index: index of the slice along the prompting axis.
        object_id: which object the prompt belongs to (a mask component, a user box, ...), from 1.
        prompt: the points/box in the slice's ``(row, col)`` coordinates.
    """

    slice_index: int
    object_id: int
    prompt: SlicePrompt


def in_plane_axes(axis: int, ndim: int = 3) -> tuple[int, int]:
    """The (row, col) voxel axes of a slice taken across ``axis``."""
    if axis not in range(ndim):
        raise ValueError(f"axis must be in 0..{ndim - 1}, got {axis}")
    rows, cols = (a for a in range(ndim) if a != axis)
    return rows, cols


# -- prompts from a mask -------------------------------------------------------------------------
def prompts_from_mask(
    mask: np.ndarray,
    *,
    spacing_mm: Sequence[float],
    axis: int = 2,
    margin_mm: float = 5.0,
    positive_point: bool = True,
    negative_points: int = 0,
    connectivity: int | None = None,
) -> list[SliceJob]:
    """Box and point prompts for every 3D connected component of ``mask``, on every slice it touches.

    Args:
        mask: 3D boolean (or 0/1) array.
        spacing_mm: voxel size along each axis of ``mask`` (mm).
        axis: the axis slices are taken across.
        margin_mm: how far the box extends beyond the component on each side (mm), rounded up to
            whole pixels per in-plane axis and clipped to the image.
        positive_point: add one positive point at the component's most interior pixel of the slice.
        negative_points: how many negative points to add inside the box and outside the component,
            each as far from the component (and the earlier negative points) as possible.
        connectivity: component connectivity (``None``: full, 26 neighbours).

    Returns:
        The jobs sorted by component, then slice; ``object_id`` is the component number (from 1).
    """
    mask = np.asarray(mask).astype(bool, copy=False)
    if mask.ndim != 3:
        raise ValueError(f"prompts_from_mask takes a 3D mask, got shape {mask.shape}")
    if margin_mm < 0 or negative_points < 0:
        raise ValueError(f"margin_mm and negative_points must be >= 0, got {margin_mm}, {negative_points}")
    rows_axis, cols_axis = in_plane_axes(axis)
    spacing_rc = (float(spacing_mm[rows_axis]), float(spacing_mm[cols_axis]))
    margin_px = tuple(int(math.ceil(margin_mm / s - 1e-9)) for s in spacing_rc)
    components, count = connected_components(mask, connectivity=connectivity)
    jobs: list[SliceJob] = []
    for object_id, where in enumerate(ndimage.find_objects(components), start=1):
        if where is None:
            continue
        for index in range(where[axis].start, where[axis].stop):
            take: list[slice | int] = [slice(None)] * 3
            take[axis] = index
            piece = components[tuple(take)] == object_id
            if not piece.any():
                continue
            prompt = slice_prompt_from_mask(
                piece,
                spacing_rc=spacing_rc,
                margin_px=margin_px,
                positive_point=positive_point,
                negative_points=negative_points,
            )
            jobs.append(SliceJob(index, object_id, prompt))
    return jobs


def slice_prompt_from_mask(
    piece: np.ndarray,
    *,
    spacing_rc: tuple[float, float],
    margin_px: tuple[int, int],
    positive_point: bool = True,
    negative_points: int = 0,
) -> SlicePrompt:
    """The prompt for one non-empty 2D mask: a widened box, an interior point, negative points."""
    rows, cols = np.nonzero(piece)
    height, width = piece.shape
    box = (
        max(int(rows.min()) - margin_px[0], 0),
        max(int(cols.min()) - margin_px[1], 0),
        min(int(rows.max()) + margin_px[0], height - 1),
        min(int(cols.max()) + margin_px[1], width - 1),
    )
    points: list[tuple[float, float]] = []
    labels: list[int] = []
    if positive_point:
        points.append(_most_interior_pixel(piece, box, spacing_rc))
        labels.append(1)
    for point in _farthest_outside_pixels(piece, box, spacing_rc, negative_points):
        points.append(point)
        labels.append(0)
    if not points:
        return SlicePrompt(box_rc=box)
    return SlicePrompt(
        points_rc=np.asarray(points, dtype=np.float64).reshape(-1, 2),
        point_labels=np.asarray(labels, dtype=np.int64),
        box_rc=box,
    )


def _most_interior_pixel(
    piece: np.ndarray, box: tuple[int, int, int, int], spacing_rc: tuple[float, float]
) -> tuple[float, float]:
    """The pixel of ``piece`` farthest (in mm) from its outside; ties go to the first in C order."""
    r0, c0, r1, c1 = box
    crop = np.pad(piece[r0 : r1 + 1, c0 : c1 + 1], 1)  # the image edge counts as outside
    distance = ndimage.distance_transform_edt(crop, sampling=spacing_rc)
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return float(row - 1 + r0), float(col - 1 + c0)


def _farthest_outside_pixels(
    piece: np.ndarray, box: tuple[int, int, int, int], spacing_rc: tuple[float, float], count: int
) -> list[tuple[float, float]]:
    """Up to ``count`` pixels of the box outside ``piece``, each farthest from the object and the earlier ones."""
    if count == 0:
        return []
    r0, c0, r1, c1 = box
    crop = piece[r0 : r1 + 1, c0 : c1 + 1]
    if crop.all():
        return []
    taken = crop.copy()
    chosen: list[tuple[float, float]] = []
    for _ in range(count):
        distance = ndimage.distance_transform_edt(~taken, sampling=spacing_rc)
        best = int(np.argmax(distance))
        if distance.flat[best] <= 0:
            break
        row, col = np.unravel_index(best, distance.shape)
        chosen.append((float(row + r0), float(col + c0)))
        taken[row, col] = True
    return chosen


# -- prompts from a user -------------------------------------------------------------------------
def world_to_voxel(points_ras_mm: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Continuous voxel indices of RAS millimetre positions: ``inv(affine) @ (x, y, z, 1)``."""
    points = np.atleast_2d(np.asarray(points_ras_mm, dtype=np.float64))
    if points.shape[1] != 3:
        raise PromptError(f"world positions need 3 coordinates (R, A, S in mm), got {points.shape[1]}")
    homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=1)
    return (np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ homogeneous.T).T[:, :3]


def points_to_voxels(
    points: Sequence[Sequence[float]],
    *,
    shape: Sequence[int],
    affine: np.ndarray | None = None,
    world: bool = False,
) -> np.ndarray:
    """Integer voxel indices ``(N, 3)`` of points given as voxel indices or (``world=True``) RAS mm.

    World positions round to the nearest voxel centre.

    Raises:
        PromptError: a point with the wrong number of coordinates, or outside the image.
    """
    for original in points:
        if len(original) != len(shape):
            raise PromptError(f"a point needs {len(shape)} coordinates, got {tuple(original)}")
    array = np.asarray(points, dtype=np.float64).reshape(-1, len(shape))
    if world:
        if affine is None:
            raise ValueError("world=True needs the volume's affine")
        voxels = world_to_voxel(array, affine)
    else:
        voxels = array
    rounded = np.rint(voxels).astype(np.int64)
    for given, index in zip(points, rounded):
        if np.any(index < 0) or np.any(index >= np.asarray(shape)):
            where = (
                f"RAS {tuple(float(v) for v in given)} mm (voxel {tuple(int(v) for v in index)})"
                if world
                else (f"voxel {tuple(int(round(v)) for v in given)}")
            )
            raise PromptError(f"point {where} lies outside the image of shape {tuple(int(s) for s in shape)}")
    return rounded


def box_to_voxels(
    box: Sequence[float],
    *,
    shape: Sequence[int],
    affine: np.ndarray | None = None,
    world: bool = False,
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """A 3D box ``(i0, j0, k0, i1, j1, k1)`` (inclusive corners) as voxel corners clipped to the image.

    In world mm the box is axis-aligned in RAS (as a 3D Slicer ROI); its voxel box is the voxel
    bounding box of its eight corners (on an oblique volume it holds the world box).

    Raises:
        PromptError: not six numbers, or a box that misses the image entirely.
    """
    if len(box) != 6:
        raise PromptError(f"a box needs 6 numbers (two opposite corners), got {tuple(box)}")
    low_high = np.asarray(box, dtype=np.float64).reshape(2, 3)
    if world:
        if affine is None:
            raise ValueError("world=True needs the volume's affine")
        corners = np.array(
            [[low_high[a, 0], low_high[b, 1], low_high[c, 2]] for a in (0, 1) for b in (0, 1) for c in (0, 1)]
        )
        voxels = world_to_voxel(corners, affine)
        low, high = np.rint(voxels.min(axis=0)), np.rint(voxels.max(axis=0))
    else:
        low, high = np.rint(low_high.min(axis=0)), np.rint(low_high.max(axis=0))
    limit = np.asarray(shape, dtype=np.float64) - 1
    if np.any(high < 0) or np.any(low > limit):
        unit = "RAS mm" if world else "voxels"
        raise PromptError(f"box {tuple(box)} ({unit}) lies outside the image of shape {tuple(int(s) for s in shape)}")
    low, high = np.clip(low, 0, limit), np.clip(high, 0, limit)
    return tuple(int(v) for v in low), tuple(int(v) for v in high)  # type: ignore[return-value]


def user_prompts(
    shape: Sequence[int],
    *,
    points: np.ndarray | None = None,
    negative_points: np.ndarray | None = None,
    boxes: Sequence[tuple[tuple[int, int, int], tuple[int, int, int]]] = (),
    axis: int = 2,
) -> list[SliceJob]:
    """Slice jobs for user prompts already in voxel indices (see :func:`points_to_voxels`, :func:`box_to_voxels`).

    Each 3D box is one object, prompted with a 2D box on every slice of its extent. Positive points
    on a slice a box covers join that box's prompt; the other positive points of a slice form one
    object together. Negative points join every prompt of their slice. A slice with only negative
    points is not prompted.

    Returns:
        Jobs sorted by object, then slice. Boxes are objects ``1..len(boxes)``; point-only objects
        follow, one per slice.
    """
    rows_axis, cols_axis = in_plane_axes(axis, len(shape))
    positives = np.zeros((0, 3), np.int64) if points is None else np.asarray(points, np.int64).reshape(-1, 3)
    negatives = (
        np.zeros((0, 3), np.int64) if negative_points is None else np.asarray(negative_points, np.int64).reshape(-1, 3)
    )

    def on_slice(array: np.ndarray, index: int) -> list[tuple[float, float]]:
        return [(float(p[rows_axis]), float(p[cols_axis])) for p in array if p[axis] == index]

    jobs: list[SliceJob] = []
    used_positive_slices: set[int] = set()
    for object_id, (low, high) in enumerate(boxes, start=1):
        for index in range(low[axis], high[axis] + 1):
            box_rc = (low[rows_axis], low[cols_axis], high[rows_axis], high[cols_axis])
            inside = [
                p
                for p in on_slice(positives, index)
                if box_rc[0] <= p[0] <= box_rc[2] and box_rc[1] <= p[1] <= box_rc[3]
            ]
            if inside:
                used_positive_slices.add(index)
            jobs.append(SliceJob(index, object_id, _prompt(inside, on_slice(negatives, index), box_rc)))
    next_id = len(boxes) + 1
    for index in sorted({int(p[axis]) for p in positives}):
        remaining = on_slice(positives, index)
        if index in used_positive_slices:  # keep only the points no box took
            remaining = [
                p
                for p in remaining
                if not any(
                    lo[axis] <= index <= hi[axis]
                    and lo[rows_axis] <= p[0] <= hi[rows_axis]
                    and lo[cols_axis] <= p[1] <= hi[cols_axis]
                    for lo, hi in boxes
                )
            ]
        if remaining:
            jobs.append(SliceJob(index, next_id, _prompt(remaining, on_slice(negatives, index), None)))
            next_id += 1
    return jobs


def _prompt(
    positives: list[tuple[float, float]], negatives: list[tuple[float, float]], box_rc: tuple[int, int, int, int] | None
) -> SlicePrompt:
    points = positives + negatives
    if not points:
        return SlicePrompt(box_rc=box_rc)
    return SlicePrompt(
        points_rc=np.asarray(points, dtype=np.float64),
        point_labels=np.asarray([1] * len(positives) + [0] * len(negatives), dtype=np.int64),
        box_rc=None if box_rc is None else tuple(int(v) for v in box_rc),  # type: ignore[arg-type]
    )
