"""DICOM-SEG out and in: label maps as DICOM Segmentation objects that reference their source series.

Writing (:func:`write_dicom_seg`) needs the label map *and* the DICOM series it was computed from
(the folder :func:`medseg.io.read_volume` read). The SEG (highdicom, BINARY, one frame per source
slice and segment, empty frames kept so the grid is the source's) carries:

* the references to the source series and to every source slice (patient, study, frame of reference);
* one segment per foreground label of the label map, in ascending label value: segment number
  ``n`` (1, 2, ...), label = the structure's name, colour = :func:`medseg.io.viewer.label_color`
  (as CIELab), category and type SCT 85756007 "Tissue" (medseg does not know the anatomy's code),
  algorithm type AUTOMATIC, algorithm name ``"medseg"`` with ``medseg.__version__``, family
  "Artificial Intelligence", and the label value in Segment Description (``"label value 255"``),
  because segment numbers must run 1, 2, ... while label values need not;
* SeriesDescription ``"medseg segmentation"``, Manufacturer ``"medseg"``, software version
  ``medseg.__version__``.

Size: BINARY frames are 1 bit per pixel, written uncompressed (highdicom compresses BINARY frames
only as JPEG 2000, which needs an encoder medseg does not require), so a SEG holds
``slices x structures x rows x columns / 8`` bytes of pixel data (by arithmetic: a 512 x 512 x 300
CT with 10 structures, 98 MB); ``omit_empty_frames=True`` keeps only the non-empty frames.

Each source slice must lie exactly on a slice of the label map's grid: its position maps to voxel
``(0, 0, k)``, its row and column directions to the grid's first two axes, its size to the grid's
(within 1e-3 of a voxel). Anything else is a :class:`~medseg.errors.GeometryMismatchError`.

Reading (:func:`read_dicom_seg`, used by :func:`medseg.io.read_volume` for ``.dcm`` files) gives a
label map whose voxel ``v`` holds the label value of its segment (Segment Description's ``label
value N`` when present, else the segment number), on the grid ``(column, row, slice)`` with slices
ordered along the normal ``row x column``: the order in which medseg reads the source series, so
a medseg SEG read back has the source series' geometry. A SEG whose segments overlap cannot be one
label map: :class:`~medseg.errors.LabelValueError`. A SEG from another tool that omits empty
frames covers only the slices from its first to its last frame.

highdicom and pydicom are the optional extra ``dicom`` (``pip install 'medseg[dicom]'``).

Example:
    >>> image = read_volume("series_folder/")                                          # doctest: +SKIP
    >>> write_dicom_seg(labels, "case.dcm", source="series_folder/", labels=label_set) # doctest: +SKIP
    >>> read_volume("case.dcm", kind="label").same_geometry(image)                     # doctest: +SKIP
    True
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from medseg.core.labels import LabelSet, as_label_array
from medseg.core.volume import Volume
from medseg.errors import GeometryMismatchError, InvalidFileError, LabelValueError, MedsegUserError, OutputError
from medseg.io.files import atomic_path
from medseg.io.viewer import check_label_values, label_color

__all__ = ["write_dicom_seg", "read_dicom_seg", "is_dicom_seg", "SEGMENTATION_STORAGE_UID"]

SEGMENTATION_STORAGE_UID = "1.2.840.10008.5.1.4.1.1.66.4"
_LABEL_VALUE_PATTERN = re.compile(r"label value (\d+)")
_GRID_TOLERANCE_VOXELS = 1e-3
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


def _dicom_libraries() -> tuple[Any, Any]:
    try:
        import highdicom
        import pydicom
    except ImportError as error:
        raise MedsegUserError(
            f"DICOM-SEG needs highdicom and pydicom ({error.name} is missing): pip install 'medseg[dicom]'"
        ) from None
    return highdicom, pydicom


def is_dicom_seg(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a DICOM file of the Segmentation Storage SOP class (reads the header only)."""
    _, pydicom = _dicom_libraries()
    try:
        dataset = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:  # noqa: BLE001 - not DICOM at all
        return False
    return str(getattr(dataset, "SOPClassUID", "")) == SEGMENTATION_STORAGE_UID


