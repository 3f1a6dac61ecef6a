"""Reading and writing volumes: the only place medseg touches image files.

Formats (chosen by file name):

==========================  ==========  ==============================================
suffix                      library     notes
==========================  ==========  ==============================================
``.nii``, ``.nii.gz``       nibabel     qform and sform (and codes) kept in ``meta``, re-written
``.nrrd``, ``.nhdr``        SimpleITK   LPS world space, converted to RAS on read
``.mha``, ``.mhd``          SimpleITK   idem
a folder of DICOM files     SimpleITK   read only; the largest series in the folder
``.dcm`` (a DICOM-SEG)      highdicom   read here as a label map; written by :mod:`medseg.io.dicom_seg`
``.seg.nrrd``               SimpleITK   3D Slicer segmentation; with segment names: :mod:`medseg.io.viewer`
``.png``, ``.tif(f)``,      Pillow      2D; axes (x=column, y=row); no physical spacing,
``.gif``, ``.jpg``, ``.bmp``            so 1 mm pixels and ``meta["spacing_known"] = False``
==========================  ==========  ==============================================

Arrays are channel-first ``(C, x, y[, z])`` in voxel index order (i, j, k) with a RAS affine, the
same convention as nibabel. ITK stores LPS and orders arrays (z, y, x); the conversion between
the two lives in :mod:`medseg.core.itk`.

Label volumes (``kind="label"``) are always integer: float files whose values are all integral
are cast to the smallest integer type that holds them; any other value is a
:class:`~medseg.errors.LabelValueError` naming the file.

Every write is atomic (:func:`medseg.io.files.atomic_path`): data go to a temporary file beside the
target, which is fsynced and renamed over the target only once it is complete, so no half-written
output is ever left behind.

A NIfTI written from a Volume read from a NIfTI keeps the source header's qform and sform and their
codes as they were (they may differ: scanners often store a rigid qform beside a sheared sform), as
long as the Volume still has the source's affine; otherwise both take the Volume's affine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from medseg.core.itk import array_affine_from_sitk, to_sitk
from medseg.core.labels import as_label_array
from medseg.core.volume import Volume, VolumeKind
from medseg.errors import GeometryMismatchError, InvalidFileError, MedsegUserError, OutputError
from medseg.io.dicom import read_dicom_series
from medseg.io.files import atomic_path
from medseg.io.images2d import read_2d, write_2d

__all__ = [
    "read_volume",
    "read_channels",
    "write_volume",
    "check_same_grid",
    "volume_suffix",
    "strip_volume_suffix",
    "describe_error",
    "NIFTI_SUFFIXES",
    "ITK_SUFFIXES",
    "IMAGE_2D_SUFFIXES",
    "VOLUME_SUFFIXES",
    "DICOM_SEG_SUFFIX",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")


ITK_SUFFIXES = (".seg.nrrd", ".nrrd", ".nhdr", ".mha", ".mhd")  # .seg.nrrd: 3D Slicer (medseg.io.viewer)


IMAGE_2D_SUFFIXES = (".png", ".tif", ".tiff", ".gif", ".jpg", ".jpeg", ".bmp")


VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + IMAGE_2D_SUFFIXES

# a single .dcm file is read as a DICOM-SEG label map (an image series is a folder); not in VOLUME_SUFFIXES,
# because the .dcm files of a series folder are slices, not cases
DICOM_SEG_SUFFIX = ".dcm"


def volume_suffix(path: str | os.PathLike[str]) -> str:
    """The format suffix of a path (``".nii.gz"`` counts as one suffix); ``""`` if unknown."""
    name = Path(path).name.lower()
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def strip_volume_suffix(path: str | os.PathLike[str]) -> str:
    """File name without its format suffix: the case id of ``labels/case_001.nii.gz`` is ``case_001``."""
    name = Path(path).name
    suffix = volume_suffix(name)
    return name[: len(name) - len(suffix)] if suffix else Path(name).stem


def read_volume(path: str | os.PathLike[str], *, kind: VolumeKind = "image") -> Volume:
    """Read an image or label volume with its geometry.

    Args:
        path: a file in one of the formats above, or a folder holding a DICOM series.
        kind: ``"image"`` (float32 array, C-contiguous) or ``"label"`` (integer array, checked to be
            integral; C- or Fortran-contiguous as stored: a NIfTI label map is not transposed).

    Returns:
        A :class:`~medseg.volume.Volume` whose ``meta`` holds ``path`` and ``format``.

    Raises:
        InvalidFileError: the file is missing, unreadable, corrupt or of an unknown format.
        LabelValueError: ``kind="label"`` and the file holds non-integral or non-finite values.

    Example:
        >>> img = read_volume("ct.nii.gz")                       # doctest: +SKIP
        >>> seg = read_volume("ct_seg.nii.gz", kind="label")      # doctest: +SKIP
    """
    if kind not in ("image", "label"):
        raise ValueError(f"kind must be 'image' or 'label', got {kind!r}")
    path = Path(path)
    if not path.exists():
        raise InvalidFileError(f"{path}: file not found")
    suffix = volume_suffix(path)
    try:
        if path.is_dir():
            array, affine, meta = read_dicom_series(path)
        elif path.name.lower().endswith(DICOM_SEG_SUFFIX):
            from medseg.io.dicom_seg import read_dicom_seg

            array, affine, meta = read_dicom_seg(path)
        elif suffix in NIFTI_SUFFIXES:
            array, affine, meta = _read_nifti(path)
        elif suffix in ITK_SUFFIXES:
            array, affine, meta = _read_itk(path)
        elif suffix in IMAGE_2D_SUFFIXES:
            array, affine, meta = read_2d(path, kind=kind)
        else:
            raise InvalidFileError(
                f"{path}: unsupported file type (expected one of {', '.join(VOLUME_SUFFIXES)}, a .dcm DICOM-SEG or a DICOM folder)"
            )
    except MedsegUserError:  # already one line naming the file
        raise
    except MemoryError:
        raise
    except Exception as error:  # every library raises its own types for corrupt files
        raise InvalidFileError(f"{path}: cannot read ({describe_error(error)})") from error
    meta["path"] = str(path)
    if kind == "label":
        # a label map keeps the file's memory order (NIfTI stores x fastest, i.e. Fortran order): the
        # metrics work in either order, and a transposing copy costs more than decoding the file
        array = as_label_array(array, source=str(path))
        if not (array.flags.c_contiguous or array.flags.f_contiguous):
            array = np.ascontiguousarray(array)
    else:
        array = np.ascontiguousarray(array, dtype=np.float32)  # one pass: conversion and C order
    try:
        return Volume(array, affine, kind=kind, meta=meta)
    except ValueError as error:  # singular or non-finite affine, unsupported shape
        raise InvalidFileError(f"{path}: invalid geometry ({error})") from None


def read_channels(paths: Sequence[str | os.PathLike[str]], *, tolerance_mm: float = 1e-3) -> Volume:
    """Read one image per channel and stack them; every channel must share the first's grid.

    Raises:
        GeometryMismatchError: naming both files and the field that differs.
    """
    if not paths:
        raise ValueError("read_channels needs at least one path")
    volumes = [read_volume(p, kind="image") for p in paths]
    first = volumes[0]
    for path, other in zip(paths[1:], volumes[1:]):
        differences = first.geometry_differences(other, tolerance_mm=tolerance_mm)
        if differences:
            raise GeometryMismatchError(f"{path}: geometry differs from {paths[0]}: {'; '.join(differences)}")
    if len(volumes) == 1:
        return first
    meta = dict(first.meta)
    meta["channel_paths"] = [str(p) for p in paths]
    return first.with_array(np.concatenate([v.array for v in volumes], axis=0), meta=meta)


def describe_error(error: BaseException) -> str:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    import nibabel as nib

    image = nib.load(str(path))
    data = np.asarray(image.dataobj)
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim == 3:
        array = data[None]
    elif data.ndim == 4:
        array = np.moveaxis(data, -1, 0)
    elif data.ndim == 5 and data.shape[3] == 1:  # ITK's vector images: (x, y, z, 1, c)
        array = np.moveaxis(data[:, :, :, 0, :], -1, 0)
    else:
        raise InvalidFileError(f"{path}: unsupported NIfTI shape {data.shape}")
    header = image.header
    meta = {
        "format": "nifti",
        "nifti_qform_code": int(header["qform_code"]),
        "nifti_sform_code": int(header["sform_code"]),
        "nifti_qform": header.get_qform().tolist(),
        "nifti_sform": header.get_sform().tolist(),
    }
    return array, np.asarray(image.affine, dtype=np.float64), meta  # the file's (Fortran) order: see read_volume


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    array, affine = array_affine_from_sitk(image)
    return array, affine, {"format": volume_suffix(path).lstrip(".")}


def write_volume(
    volume: Volume,
    path: str | os.PathLike[str],
    *,
    make_parents: bool = True,
) -> Path:
    """Write ``volume`` atomically in the format given by ``path``'s suffix.

    NIfTI output keeps the source's qform/sform codes when the volume came from a NIfTI file
    (``meta["nifti_qform_code"]``/``["nifti_sform_code"]``); otherwise both are 1 (scanner). While
    the volume still has the affine read from that file, the source's qform and sform matrices are
    written as they were (``meta["nifti_qform"]``/``["nifti_sform"]``, which may differ); once the
    affine changed, both are the volume's affine.
    Label volumes are written as the smallest integer type holding their values.

    Raises:
        InvalidFileError: unsupported suffix.
        OutputError: the file cannot be written (disk full, permission denied, ...); the target
            is then untouched.
    """
    path = Path(path)
    suffix = volume_suffix(path)
    if suffix not in NIFTI_SUFFIXES + ITK_SUFFIXES + IMAGE_2D_SUFFIXES or suffix == ".nhdr":
        raise InvalidFileError(
            f"{path}: cannot write this file type (use .nii.gz, .nii, .nrrd, .mha, .mhd, .png, .tif)"
        )
    if suffix == ".gif":
        raise InvalidFileError(f"{path}: GIF stores palette indices, not values; write .png instead")
    if suffix == ".mhd":
        raise InvalidFileError(f"{path}: .mhd writes two files and cannot be atomic; use .mha")
    if make_parents:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"{path.parent}: cannot create folder ({error.strerror or error})") from error
    try:
        with atomic_path(path) as temporary:
            if suffix in NIFTI_SUFFIXES:
                _write_nifti(volume, temporary)
            elif suffix in ITK_SUFFIXES:
                _write_itk(volume, temporary)
            else:
                write_2d(volume, temporary)
    except RuntimeError as error:  # SimpleITK reports I/O failures as RuntimeError
        raise OutputError(f"{path}: cannot write ({describe_error(error)})") from error
    return path


def _output_array(volume: Volume) -> np.ndarray:
    if volume.kind == "label":
        return as_label_array(volume.array, source=str(volume.meta.get("path", "label volume")))
    return volume.array


def _source_header_affines(volume: Volume) -> tuple[np.ndarray, np.ndarray] | None:
    """The source NIfTI's (qform, sform) when ``volume`` still has the affine read from that header."""
    meta = volume.meta
    if "nifti_qform" not in meta or "nifti_sform" not in meta:
        return None
    qform, sform = np.asarray(meta["nifti_qform"], float), np.asarray(meta["nifti_sform"], float)
    if qform.shape != (4, 4) or sform.shape != (4, 4):
        return None
    # nibabel's rule for the affine of a header: the sform when its code is set, else the qform
    read_affine = sform if int(meta.get("nifti_sform_code", 0)) > 0 else qform
    if not np.allclose(read_affine, volume.affine, atol=1e-6):
        return None  # the geometry changed since it was read: the old header no longer applies
    return qform, sform


