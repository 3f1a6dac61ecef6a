"""`Volume`: voxels together with the geometry that places them in the patient.

A Volume is a channel-first array ``(C, *spatial)`` (2 or 3 spatial axes), a 4x4 affine that maps
voxel indices ``(i, j, k, 1)`` to **RAS+ millimetres** (the NIfTI / nibabel convention: +x = Right,
+y = Anterior, +z = Superior), a ``kind`` (``"image"`` or ``"label"``) and free-form ``meta``.

For 2D images the affine is still 4x4; its third column is the unit vector on z and the third
spatial index is absent. Geometry never travels apart from the pixels: every transform in medseg
takes a Volume and returns one (see :meth:`Volume.with_array`).

Example:
    >>> import numpy as np
    >>> v = Volume(np.zeros((1, 4, 5, 6), np.float32), np.diag([0.8, 0.8, 1.5, 1.0]))
    >>> v.spacing_mm
    (0.8, 0.8, 1.5)
    >>> v.orientation
    'RAS'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import numpy as np

from medseg.core.orientation import orientation_code

__all__ = ["Volume", "VolumeKind"]

VolumeKind = Literal["image", "label"]


@dataclass(frozen=True, eq=False, repr=False)
class Volume:
    """A channel-first voxel array with its voxel-to-RAS (mm) affine.

    Attributes:
        array: ``(C, *spatial)`` numpy array; 2 or 3 spatial axes. Label volumes hold integers.
        affine: 4x4 float64 matrix mapping voxel index ``(i, j, k, 1)`` to RAS+ millimetres.
        kind: ``"image"`` (interpolate linearly) or ``"label"`` (interpolate by nearest neighbour).
        meta: plain values describing the source (file path, format, NIfTI sform/qform codes, ...).
    """

    array: np.ndarray
    affine: np.ndarray
    kind: VolumeKind = "image"
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        array = np.asarray(self.array)
        affine = np.array(self.affine, dtype=np.float64)
        if array.ndim not in (3, 4):
            raise ValueError(f"Volume.array must be (C, *spatial) with 2 or 3 spatial axes, got shape {array.shape}")
        if affine.shape != (4, 4):
            raise ValueError(f"Volume.affine must be 4x4, got shape {affine.shape}")
        if not np.all(np.isfinite(affine)):
            raise ValueError("Volume.affine contains NaN or Inf")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise ValueError(f"Volume.affine is singular:\n{affine}")
        if self.kind not in ("image", "label"):
            raise ValueError(f"Volume.kind must be 'image' or 'label', got {self.kind!r}")
        if self.kind == "label" and array.dtype == np.bool_:
            array = array.astype(np.uint8)
        if self.kind == "label" and not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"a label Volume must hold integers, got dtype {array.dtype}")
        affine.setflags(write=False)
        object.__setattr__(self, "array", array)
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "meta", dict(self.meta))

    # -- geometry -------------------------------------------------------------------------
    @property
    def num_channels(self) -> int:
        """Number of channels C."""
        return int(self.array.shape[0])

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Shape of the spatial axes, ``array.shape[1:]``."""
        return tuple(int(s) for s in self.array.shape[1:])

    @property
    def spatial_ndim(self) -> int:
        """2 for images, 3 for volumes."""
        return self.array.ndim - 1

    @property
    def spacing_mm(self) -> tuple[float, ...]:
        """Voxel size along each spatial axis in mm: the norms of the affine's columns."""
        norms = np.linalg.norm(self.affine[:3, : self.spatial_ndim], axis=0)
        return tuple(float(n) for n in norms)

    @property
    def origin(self) -> tuple[float, ...]:
        """RAS position (mm) of the centre of voxel (0, 0, 0)."""
        return tuple(float(x) for x in self.affine[:3, 3])

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix of unit column vectors: RAS direction of each voxel axis."""
        rotation = self.affine[:3, :3]
        return rotation / np.linalg.norm(rotation, axis=0)

    @property
    def orientation(self) -> str:
        """Orientation code such as ``"RAS"`` or ``"LPS"`` (2 letters for 2D images)."""
        return orientation_code(self.affine, ndim=self.spatial_ndim)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (mm^3 / 1000); for 2D, the pixel area in mm^2 / 1000."""
        return float(np.prod(self.spacing_mm)) / 1000.0

    def same_geometry(self, other: Volume, *, tolerance_mm: float = 1e-3, direction_tolerance: float = 1e-4) -> bool:
        """Whether ``other`` lies on the same voxel grid (channels and dtype are not compared)."""
        return not self.geometry_differences(other, tolerance_mm=tolerance_mm, direction_tolerance=direction_tolerance)

    def geometry_differences(
        self, other: Volume, *, tolerance_mm: float = 1e-3, direction_tolerance: float = 1e-4
    ) -> list[str]:
        """Human-readable list of the geometry fields that differ; empty when the grids agree.

        Args:
            other: the volume to compare with.
            tolerance_mm: largest allowed difference in spacing and origin (mm).
            direction_tolerance: largest allowed difference between direction cosines.
        """
        differences: list[str] = []
        if self.spatial_shape != other.spatial_shape:
            differences.append(f"shape {self.spatial_shape} vs {other.spatial_shape}")
            return differences
        spacing_a, spacing_b = np.array(self.spacing_mm), np.array(other.spacing_mm)
        if np.max(np.abs(spacing_a - spacing_b)) > tolerance_mm:
            differences.append(f"spacing_mm {_fmt(spacing_a)} vs {_fmt(spacing_b)} (tolerance {tolerance_mm} mm)")
        origin_a, origin_b = np.array(self.origin), np.array(other.origin)
        if np.max(np.abs(origin_a - origin_b)) > tolerance_mm:
            differences.append(f"origin {_fmt(origin_a)} vs {_fmt(origin_b)} (tolerance {tolerance_mm} mm)")
        if np.max(np.abs(self.direction - other.direction)) > direction_tolerance:
            differences.append(
                f"direction {self.orientation} vs {other.orientation} "
                f"(max cosine difference {np.max(np.abs(self.direction - other.direction)):.2g})"
            )
        return differences

    # -- derived volumes ------------------------------------------------------------------
    def with_array(
        self,
        array: np.ndarray,
        *,
        kind: VolumeKind | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Volume:
        """A new Volume with the same affine and a new array of the same spatial shape.

        Args:
            array: ``(C, *spatial)`` array, or ``spatial`` alone (a channel axis is added).
            kind: the new kind; defaults to this volume's kind.
            meta: the new meta; defaults to a copy of this volume's meta.
        """
        array = np.asarray(array)
        if array.ndim == self.spatial_ndim:
            array = array[None]
        if tuple(array.shape[1:]) != self.spatial_shape:
            raise ValueError(f"with_array: spatial shape {tuple(array.shape[1:])} differs from {self.spatial_shape}")
        return Volume(
            array,
            self.affine,
            kind=self.kind if kind is None else kind,
            meta=dict(self.meta) if meta is None else meta,
        )

    def channel(self, index: int = 0) -> np.ndarray:
        """The spatial array of one channel."""
        return self.array[index]

    def __repr__(self) -> str:
        spacing = "x".join(f"{s:.4g}" for s in self.spacing_mm)
        source = self.meta.get("path")
        where = f", path={source!r}" if source else ""
        return (
            f"Volume(kind={self.kind!r}, channels={self.num_channels}, "
            f"shape={self.spatial_shape}, spacing_mm={spacing}, orientation={self.orientation}, "
            f"dtype={self.array.dtype}{where})"
        )


def _fmt(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
