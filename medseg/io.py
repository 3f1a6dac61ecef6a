"""Reading and writing volumes: the only place medseg touches image files.

Formats (chosen by file name):

==========================  ==========  ==============================================
suffix                      library     notes
==========================  ==========  ==============================================
``.nii``, ``.nii.gz``       nibabel     qform/sform codes kept in ``meta`` and re-used
``.nrrd``, ``.nhdr``        SimpleITK   LPS world space, converted to RAS on read
``.mha``, ``.mhd``          SimpleITK   idem
a folder of DICOM files     SimpleITK   read only; the largest series in the folder
``.png``, ``.tif(f)``,      Pillow      2D; axes (x=column, y=row); no physical spacing,
``.gif``, ``.jpg``, ``.bmp``            so 1 mm pixels and ``meta["spacing_known"] = False``
==========================  ==========  ==============================================

Arrays are channel-first ``(C, x, y[, z])`` in voxel index order (i, j, k) with a RAS affine, the
same convention as nibabel. ITK stores LPS and orders arrays (z, y, x); the conversion between
the two lives in :func:`_flip_lps_ras` and is used by both :func:`from_sitk` and :func:`to_sitk`.

Label volumes (``kind="label"``) are always integer: float files whose values are all integral
are cast to the smallest integer type that holds them; any other value is a
:class:`~medseg.errors.LabelValueError` naming the file.

Every write is atomic: data go to a temporary file beside the target, which is renamed over the
target only once it is complete, so no half-written output is ever left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from medseg.errors import GeometryMismatchError, InvalidFileError, LabelValueError, MedsegUserError
from medseg.volume import Volume, VolumeKind

__all__ = [
    "read_volume",
    "read_channels",
    "write_volume",
    "atomic_path",
    "read_json",
    "check_same_grid",
    "as_label_array",
    "from_sitk",
    "to_sitk",
    "volume_suffix",
    "strip_volume_suffix",
    "NIFTI_SUFFIXES",
    "ITK_SUFFIXES",
    "IMAGE_2D_SUFFIXES",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_2D_SUFFIXES = (".png", ".tif", ".tiff", ".gif", ".jpg", ".jpeg", ".bmp")
_ALL_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + IMAGE_2D_SUFFIXES


def volume_suffix(path: str | os.PathLike[str]) -> str:
    """The format suffix of a path (``".nii.gz"`` counts as one suffix); ``""`` if unknown."""
    name = Path(path).name.lower()
    for suffix in _ALL_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def strip_volume_suffix(path: str | os.PathLike[str]) -> str:
    """File name without its format suffix: the case id of ``labels/case_001.nii.gz`` is ``case_001``."""
    name = Path(path).name
    suffix = volume_suffix(name)
    return name[: len(name) - len(suffix)] if suffix else Path(name).stem


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def read_volume(path: str | os.PathLike[str], *, kind: VolumeKind = "image") -> Volume:
    """Read an image or label volume with its geometry.

    Args:
        path: a file in one of the formats above, or a folder holding a DICOM series.
        kind: ``"image"`` (float32 array) or ``"label"`` (integer array, checked to be integral).

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
            array, affine, meta = _read_dicom_series(path)
        elif suffix in NIFTI_SUFFIXES:
            array, affine, meta = _read_nifti(path)
        elif suffix in ITK_SUFFIXES:
            array, affine, meta = _read_itk(path)
        elif suffix in IMAGE_2D_SUFFIXES:
            array, affine, meta = _read_2d(path, kind=kind)
        else:
            raise InvalidFileError(
                f"{path}: unsupported file type (expected one of {', '.join(_ALL_SUFFIXES)} "
                "or a DICOM folder)"
            )
    except InvalidFileError:
        raise
    except MemoryError:
        raise
    except Exception as error:  # every library raises its own types for corrupt files
        raise InvalidFileError(f"{path}: cannot read ({_describe(error)})") from error
    meta["path"] = str(path)
    if kind == "label":
        array = as_label_array(array, source=str(path))
    else:
        array = np.asarray(array, dtype=np.float32)
    try:
        return Volume(array, affine, kind=kind, meta=meta)
    except ValueError as error:  # singular or non-finite affine, unsupported shape
        raise InvalidFileError(f"{path}: invalid geometry ({error})") from None