def _write_nifti(volume: Volume, path: Path) -> None:
    import nibabel as nib

    array = _output_array(volume)
    data = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    image = nib.Nifti1Image(np.asarray(data), np.asarray(volume.affine))
    qform_code = int(volume.meta.get("nifti_qform_code", 1))
    sform_code = int(volume.meta.get("nifti_sform_code", 1))
    source = _source_header_affines(volume)
    qform, sform = source if source is not None else (np.asarray(volume.affine), np.asarray(volume.affine))
    image.set_sform(sform, code=sform_code)
    image.set_qform(qform, code=qform_code)
    image.header.set_xyzt_units(xyz="mm", t="sec")
    image.header.set_data_dtype(data.dtype)
    nib.save(image, str(path))


def _write_itk(volume: Volume, path: Path) -> None:
    import SimpleITK as sitk

    array = _output_array(volume)
    image = to_sitk(volume.with_array(array, meta=volume.meta))
    sitk.WriteImage(image, str(path), True)


def check_same_grid(
    reference: Volume,
    other: Volume,
    *,
    tolerance_mm: float = 1e-3,
) -> None:
    """Raise :class:`GeometryMismatchError` naming both files and every differing field."""
    differences = reference.geometry_differences(other, tolerance_mm=tolerance_mm)
    if differences:
        raise GeometryMismatchError(
            f"{other.meta.get('path', 'volume')} vs {reference.meta.get('path', 'reference')}: "
            f"geometry differs: {'; '.join(differences)}"
        )
