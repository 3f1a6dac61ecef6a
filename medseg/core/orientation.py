"""Orientation of a voxel grid in RAS world space, through nibabel (the reference implementation).

* :func:`orientation_code`: the axis code of an affine, such as ``"RAS"`` or ``"LPS"`` (nibabel's
  ``aff2axcodes``): each voxel axis is named by the world direction it points to.
* :func:`ras_axis_order`: for each RAS world axis, the voxel axis that runs along it (nibabel's
  ``io_orientation``), which is also the permutation MONAI's ``Orientation("RAS")`` applies.

Both decide *jointly* which voxel axis belongs to which world axis (nibabel solves the assignment
from the affine's rotation as a whole), so an oblique volume near 45 degrees gets the same answer
here, in MONAI's reorientation and in nibabel. A greedy axis-by-axis choice can disagree with them
there and put a target spacing on the wrong axis.

Example:
    >>> import numpy as np
    >>> orientation_code(np.diag([-1.0, -1.0, 2.0, 1.0]))
    'LPS'
    >>> ras_axis_order(np.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]]))
    [1, 2, 0]
"""

from __future__ import annotations

import numpy as np

__all__ = ["orientation_code", "ras_axis_order"]

_AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def _orientation(affine: np.ndarray, ndim: int) -> np.ndarray:
    """nibabel's ``io_orientation`` of the first ``ndim`` voxel axes: rows ``(world_axis, +1|-1)``."""
    from nibabel.orientations import io_orientation

    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    ornt = io_orientation(affine)
    if np.isnan(ornt[:ndim]).any():
        raise ValueError(f"affine has a degenerate voxel axis:\n{affine}")
    return ornt[:ndim]


def orientation_code(affine: np.ndarray, *, ndim: int = 3) -> str:
    """Orientation code of an affine, e.g. ``"RAS"`` (nibabel's ``aff2axcodes``).

    ``"RAS"`` means i increases to the Right, j to Anterior, k to Superior; a DICOM/ITK LPS image
    read into RAS space reads ``"LPS"``. For a 2D image (``ndim=2``) the first two letters.

    Args:
        affine: 4x4 voxel-to-RAS affine.
        ndim: number of spatial axes to name (2 or 3).
    """
    ornt = _orientation(affine, ndim)
    return "".join(_AXIS_LABELS[int(world)][1 if sign > 0 else 0] for world, sign in ornt)


def ras_axis_order(affine: np.ndarray, *, ndim: int = 3) -> list[int]:
    """For each RAS world axis (R, A, S in order), the voxel axis that runs along it.

    Per-axis quantities of a volume (spacing, shape) are put in RAS order with
    ``[values[a] for a in ras_axis_order(affine)]``, the order in which MONAI's
    ``Orientation("RAS")`` lays out the reoriented array.

    Args:
        affine: 4x4 voxel-to-RAS affine.
        ndim: number of spatial axes (a 2D image keeps its own axis order).
    """
    if ndim != 3:
        return list(range(ndim))
    ornt = _orientation(affine, ndim)
    order = [0] * ndim
    for voxel_axis, (world, _) in enumerate(ornt):
        order[int(world)] = voxel_axis
    return order
