"""DICOM series: a folder read as one volume through SimpleITK / GDCM.

A folder may hold several series; the one with the most files is read, and the others are named
in ``meta["dicom_other_series"]``. Slices are ordered by GDCM by their position along the slice
normal.

The process locale is left alone. With SimpleITK 2.5.7 (ITK 5.4), listing the series
(``GetGDCMSeriesIDs``, ``GetGDCMSeriesFileNames``) and reading them (``ImageSeriesReader.Execute``)
make no ``setlocale`` or ``uselocale`` call at all (checked by interposing both libc functions),
so nothing is saved or restored here: ``locale.setlocale`` with a value is itself a process-wide
change that other threads can observe, and "restoring" a saved value can undo a change another
thread made meanwhile. SimpleITK's DICOM *writer* is another matter: writing DS tags such as
ImagePositionPatient calls ``std::locale::global``, which sets the C locale of the whole process
to ``"C"`` and leaves it there (Python's default text encoding then reads ASCII). medseg never
writes DICOM; code that does should expect that.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.core.itk import array_affine_from_sitk
from medseg.errors import InvalidFileError

__all__ = ["read_dicom_series"]


def read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read the largest DICOM series in ``folder``.

    Args:
        folder: a folder holding the files of one or more series (not searched recursively).

    Returns:
        The ``(C, x, y, z)`` array, its RAS affine and ``meta`` with ``format``,
        ``dicom_series_uid``, ``dicom_num_files`` and ``dicom_other_series`` (the other series'
        UIDs, sorted).

    Raises:
        InvalidFileError: the folder holds no DICOM series. GDCM's own errors (corrupt files)
            propagate as ``RuntimeError``; :func:`medseg.io.read_volume` names the folder in them.
    """
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
