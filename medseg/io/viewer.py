"""Viewer-ready label maps: structure names and colours that 3D Slicer and ITK-SNAP show.

A label map file holds numbers; viewers need the names and colours beside them. medseg writes:

* **3D Slicer** ``.seg.nrrd`` (:func:`write_seg_nrrd`): the label map as an NRRD whose header
  carries Slicer's segmentation fields, one block per structure: ``Segment{i}_ID``, ``_Name``,
  ``_Color`` (RGB in 0..1), ``_LabelValue``, ``_Layer`` (0: one layer, segments do not overlap),
  ``_Extent`` (voxel index bounds ``i0 i1 j0 j1 k0 k1`` of the structure, ``0 -1 0 -1 0 -1`` when
  absent), ``_Tags``, plus ``Segmentation_MasterRepresentation`` and
  ``Segmentation_ContainedRepresentationNames`` (``Binary labelmap``). Slicer opens it as a
  Segmentation with named, coloured segments; any NRRD reader still reads the label map.
* **ITK-SNAP** label descriptions (:func:`itksnap_label_text` / :func:`write_itksnap_labels`):
  the ``IDX -R- -G- -B- -A-- VIS MSH LABEL`` text file that *Segmentation > Import Label
  Descriptions* reads, written beside NIfTI outputs.

Colours come from one fixed palette (:func:`label_color`), so a structure has the same colour in
every file, viewer and DICOM-SEG of a label map: label value ``v >= 1`` takes entry ``(v - 1) mod 20``
of :data:`PALETTE_RGB`, which is matplotlib's ``tab20`` reordered so the ten saturated tones come
first (tab10's order) and the ten light tones after them. Background (0) is black.

Example:
    >>> label_color(1), label_color(2), label_color(21)
    ((31, 119, 180), (255, 127, 14), (31, 119, 180))
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medseg.core.itk import to_sitk
from medseg.core.labels import LabelSet, as_label_array
from medseg.core.volume import Volume
from medseg.errors import InvalidFileError, LabelValueError, OutputError
from medseg.io.files import atomic_path, write_text

__all__ = [
    "PALETTE_RGB",
    "ITKSNAP_LABELS_FILE",
    "label_color",
    "seg_nrrd_fields",
    "write_seg_nrrd",
    "itksnap_label_text",
    "write_itksnap_labels",
    "check_label_values",
]

#: matplotlib's tab20 with its saturated tones first (tab10 order), then its light tones; 8-bit RGB.
PALETTE_RGB: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (174, 199, 232),
    (255, 187, 120),
    (152, 223, 138),
    (255, 152, 150),
    (197, 176, 213),
    (196, 156, 148),
    (247, 182, 210),
    (199, 199, 199),
    (219, 219, 141),
    (158, 218, 229),
)

#: the file name medseg writes ITK-SNAP label descriptions under, beside predicted label maps
ITKSNAP_LABELS_FILE = "labels.itksnap.txt"

# Slicer's generic terminology entry ("Tissue"), which its Segment Editor shows for unnamed anatomy
_SLICER_TAGS = (
    "Segmentation.Status:completed|TerminologyEntry:Segmentation category and type - 3D Slicer General Anatomy list"
    "~SCT^85756007^Tissue~SCT^85756007^Tissue~^^~Anatomic codes - DICOM master list~^^~^^|"
)


def label_color(label_value: int) -> tuple[int, int, int]:
    """8-bit RGB colour of a label value: black for 0, else ``PALETTE_RGB[(value - 1) % 20]``."""
    value = int(label_value)
    if value < 0:
        raise ValueError(f"label values are >= 0, got {value}")
    return (0, 0, 0) if value == 0 else PALETTE_RGB[(value - 1) % len(PALETTE_RGB)]


def check_label_values(volume: Volume, labels: LabelSet, *, source: str | os.PathLike[str] | None = None) -> None:
    """Raise :class:`LabelValueError` when the label map holds values the label set does not name."""
    present = np.unique(volume.array)
    unknown = sorted(int(v) for v in present if int(v) not in labels.names)
    if unknown:
        where = source if source is not None else volume.meta.get("path", "label map")
        raise LabelValueError(
            f"{where}: label values {unknown[:10]} are not in the label map (known: {list(labels.names)})"
        )


def _extent(mask: np.ndarray) -> str:
    """Inclusive voxel index bounds ``i0 i1 j0 j1 k0 k1`` of a 3D mask; ``0 -1 ...`` when empty."""
    if not mask.any():
        return " ".join(["0 -1"] * 3)
    bounds = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        bounds += [str(int(hits[0])), str(int(hits[-1]))]
    return " ".join(bounds)


def seg_nrrd_fields(volume: Volume, labels: LabelSet) -> dict[str, str]:
    """The Slicer segmentation header fields of a 3D label map (one segment per foreground label).

    Args:
        volume: a single-channel 3D label Volume.
        labels: names of its label values.

    Returns:
        ``{key: value}`` strings, e.g. ``Segment0_Name -> "liver"``, ``Segment0_LabelValue -> "1"``.
    """
    array = volume.array[0]
    fields = {
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    for index, label_value in enumerate(labels.foreground_ids):
        red, green, blue = label_color(label_value)
        prefix = f"Segment{index}_"
        fields[prefix + "ID"] = f"Segment_{label_value}"
        fields[prefix + "Name"] = labels.names[label_value]
        fields[prefix + "NameAutoGenerated"] = "0"
        fields[prefix + "Color"] = f"{red / 255:.6f} {green / 255:.6f} {blue / 255:.6f}"
        fields[prefix + "ColorAutoGenerated"] = "0"
        fields[prefix + "LabelValue"] = str(label_value)
        fields[prefix + "Layer"] = "0"
        fields[prefix + "Extent"] = _extent(array == label_value)
        fields[prefix + "Tags"] = _SLICER_TAGS
    return fields


def write_seg_nrrd(volume: Volume, path: str | os.PathLike[str], *, labels: LabelSet) -> Path:
    """Write a 3D label map as a Slicer ``.seg.nrrd`` (gzip-compressed NRRD with segment metadata), atomically.

    The voxels and geometry are those of ``volume`` (NRRD stores LPS; medseg's reader converts back
    to RAS), so the file reads back voxel for voxel with :func:`medseg.io.read_volume`.

    Raises:
        InvalidFileError: ``path`` does not end in ``.seg.nrrd``, or ``volume`` is not a single-channel 3D label map.
        LabelValueError: the label map holds a value ``labels`` does not name.
        OutputError: the file cannot be written.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        raise InvalidFileError(f"{path}: a Slicer segmentation file name ends in .seg.nrrd")
    if volume.spatial_ndim != 3 or volume.num_channels != 1:
        raise InvalidFileError(f"{path}: .seg.nrrd holds one 3D label map, got {volume!r}")
    array = as_label_array(volume.array, source=str(volume.meta.get("path", path)))
    label_volume = volume.with_array(array, kind="label")
    check_label_values(label_volume, labels, source=volume.meta.get("path", path))
    image = to_sitk(label_volume)
    for key, value in seg_nrrd_fields(label_volume, labels).items():
        image.SetMetaData(key, value)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"{path.parent}: cannot create folder ({error.strerror or error})") from error
    try:
        with atomic_path(path) as temporary:
            sitk.WriteImage(image, str(temporary), True)
    except RuntimeError as error:  # SimpleITK reports I/O failures as RuntimeError
        raise OutputError(f"{path}: cannot write ({str(error).strip().splitlines()[0]})") from error
    return path