def _series_datasets(folder: Path, series_uid: str | None) -> list[Any]:
    """The header datasets of one series in ``folder`` (the only one, or ``series_uid``)."""
    _, pydicom = _dicom_libraries()
    by_series: dict[str, list[Any]] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        try:
            dataset = pydicom.dcmread(str(path), stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - files that are not DICOM are no part of a series
            continue
        if "SeriesInstanceUID" in dataset and "ImagePositionPatient" in dataset:
            by_series.setdefault(str(dataset.SeriesInstanceUID), []).append(dataset)
    if not by_series:
        raise InvalidFileError(f"{folder}: folder holds no DICOM image series")
    if series_uid is None:
        if len(by_series) > 1:
            raise InvalidFileError(f"{folder}: folder holds {len(by_series)} series; say which (series_uid)")
        series_uid = next(iter(by_series))
    if series_uid not in by_series:
        raise InvalidFileError(f"{folder}: series {series_uid} not found (found: {', '.join(sorted(by_series))})")
    return by_series[series_uid]


def _slice_indices(volume: Volume, datasets: list[Any], folder: Path) -> list[int]:
    """The slice index k of each source dataset on ``volume``'s grid; checks they tile it exactly."""
    nx, ny, nz = volume.spatial_shape
    inverse = np.linalg.inv(volume.affine)
    directions_lps = _LPS_FROM_RAS @ volume.direction
    indices = []
    for dataset in datasets:
        name = Path(str(dataset.filename)).name if getattr(dataset, "filename", None) else dataset.SOPInstanceUID
        if int(dataset.Rows) != ny or int(dataset.Columns) != nx:
            raise GeometryMismatchError(
                f"{folder}: slice {name} is {dataset.Columns}x{dataset.Rows} pixels, the label map {nx}x{ny}"
            )
        orientation = np.array([float(v) for v in dataset.ImageOrientationPatient])
        if (
            np.max(np.abs(orientation[:3] - directions_lps[:, 0])) > 1e-4
            or np.max(np.abs(orientation[3:] - directions_lps[:, 1])) > 1e-4
        ):
            raise GeometryMismatchError(
                f"{folder}: slice {name}: row/column directions {np.round(orientation, 4).tolist()} differ from the "
                f"label map's first two axes {np.round(directions_lps[:, :2].T.ravel(), 4).tolist()} (LPS)"
            )
        position_ras = _LPS_FROM_RAS @ np.array([float(v) for v in dataset.ImagePositionPatient])
        i, j, k = (inverse @ np.append(position_ras, 1.0))[:3]
        k_index = int(round(k))
        if max(abs(i), abs(j), abs(k - k_index)) > _GRID_TOLERANCE_VOXELS or not 0 <= k_index < nz:
            raise GeometryMismatchError(
                f"{folder}: slice {name} at voxel ({i:.3f}, {j:.3f}, {k:.3f}) of the label map, not on one of its "
                f"{nz} slices"
            )
        indices.append(k_index)
    if sorted(indices) != list(range(nz)):
        raise GeometryMismatchError(
            f"{folder}: the series' {len(datasets)} slices do not cover the label map's {nz} slices one to one"
        )
    return indices


def write_dicom_seg(
    volume: Volume,
    path: str | os.PathLike[str],
    *,
    source: str | os.PathLike[str],
    labels: LabelSet,
    series_uid: str | None = None,
    series_number: int = 300,
    series_description: str = "medseg segmentation",
    omit_empty_frames: bool = False,
) -> Path:
    """Write a label map as a DICOM-SEG referencing the source series it lies on, atomically.

    Args:
        volume: a single-channel 3D label Volume on the source series' grid (as predicted from it).
        path: the output ``.dcm`` file.
        source: the folder holding the source DICOM series.
        labels: names of the label values (segment labels); every value of ``volume`` must be named.
        series_uid: the source series (default: ``volume.meta["dicom_series_uid"]``, else the folder's only series).
        series_number: SeriesNumber of the new SEG series.
        series_description: SeriesDescription of the new SEG series.
        omit_empty_frames: leave out the frames where a segment is empty (much smaller files with many
            structures); the SEG then reads back on the grid from its first to its last frame only.

    Returns:
        ``path``.

    Raises:
        InvalidFileError: no source series, a 2D or multi-channel volume, a label set without foreground.
        GeometryMismatchError: a source slice does not lie exactly on the label map's grid.
        LabelValueError: the label map holds a value ``labels`` does not name.
        OutputError: the file cannot be written.
    """
    highdicom, _ = _dicom_libraries()
    from pydicom.sr.codedict import codes

    from medseg import __version__

    path, folder = Path(path), Path(source)
    if volume.spatial_ndim != 3 or volume.num_channels != 1:
        raise InvalidFileError(f"{path}: a DICOM-SEG holds one 3D label map, got {volume!r}")
    if not labels.foreground_ids:
        raise InvalidFileError(f"{path}: the label map names no foreground structure")
    if not folder.is_dir():
        raise InvalidFileError(f"{folder}: the source of a DICOM-SEG is a DICOM series folder")
    array = as_label_array(volume.array, source=str(volume.meta.get("path", path)))[0]
    check_label_values(volume.with_array(array[None], kind="label"), labels, source=volume.meta.get("path", path))
    datasets = _series_datasets(folder, series_uid or volume.meta.get("dicom_series_uid"))
    slice_of = _slice_indices(volume, datasets, folder)
    order = np.argsort(slice_of)
    sources = [datasets[i] for i in order]
    segment_of_value = np.zeros(int(max(labels.names)) + 1, dtype=np.uint16)
    for number, label_value in enumerate(labels.foreground_ids, start=1):
        segment_of_value[label_value] = number
    frames = np.ascontiguousarray(np.transpose(segment_of_value[array], (2, 1, 0)))  # (slice, row, column)
    algorithm = highdicom.AlgorithmIdentificationSequence(
        name="medseg", family=codes.cid7162.ArtificialIntelligence, version=__version__
    )
    descriptions = []
    for number, label_value in enumerate(labels.foreground_ids, start=1):
        description = highdicom.seg.SegmentDescription(
            segment_number=number,
            segment_label=labels.names[label_value][:64],
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=highdicom.color.CIELabColor.from_rgb(*label_color(label_value)),
        )
        description.SegmentDescription = f"label value {label_value}"
        descriptions.append(description)
    try:
        segmentation = _segmentation(
            sources, frames, descriptions, series_number, series_description, omit_empty_frames
        )
    except (ValueError, TypeError, AttributeError, KeyError) as error:  # highdicom refuses this series
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InvalidFileError(f"{folder}: cannot make a DICOM-SEG of this series ({first[:200]})") from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"{path.parent}: cannot create folder ({error.strerror or error})") from error
    with atomic_path(path) as temporary:
        segmentation.save_as(str(temporary))
    return path


