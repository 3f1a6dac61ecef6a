"""Label map outputs by format: a plain volume file, a 3D Slicer ``.seg.nrrd`` or a DICOM-SEG.

``medseg predict --output-format`` chooses among :data:`OUTPUT_FORMATS`:

=============  ===================  ============================================================
format         file                 content
=============  ===================  ============================================================
``auto``       the input's format   as :func:`medseg.io.write_volume` writes it (a DICOM folder
                                    gives ``.nii.gz``)
``nii.gz``     ``<case>.nii.gz``    NIfTI (likewise ``nii``, ``nrrd``, ``mha``)
``seg.nrrd``   ``<case>.seg.nrrd``  3D Slicer segmentation: names and colours per segment
                                    (:func:`medseg.io.viewer.write_seg_nrrd`)
``dicom-seg``  ``<case>.dcm``       DICOM-SEG referencing the input series; the input must be a
                                    DICOM series folder (:func:`medseg.io.dicom_seg.write_dicom_seg`)
=============  ===================  ============================================================

Example:
    >>> label_file_name("case_01", ".nii.gz", "seg.nrrd")
    'case_01.seg.nrrd'
"""

from __future__ import annotations

import os
from pathlib import Path

from medseg.core.labels import LabelSet
from medseg.core.volume import Volume
from medseg.errors import InvalidFileError, MedsegUserError
from medseg.io.viewer import write_seg_nrrd
from medseg.io.volumes import write_volume

__all__ = ["OUTPUT_FORMATS", "check_output_format", "label_file_name", "write_label_file"]

OUTPUT_FORMATS = ("auto", "nii.gz", "nii", "nrrd", "mha", "seg.nrrd", "dicom-seg")
_SUFFIX = {
    "nii.gz": ".nii.gz",
    "nii": ".nii",
    "nrrd": ".nrrd",
    "mha": ".mha",
    "seg.nrrd": ".seg.nrrd",
    "dicom-seg": ".dcm",
}


def check_output_format(output_format: str) -> str:
    """Return ``output_format`` when it is one of :data:`OUTPUT_FORMATS`, else raise a one-line error."""
    if output_format not in OUTPUT_FORMATS:
        raise MedsegUserError(f"--output-format {output_format!r}: choose one of {', '.join(OUTPUT_FORMATS)}")
    return output_format


def label_file_name(stem: str, auto_suffix: str, output_format: str) -> str:
    """File name of a case's label map: ``stem`` + the format's suffix (``auto_suffix`` for ``auto``)."""
    check_output_format(output_format)
    return stem + (auto_suffix if output_format == "auto" else _SUFFIX[output_format])


def write_label_file(
    volume: Volume,
    path: str | os.PathLike[str],
    *,
    labels: LabelSet,
    source: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a label map in the format its name says: ``.seg.nrrd``, ``.dcm`` (DICOM-SEG) or any volume format.

    Args:
        volume: the label Volume.
        path: the output file.
        labels: names (and so colours) of the label values.
        source: the image the labels were computed from; a DICOM-SEG needs it to be the DICOM series folder.

    Raises:
        InvalidFileError: a DICOM-SEG without a DICOM series folder as source.
        GeometryMismatchError, LabelValueError, OutputError: see the writers.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".seg.nrrd"):
        return write_seg_nrrd(volume, path, labels=labels)
    if name.endswith(".dcm"):
        if source is None or not Path(source).is_dir():
            raise InvalidFileError(
                f"{source if source is not None else path}: a DICOM-SEG output needs a DICOM series folder as input"
            )
        from medseg.io.dicom_seg import write_dicom_seg

        return write_dicom_seg(volume, path, source=source, labels=labels)
    return write_volume(volume, path)
