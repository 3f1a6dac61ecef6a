"""Resampling a volume onto another volume's voxel grid (SimpleITK, no torch).

The kind chooses the interpolation: label volumes use nearest neighbour (labels are never
blended), images use linear interpolation. Points outside the source get ``default_value``.

Example:
    >>> aligned = resample_to(prediction, reference)     # doctest: +SKIP
    >>> aligned.same_geometry(reference)                 # doctest: +SKIP
    True
"""

from __future__ import annotations

import numpy as np

from medseg.core.itk import from_sitk, to_sitk
from medseg.core.labels import as_label_array
from medseg.core.volume import Volume

__all__ = ["resample_to"]


def resample_to(volume: Volume, reference: Volume, *, default_value: float = 0.0) -> Volume:
    """Resample ``volume`` onto ``reference``'s grid (shape, spacing, origin, direction).

    Args:
        volume: the volume to resample; its kind picks nearest (label) or linear (image).
        reference: the volume whose grid the result takes.
        default_value: value for points that fall outside ``volume``.

    Returns:
        A Volume with ``reference``'s affine and spatial shape and ``volume``'s kind and meta.
    """
    import SimpleITK as sitk

    if volume.spatial_ndim != reference.spatial_ndim:
        raise ValueError(f"cannot resample a {volume.spatial_ndim}D volume onto a {reference.spatial_ndim}D grid")
    interpolator = sitk.sitkNearestNeighbor if volume.kind == "label" else sitk.sitkLinear
    grid = to_sitk(reference.with_array(np.zeros((1, *reference.spatial_shape), np.uint8), kind="image"))
    channels = []
    for channel in range(volume.num_channels):
        moving = to_sitk(volume, channel=channel)
        resampled = sitk.Resample(moving, grid, sitk.Transform(), interpolator, default_value, moving.GetPixelID())
        channels.append(from_sitk(resampled).array[0])
    array = np.stack(channels)
    if volume.kind == "label":
        array = as_label_array(array, source=str(volume.meta.get("path", "label volume")))
    else:
        array = array.astype(np.float32, copy=False)
    meta = dict(volume.meta)
    meta["resampled_to"] = str(reference.meta.get("path", "reference grid"))
    return Volume(array, reference.affine, kind=volume.kind, meta=meta)