def read_channels(
    paths: Sequence[str | os.PathLike[str]], *, tolerance_mm: float = 1e-3
) -> Volume:
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
            raise GeometryMismatchError(
                f"{path}: geometry differs from {paths[0]}: {'; '.join(differences)}"
            )
    if len(volumes) == 1:
        return first
    meta = dict(first.meta)
    meta["channel_paths"] = [str(p) for p in paths]
    return first.with_array(np.concatenate([v.array for v in volumes], axis=0), meta=meta)


def as_label_array(array: np.ndarray, *, source: str = "array") -> np.ndarray:
    """Return ``array`` as the smallest integer dtype that holds it.

    Float arrays are accepted when every value is finite and integral (some datasets store labels
    as float); anything else raises :class:`LabelValueError` naming ``source`` and a bad value.
    """
    array = np.asarray(array)
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            raise LabelValueError(f"{source}: label map holds NaN/Inf values")
        rounded = np.rint(array)
        bad = rounded != array
        if bad.any():
            example = float(array[bad].flat[0])
            raise LabelValueError(
                f"{source}: label map holds non-integral values (e.g. {example!r}); "
                "labels must be whole numbers"
            )
        array = rounded
    elif not np.issubdtype(array.dtype, np.integer):
        raise LabelValueError(f"{source}: label map has non-numeric dtype {array.dtype}")
    if array.size == 0:
        return array.astype(np.uint8)
    low, high = int(array.min()), int(array.max())
    for dtype in (np.uint8, np.int16, np.int32, np.int64):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return array.astype(dtype, copy=False)
    raise LabelValueError(f"{source}: label values {low}..{high} do not fit in int64")


def _describe(error: BaseException) -> str:
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
    }
    return np.ascontiguousarray(array), np.asarray(image.affine, dtype=np.float64), meta


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    array, affine = _array_affine_from_sitk(image)
    return array, affine, {"format": volume_suffix(path).lstrip(".")}


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray, dict]:
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
    array, affine = _array_affine_from_sitk(image)
    meta = {
        "format": "dicom",
        "dicom_series_uid": series_id,
        "dicom_num_files": len(files_per_series[series_id]),
        "dicom_other_series": sorted(set(series_ids) - {series_id}),
    }
    return array, affine, meta


def _read_2d(path: Path, *, kind: VolumeKind) -> tuple[np.ndarray, np.ndarray, dict]:
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        mode = image.mode
        if kind == "label":
            # Palette images (GIF) keep their palette *indices*: those are the stored labels.
            if mode not in ("1", "L", "P", "I", "I;16", "F"):
                raise InvalidFileError(
                    f"{path}: colour ({mode}) image cannot be a label map; save labels as greyscale or palette"
                )
            data = np.asarray(image)
        else:
            if mode in ("1", "LA"):
                image = image.convert("L")
            elif mode in ("P", "PA", "CMYK", "YCbCr", "HSV", "RGBA"):
                image = image.convert("RGB")
            data = np.asarray(image)
    if data.ndim == 2:
        array = data.T[None]  # (rows, cols) -> (1, x=cols, y=rows)
    else:
        array = np.transpose(data, (2, 1, 0))  # (rows, cols, c) -> (c, x, y)
    meta = {"format": volume_suffix(path).lstrip("."), "spacing_known": False, "pil_mode": mode}
    return np.ascontiguousarray(array), np.eye(4), meta