def itksnap_label_text(labels: LabelSet) -> str:
    """ITK-SNAP label descriptions of a label set: one line per label, background as ``Clear Label``.

    Columns: ``IDX`` (label value), ``-R- -G- -B-`` (0..255), ``-A--`` (opacity 0..1), ``VIS`` (shown
    in slices), ``MSH`` (shown in 3D), ``LABEL`` (quoted name).
    """
    lines = [
        "################################################",
        "# ITK-SnAP Label Description File",
        "# written by medseg; colours: medseg.io.viewer.PALETTE_RGB",
        "# File format: ",
        "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
        "# Fields: ",
        "#    IDX:   Zero-based index ",
        "#    -R-:   Red color component (0..255)",
        "#    -G-:   Green color component (0..255)",
        "#    -B-:   Blue color component (0..255)",
        "#    -A-:   Label transparency (0.00 .. 1.00)",
        "#    VIS:   Label visibility (0 or 1)",
        "#    MSH:   Label mesh visibility (0 or 1)",
        "#  LABEL:   Label description ",
        "################################################",
        f'{0:>5} {0:>5} {0:>4} {0:>4} {0:>8} {0:>2} {0:>2}    "Clear Label"',
    ]
    for label_value in labels.foreground_ids:
        red, green, blue = label_color(label_value)
        name = labels.names[label_value].replace('"', "'")
        lines.append(f'{label_value:>5} {red:>5} {green:>4} {blue:>4} {1:>8} {1:>2} {1:>2}    "{name}"')
    return "\n".join(lines) + "\n"


def write_itksnap_labels(labels: LabelSet, path: str | os.PathLike[str]) -> Path:
    """Write :func:`itksnap_label_text` to ``path`` atomically."""
    return write_text(itksnap_label_text(labels), path)
