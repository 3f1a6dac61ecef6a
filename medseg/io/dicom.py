"""DICOM series: a folder read as one volume through SimpleITK / GDCM, its slices checked first.

A folder may hold several series; the one with the most files is read, and the others are named
in ``meta["dicom_other_series"]``; when two series tie for most files, which one is meant is
unclear and reading stops with an error. Slices are ordered by GDCM by their position along the
slice normal, so file names and file order do not matter (out-of-order files are handled).

Before reading, :func:`check_series_slices` checks the stack the way a volume needs it; each
problem is one :class:`~medseg.errors.InvalidFileError` naming the folder (ITK itself only warns
and then reads a gap as a stretched slice spacing):

* every slice has the same orientation (ImageOrientationPatient);
* no two slices share a position (two acquisitions under one series UID);
* consecutive slices are equally spaced along the normal within 1 % (at least 0.01 mm): a gap
  that is a whole multiple of the spacing is reported as missing slices, any other difference as
  non-uniform spacing.

The process locale is left alone. With SimpleITK 2.5.7 (ITK 5.4), listing the series
(``GetGDCMSeriesIDs``, ``GetGDCMSeriesFileNames``) and reading them (``ImageSeriesReader.Execute``)
make no ``setlocale`` or ``uselocale`` call at all (checked by interposing both libc functions),
so nothing is saved or restored here: ``locale.setlocale`` with a value is itself a process-wide
change that other threads can observe, and "restoring" a saved value can undo a change another
thread made meanwhile. SimpleITK's DICOM *writer* is another matter: writing DS tags such as
ImagePositionPatient calls ``std::locale::global``, which sets the C locale of the whole process
to ``"C"`` and leaves it there (Python's default text encoding then reads ASCII). medseg writes
DICOM (DICOM-SEG, :mod:`medseg.io.dicom_seg`) with pydicom / highdicom only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from medseg.core.itk import array_affine_from_sitk
from medseg.errors import InvalidFileError

__all__ = ["read_dicom_series", "check_series_slices", "SLICE_SPACING_RTOL", "SLICE_SPACING_ATOL_MM"]

SLICE_SPACING_RTOL = 0.01
SLICE_SPACING_ATOL_MM = 0.01
_ORIENTATION_TOLERANCE = 1e-4


def read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read the largest DICOM series in ``folder``.

    Args:
        folder: a folder holding the files of one or more series (not searched recursively).

    Returns:
        The ``(C, x, y, z)`` array, its RAS affine and ``meta`` with ``format``,
        ``dicom_series_uid``, ``dicom_num_files`` and ``dicom_other_series`` (the other series'
        UIDs, sorted).

    Raises:
        InvalidFileError: the folder holds no DICOM series, two series of the same size, or a
            series whose slices do not form a regular stack (:func:`check_series_slices`). GDCM's
            own errors (corrupt files) propagate as ``RuntimeError``; :func:`medseg.io.read_volume`
            names the folder in them.
    """
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    series_ids = reader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise InvalidFileError(f"{folder}: folder holds no DICOM series")
    files_per_series = {sid: reader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids}
    largest = max(len(files) for files in files_per_series.values())
    tied = sorted(sid for sid, files in files_per_series.items() if len(files) == largest)
    if len(tied) > 1:
        raise InvalidFileError(
            f"{folder}: folder mixes {len(series_ids)} DICOM series and {len(tied)} have {largest} files "
            f"({', '.join(tied[:3])}); put each series in its own folder"
        )
    series_id = tied[0]
    check_series_slices(folder, files_per_series[series_id])
    reader.SetFileNames(files_per_series[series_id])
    image = reader.Execute()
    array, affine = array_affine_from_sitk(image)
    meta = {
        "format": "dicom",
        "dicom_series_uid": series_id,
        "dicom_num_files": len(files_per_series[series_id]),
        "dicom_other_series": sorted(set(series_ids) - {series_id}),
    }
    return array, affine, meta


def _slice_header(path: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(ImageOrientationPatient, ImagePositionPatient) of one file, or None when it lacks them."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.LoadPrivateTagsOff()
    reader.ReadImageInformation()
    if not (reader.HasMetaDataKey("0020|0037") and reader.HasMetaDataKey("0020|0032")):
        return None
    try:
        orientation = np.array([float(v) for v in reader.GetMetaData("0020|0037").split("\\")], dtype=np.float64)
        position = np.array([float(v) for v in reader.GetMetaData("0020|0032").split("\\")], dtype=np.float64)
    except ValueError:
        return None
    if orientation.shape != (6,) or position.shape != (3,):
        return None
    return orientation, position


def check_series_slices(folder: Path, files: Sequence[str]) -> None:
    """Check that the files of one series form a regular stack of slices (see the module docstring).

    A single file (a 2D image or a multi-frame file) and files without ImagePositionPatient /
    ImageOrientationPatient are left to GDCM.

    Raises:
        InvalidFileError: one line naming the folder, the problem and the files or positions involved.
    """
    if len(files) < 2:
        return
    headers = [_slice_header(path) for path in files]
    if any(header is None for header in headers):
        return
    orientations = np.array([h[0] for h in headers])  # type: ignore[index]
    positions = np.array([h[1] for h in headers])  # type: ignore[index]
    differing = np.flatnonzero(np.max(np.abs(orientations - orientations[0]), axis=1) > _ORIENTATION_TOLERANCE)
    if differing.size:
        raise InvalidFileError(
            f"{folder}: slices of one series have different orientations "
            f"({Path(files[0]).name} vs {Path(files[differing[0]]).name}); put each stack in its own folder"
        )
    normal = np.cross(orientations[0, :3], orientations[0, 3:])
    order = np.argsort(positions @ normal, kind="stable")
    along_mm = (positions @ normal)[order]
    names = [Path(files[i]).name for i in order]
    steps_mm = np.diff(along_mm)
    duplicate = np.flatnonzero(steps_mm < SLICE_SPACING_ATOL_MM)
    if duplicate.size:
        i = int(duplicate[0])
        raise InvalidFileError(
            f"{folder}: two slices at the same position {along_mm[i]:.3f} mm along the normal "
            f"({names[i]}, {names[i + 1]}); the series holds more than one stack"
        )
    spacing_mm = float(np.min(steps_mm))
    tolerance_mm = max(SLICE_SPACING_RTOL * spacing_mm, SLICE_SPACING_ATOL_MM)
    off = np.flatnonzero(np.abs(steps_mm - spacing_mm) > tolerance_mm)
    if not off.size:
        return
    i = int(off[0])
    multiple = steps_mm[i] / spacing_mm
    if round(multiple) >= 2 and abs(steps_mm[i] - round(multiple) * spacing_mm) <= tolerance_mm:
        raise InvalidFileError(
            f"{folder}: {round(multiple) - 1} missing slice(s) between {names[i]} and {names[i + 1]} "
            f"(gap {steps_mm[i]:.4g} mm, slice spacing {spacing_mm:.4g} mm)"
        )
    raise InvalidFileError(
        f"{folder}: non-uniform slice spacing ({float(np.min(steps_mm)):.4g} to {float(np.max(steps_mm)):.4g} mm, "
        f"first between {names[i]} and {names[i + 1]}); resample the series to a regular grid first"
    )
