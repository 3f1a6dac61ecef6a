"""DICOM folders: the largest of several series, its geometry, and the process locale left alone."""

from __future__ import annotations

import locale
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import rotation_matrix

from medseg.core.itk import to_sitk
from medseg.core.volume import Volume
from medseg.io import read_volume

STUDY_UID = "1.2.826.0.1.3680043.2.1125.1.7"
LARGE_UID = "1.2.826.0.1.3680043.2.1125.1.7.1"
SMALL_UID = "1.2.826.0.1.3680043.2.1125.1.7.2"


def _ras_affine(spacing_mm: tuple[float, float, float], origin: tuple[float, float, float], angles_deg) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = rotation_matrix(tuple(np.deg2rad(angles_deg))) @ np.diag(spacing_mm)
    affine[:3, 3] = origin
    return affine


def _write_series(folder: Path, volume: Volume, *, series_uid: str, prefix: str) -> list[tuple[float, ...]]:
    """Write ``volume`` as one DICOM file per slice, as a scanner would; return each slice's LPS position.

    SimpleITK's DICOM writer sets the process locale to "C" as a side effect (see the module
    docstring of :mod:`medseg.io.dicom`), so the caller's locale is put back afterwards.
    """
    saved_locale = locale.setlocale(locale.LC_ALL)
    image = sitk.Cast(to_sitk(volume), sitk.sitkInt16)
    direction = image.GetDirection()  # row-major 3x3, LPS
    orientation = (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7])
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    positions = []
    try:
        for k in range(image.GetDepth()):
            slice_image = image[:, :, k]
            position = image.TransformIndexToPhysicalPoint((0, 0, k))
            positions.append(position)
            tags = {
                "0008|0060": "MR",
                "0008|0018": f"{series_uid}.{k + 1}",  # SOPInstanceUID
                "0020|000d": STUDY_UID,
                "0020|000e": series_uid,
                "0020|0013": str(k + 1),  # InstanceNumber
                "0020|0032": "\\".join(f"{v:.6f}" for v in position),  # ImagePositionPatient
                "0020|0037": "\\".join(f"{v:.6f}" for v in orientation),  # ImageOrientationPatient
            }
            for tag, value in tags.items():
                slice_image.SetMetaData(tag, value)
            writer.SetFileName(str(folder / f"{prefix}{k:03d}.dcm"))
            writer.Execute(slice_image)
    finally:
        locale.setlocale(locale.LC_ALL, saved_locale)
    return positions


@pytest.fixture
def two_series(tmp_path: Path) -> tuple[Path, Volume, list[tuple[float, ...]]]:
    """A folder with a 6x5x4 oblique series and a 6x5x3 axial one; returns the 4-slice volume written."""
    rng = np.random.default_rng(3)
    large = Volume(
        rng.integers(-500, 1500, size=(1, 6, 5, 4)).astype(np.float32),
        _ras_affine((0.7, 0.9, 2.5), (12.0, -30.5, 41.25), (20.0, -10.0, 30.0)),
    )
    small = Volume(
        rng.integers(0, 100, size=(1, 6, 5, 3)).astype(np.float32),
        _ras_affine((1.0, 1.0, 4.0), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    )
    folder = tmp_path / "dicom"
    folder.mkdir()
    positions = _write_series(folder, large, series_uid=LARGE_UID, prefix="a")
    _write_series(folder, small, series_uid=SMALL_UID, prefix="b")
    return folder, large, positions


def test_the_largest_series_is_read_and_the_other_named(two_series) -> None:
    folder, written, positions = two_series
    volume = read_volume(folder)
    assert volume.meta["format"] == "dicom"
    assert volume.meta["dicom_series_uid"] == LARGE_UID
    assert volume.meta["dicom_num_files"] == 4
    assert volume.meta["dicom_other_series"] == [SMALL_UID]
    assert volume.spatial_shape == (6, 5, 4)
    # geometry against what was written: pixel spacing, slice distance, first slice's position
    np.testing.assert_allclose(volume.spacing_mm, (0.7, 0.9, 2.5), atol=1e-4)
    first_lps = np.array(positions[0])
    np.testing.assert_allclose(volume.origin, first_lps * (-1, -1, 1), atol=1e-4)  # LPS -> RAS
    np.testing.assert_allclose(volume.affine, written.affine, atol=1e-4)
    np.testing.assert_array_equal(volume.array, written.array)


@pytest.fixture
def distinct_locale():
    """A process locale that differs from "C" in LC_CTYPE (so a switch to "C" shows), put back afterwards."""
    saved = locale.setlocale(locale.LC_ALL)
    for candidate in ("C.UTF-8", "C.utf8", "en_US.UTF-8"):
        try:
            locale.setlocale(locale.LC_ALL, candidate)
            break
        except locale.Error:
            continue
    try:
        yield locale.setlocale(locale.LC_ALL), locale.getpreferredencoding(False)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def test_reading_dicom_never_changes_the_locale_other_threads_see(two_series, distinct_locale) -> None:
    """GDCM's reader leaves the locale alone, and medseg must not set it either (setlocale is process-wide).

    SimpleITK releases the GIL while GDCM runs, so the watching thread samples the locale during the
    reads too, not only between them.
    """
    folder, _, _ = two_series
    seen: set[tuple[str, str]] = set()
    samples = 0
    done = threading.Event()
    errors: list[BaseException] = []

    def watch() -> None:
        nonlocal samples
        while not done.is_set():
            seen.add((locale.setlocale(locale.LC_ALL), locale.getpreferredencoding(False)))
            samples += 1

    def read() -> None:
        try:
            for _ in range(5):
                read_volume(folder)
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            errors.append(error)
        finally:
            done.set()

    watcher = threading.Thread(target=watch)
    reader = threading.Thread(target=read)
    watcher.start()
    reader.start()
    reader.join(timeout=120)
    done.set()
    watcher.join(timeout=10)
    assert not errors, errors
    assert samples > 0
    assert seen == {distinct_locale}
    assert (locale.setlocale(locale.LC_ALL), locale.getpreferredencoding(False)) == distinct_locale


def test_reading_dicom_sets_no_locale(two_series, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not even a save-and-restore: restoring is a process-wide write that can undo another thread's change."""
    folder, _, _ = two_series
    real_setlocale = locale.setlocale
    changes: list[tuple[int, str]] = []

    def recording_setlocale(category: int, value: str | None = None) -> str:
        if value is not None:
            changes.append((category, value))
        return real_setlocale(category, value)

    monkeypatch.setattr(locale, "setlocale", recording_setlocale)
    read_volume(folder)
    assert changes == []
