"""SimpleITK images <-> Volumes: the single place where ITK's LPS world and medseg's RAS world meet.

ITK stores physical points in LPS (+x = Left, +y = Posterior) and orders arrays ``(z, y, x)``;
medseg stores RAS affines and channel-first ``(C, x, y[, z])`` arrays, as nibabel does. The map
between the two affines negates x and y (:func:`_flip_lps_ras`, its own inverse) and is used in
both directions, by :func:`from_sitk` and :func:`to_sitk`.
"""

from __future__ import annotations

import numpy as np

from medseg.core.labels import as_label_array
from medseg.core.volume import Volume, VolumeKind

__all__ = ["from_sitk", "to_sitk", "array_affine_from_sitk"]


def _flip_lps_ras(affine: np.ndarray) -> np.ndarray:
    """Map an affine between LPS and RAS world space (the map is its own inverse): negate x, y."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def array_affine_from_sitk(image) -> tuple[np.ndarray, np.ndarray]:
    dim = image.GetDimension()
    if dim not in (2, 3):
        raise ValueError(f"unsupported image dimension {dim}")
    import SimpleITK as sitk

    data = sitk.GetArrayFromImage(image)
    components = image.GetNumberOfComponentsPerPixel()
    spatial_axes = list(range(dim))[::-1]  # ITK arrays are (z, y, x[, c])
    if components > 1:
        array = np.transpose(data, [dim] + spatial_axes)
    else:
        array = np.transpose(data, spatial_axes)[None]
    affine_lps = np.eye(4)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
    affine_lps[:dim, :dim] = direction @ np.diag(image.GetSpacing())
    affine_lps[:dim, 3] = image.GetOrigin()
    return np.ascontiguousarray(array), _flip_lps_ras(affine_lps)


def from_sitk(image, *, kind: VolumeKind = "image") -> Volume:
    """Convert a SimpleITK image (LPS) to a Volume (RAS)."""
    array, affine = array_affine_from_sitk(image)
    if kind == "label":
        array = as_label_array(array, source="SimpleITK image")
    return Volume(array, affine, kind=kind, meta={"format": "sitk"})


def to_sitk(volume: Volume, *, channel: int | None = None):
    """Convert a Volume (RAS) to a SimpleITK image (LPS); several channels become a vector image.

    Args:
        volume: the volume to convert.
        channel: convert only this channel; by default all channels.
    """
    import SimpleITK as sitk

    array = volume.array if channel is None else volume.array[channel : channel + 1]
    dim = volume.spatial_ndim
    spatial_axes = list(range(1, dim + 1))[::-1]
    if array.shape[0] == 1:
        image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array[0], [a - 1 for a in spatial_axes])))
    else:
        image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, spatial_axes + [0])), isVector=True)
    affine_lps = _flip_lps_ras(np.asarray(volume.affine))
    linear = affine_lps[:dim, :dim]
    spacing = np.linalg.norm(linear, axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(d) for d in (linear / spacing).ravel()])
    image.SetOrigin([float(o) for o in affine_lps[:dim, 3]])
    return image
