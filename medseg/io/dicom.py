"""DICOM series: a folder read as one volume through SimpleITK / GDCM.

A folder may hold several series; the one with the most files is read, and the others are named
in ``meta["dicom_other_series"]``. Slices are ordered by GDCM by their position along the slice
normal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.core.itk import array_affine_from_sitk
from medseg.errors import InvalidFileError

__all__ = ["read_dicom_series"]


def read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    import locale

    # GDCM switches the process's C locale to "C", which silently makes Python's default text
    # encoding ASCII for the rest of the process: put the locale back afterwards.
    saved_locale = locale.setlocale(locale.LC_ALL)
    try:
        return _read_dicom_series_unguarded(folder)
    finally:
        locale.setlocale(locale.LC_ALL, saved_locale)


def _read_dicom_series_unguarded(folder: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    series_ids = reader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise InvalidFileError(f"{folder}: folder holds no DICOM series")
    files_per_series = {sid: reader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids}
    series_id = max(files_per_series, key=lambda sid: len(files_per_series[sid]))
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
