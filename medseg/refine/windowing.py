"""Intensity windowing: medical intensities -> the 0..255 RGB slices Segment-Anything expects.

SAM was trained on 8-bit photographs, so a CT or MRI slice must first be mapped to 0..255. The
mapping is chosen once per volume (not per slice), so a structure keeps its grey level from one
slice to the next:

* CT: a fixed Hounsfield window, by default the soft-tissue window ``[-160, 240]`` HU (level 40,
  width 400), or one the user gives (e.g. ``(-1000, 400)`` for lung, ``(-200, 1200)`` for bone).
* MRI (and anything without calibrated units): the 0.5 and 99.5 percentiles of the volume's
  non-zero voxels, which removes the few very bright voxels that would otherwise flatten
  the contrast.

Example:
    >>> import numpy as np
    >>> low, high = intensity_window(np.array([-1000.0, 0.0, 40.0, 3000.0]), modality="ct")
    >>> (low, high)
    (-160.0, 240.0)
    >>> to_uint8(np.array([-200.0, 40.0, 500.0]), low, high).tolist()
    [0, 128, 255]
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = [
    "CT_SOFT_TISSUE_WINDOW_HU",
    "MRI_PERCENTILES",
    "Modality",
    "intensity_window",
    "to_uint8",
    "slice_to_rgb",
]

#: the default CT window (HU): soft tissue, level 40, width 400
CT_SOFT_TISSUE_WINDOW_HU = (-160.0, 240.0)
#: the percentiles (in %) that bound the MRI window
MRI_PERCENTILES = (0.5, 99.5)

Modality = Literal["auto", "ct", "mri"]


def intensity_window(
    array: np.ndarray,
    *,
    modality: Modality = "auto",
    window: tuple[float, float] | None = None,
) -> tuple[float, float]:
    """The ``(low, high)`` intensity window for a whole volume.

    Args:
        array: the image intensities (any shape).
        modality: ``"ct"`` (a fixed HU window), ``"mri"`` (percentiles of the non-zero voxels) or
            ``"auto"``: CT when the volume holds air-like values (minimum <= -500, which only
            Hounsfield units do), otherwise MRI.
        window: an explicit ``(low, high)``; overrides ``modality``.

    Raises:
        ValueError: a window whose low end is not below its high end, or an unknown modality.
    """
    if window is not None:
        low, high = float(window[0]), float(window[1])
        if not np.isfinite(low) or not np.isfinite(high) or low >= high:
            raise ValueError(f"intensity window must be (low, high) with low < high, got {window}")
        return low, high
    if modality not in ("auto", "ct", "mri"):
        raise ValueError(f"modality must be 'auto', 'ct' or 'mri', got {modality!r}")
    values = np.asarray(array, dtype=np.float32)
    finite = values[np.isfinite(values)]
    if modality == "auto":
        modality = "ct" if finite.size and float(finite.min()) <= -500.0 else "mri"
    if modality == "ct":
        return CT_SOFT_TISSUE_WINDOW_HU
    foreground = finite[finite != 0]
    if foreground.size == 0:
        foreground = finite
    if foreground.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(foreground, MRI_PERCENTILES))
    if high <= low:  # a constant image: any window shows it as one grey level
        high = low + 1.0
    return low, high


def to_uint8(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip ``array`` to ``[low, high]`` and scale it linearly to 0..255 (rounded), as uint8."""
    scaled = (np.asarray(array, dtype=np.float32) - low) * (255.0 / (high - low))
    return np.clip(np.rint(np.nan_to_num(scaled, nan=0.0)), 0, 255).astype(np.uint8)


def slice_to_rgb(slice_2d: np.ndarray, low: float, high: float) -> np.ndarray:
    """A 2D slice as the ``(H, W, 3)`` uint8 grey-level RGB image SAM takes."""
    if np.asarray(slice_2d).ndim != 2:
        raise ValueError(f"slice_to_rgb takes a 2D slice, got shape {np.shape(slice_2d)}")
    grey = to_uint8(slice_2d, low, high)
    return np.repeat(grey[:, :, None], 3, axis=2)