def read_dicom_seg(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read a DICOM-SEG as one label map (see the module docstring for values and grid).

    Returns:
        The ``(1, x, y, z)`` integer array, its RAS affine and ``meta`` with ``format``
        (``"dicom-seg"``), ``dicom_seg_segments`` (``{label value: segment label}``),
        ``dicom_series_uid`` (the SEG's own series) and ``dicom_source_series_uids``.

    Raises:
        InvalidFileError: not a DICOM-SEG, or its frames do not form a regular 3D grid.
        LabelValueError: segments overlap, so no single label map can hold them.
    """
    highdicom, _ = _dicom_libraries()
    path = Path(path)
    if not is_dicom_seg(path):
        raise InvalidFileError(f"{path}: not a DICOM-SEG file (SOP class {SEGMENTATION_STORAGE_UID})")
    segmentation = highdicom.seg.segread(str(path))
    value_of_segment: dict[int, int] = {}
    names: dict[int, str] = {}
    for item in segmentation.SegmentSequence:
        number = int(item.SegmentNumber)
        match = _LABEL_VALUE_PATTERN.fullmatch(str(getattr(item, "SegmentDescription", "")))
        value_of_segment[number] = int(match.group(1)) if match else number
        names[value_of_segment[number]] = str(getattr(item, "SegmentLabel", f"segment {number}"))
    try:
        volume = segmentation.get_volume(combine_segments=True, relabel=False)
    except (ValueError, RuntimeError) as error:  # highdicom: RuntimeError for overlaps, ValueError for grids
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "overlap" in message.lower():
            raise LabelValueError(f"{path}: segments overlap, so they cannot form one label map ({message})") from None
        raise InvalidFileError(f"{path}: frames do not form a regular 3D volume ({message})") from None
    if volume is None:
        raise InvalidFileError(f"{path}: frames do not form a regular 3D volume")
    segments = np.asarray(volume.array)  # (slice, row, column), values = segment numbers
    lookup = np.zeros(max(value_of_segment, default=0) + 1, dtype=np.int64)
    for number, value in value_of_segment.items():
        lookup[number] = value
    array = as_label_array(lookup[segments], source=str(path))
    affine_lps = np.asarray(volume.affine, dtype=np.float64)  # maps (slice, row, column) to LPS
    normal = np.cross(affine_lps[:3, 2], affine_lps[:3, 1])  # row direction x column direction
    if float(np.dot(affine_lps[:3, 0], normal)) < 0:  # slices run against the normal: reverse them
        array = array[::-1]
        affine_lps = affine_lps @ _reverse_first_axis(array.shape[0])
    array = np.transpose(array, (2, 1, 0))[None]  # (1, column, row, slice)
    affine_lps = affine_lps[:, [2, 1, 0, 3]]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps
    referenced = sorted({str(item.SeriesInstanceUID) for item in getattr(segmentation, "ReferencedSeriesSequence", [])})
    meta = {
        "format": "dicom-seg",
        "dicom_series_uid": str(segmentation.SeriesInstanceUID),
        "dicom_source_series_uids": referenced,
        "dicom_seg_segments": {str(value): names[value] for value in sorted(names)},
    }
    return np.ascontiguousarray(array), affine, meta


def _reverse_first_axis(length: int) -> np.ndarray:
    """The 4x4 index map ``i -> length - 1 - i`` on the first axis (composed after an affine)."""
    flip = np.eye(4)
    flip[0, 0] = -1.0
    flip[0, 3] = length - 1
    return flip


def _segmentation(
    sources: list[Any],
    frames: np.ndarray,
    descriptions: list[Any],
    series_number: int,
    series_description: str,
    omit_empty_frames: bool,
) -> Any:
    """The highdicom SEG object (BINARY) of ``frames`` over ``sources``; highdicom validates the series."""
    import highdicom

    from medseg import __version__

    return highdicom.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=highdicom.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=highdicom.UID(),
        series_number=series_number,
        sop_instance_uid=highdicom.UID(),
        instance_number=1,
        manufacturer="medseg",
        manufacturer_model_name="medseg",
        software_versions=__version__,
        device_serial_number="0",
        series_description=series_description,
        omit_empty_frames=omit_empty_frames,
    )