# ---------------------------------------------------------------------------------------------
# SimpleITK <-> Volume (the single place where LPS and RAS meet)
# ---------------------------------------------------------------------------------------------
def _flip_lps_ras(affine: np.ndarray) -> np.ndarray:
    """Map an affine between LPS and RAS world space (the map is its own inverse): negate x, y."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def _array_affine_from_sitk(image) -> tuple[np.ndarray, np.ndarray]:
    dim = image.GetDimension()
    if dim not in (2, 3):
        raise InvalidFileError(f"unsupported image dimension {dim}")
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
    array, affine = _array_affine_from_sitk(image)
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
        image = sitk.GetImageFromArray(
            np.ascontiguousarray(np.transpose(array, spatial_axes + [0])), isVector=True
        )
    affine_lps = _flip_lps_ras(np.asarray(volume.affine))
    linear = affine_lps[:dim, :dim]
    spacing = np.linalg.norm(linear, axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(d) for d in (linear / spacing).ravel()])
    image.SetOrigin([float(o) for o in affine_lps[:dim, 3]])
    return image


def read_json(path: str | os.PathLike[str], *, what: str,
              error: type[MedsegUserError] = MedsegUserError) -> object:
    """Parse a JSON file; any failure is one ``error`` naming the file and ``what`` it should be.

    Messages: ``"<path>: <what> not found"``, ``"<path>: invalid JSON (line L, column C: ...)"``,
    ``"<path>: cannot read <what> (<reason>)"``.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except json.JSONDecodeError as problem:
        raise error(f"{path}: invalid JSON (line {problem.lineno}, column {problem.colno}: {problem.msg})") from None
    except (OSError, UnicodeDecodeError) as problem:
        raise error(f"{path}: cannot read {what} ({problem})") from None


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the target's suffix so format-by-extension writers work. On any
    error the temporary file is removed and the target is left as it was.

    Example:
        >>> with atomic_path("out/table.csv") as tmp:        # doctest: +SKIP
        ...     frame.to_csv(tmp)
    """
    path = Path(path)
    suffix = volume_suffix(path) or "".join(path.suffixes[-1:])
    base = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    temporary = path.with_name(f".{base}.{uuid.uuid4().hex[:8]}.partial{suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise


def write_volume(
    volume: Volume,
    path: str | os.PathLike[str],
    *,
    make_parents: bool = True,
) -> Path:
    """Write ``volume`` atomically in the format given by ``path``'s suffix.

    NIfTI output keeps the source's qform/sform codes when the volume came from a NIfTI file
    (``meta["nifti_qform_code"]``/``["nifti_sform_code"]``); otherwise both are 1 (scanner).
    Label volumes are written as the smallest integer type holding their values.

    Raises:
        InvalidFileError: unsupported suffix, or the file cannot be written (disk full,
            permission denied, ...); the target is then untouched.
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
    try:
        if make_parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temporary:
            if suffix in NIFTI_SUFFIXES:
                _write_nifti(volume, temporary)
            elif suffix in ITK_SUFFIXES:
                _write_itk(volume, temporary)
            else:
                _write_2d(volume, temporary)
    except InvalidFileError:
        raise
    except OSError as error:
        reason = error.strerror or _describe(error)
        raise InvalidFileError(f"{path}: cannot write ({reason})") from error
    except RuntimeError as error:  # SimpleITK reports I/O failures as RuntimeError
        raise InvalidFileError(f"{path}: cannot write ({_describe(error)})") from error
    return path


def _output_array(volume: Volume) -> np.ndarray:
    if volume.kind == "label":
        return as_label_array(volume.array, source=str(volume.meta.get("path", "label volume")))
    return volume.array


def _write_nifti(volume: Volume, path: Path) -> None:
    import nibabel as nib

    array = _output_array(volume)
    data = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    image = nib.Nifti1Image(np.asarray(data), np.asarray(volume.affine))
    qform_code = int(volume.meta.get("nifti_qform_code", 1))
    sform_code = int(volume.meta.get("nifti_sform_code", 1))
    image.set_sform(np.asarray(volume.affine), code=sform_code)
    image.set_qform(np.asarray(volume.affine), code=qform_code)
    image.header.set_xyzt_units(xyz="mm", t="sec")
    image.header.set_data_dtype(data.dtype)
    nib.save(image, str(path))


def _write_itk(volume: Volume, path: Path) -> None:
    import SimpleITK as sitk

    array = _output_array(volume)
    image = to_sitk(volume.with_array(array, meta=volume.meta))
    sitk.WriteImage(image, str(path), True)


def _write_2d(volume: Volume, path: Path) -> None:
    from PIL import Image

    if volume.spatial_ndim != 2:
        raise InvalidFileError(f"{path}: only 2D volumes can be written as {volume_suffix(path)}")
    array = _output_array(volume)
    if array.shape[0] not in (1, 3, 4):
        raise InvalidFileError(f"{path}: {array.shape[0]} channels cannot be written as an image")
    if array.min() < 0 or array.max() > 65535 or not np.issubdtype(array.dtype, np.integer):
        raise InvalidFileError(
            f"{path}: 2D image files hold integers 0..65535; got dtype {array.dtype} "
            f"range {array.min()}..{array.max()} (write NIfTI instead)"
        )
    if array.shape[0] == 1:
        pixels = array[0].T
        pixels = pixels.astype(np.uint8) if pixels.max() <= 255 else pixels.astype(np.uint16)
    else:
        if array.max() > 255:
            raise InvalidFileError(f"{path}: colour images must hold values 0..255")
        pixels = np.transpose(array, (2, 1, 0)).astype(np.uint8)
    Image.fromarray(np.ascontiguousarray(pixels)).save(path)


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

