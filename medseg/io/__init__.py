"""Reading and writing files: the only place medseg touches image files, JSON and hashes on disk.

``io`` owns the file formats: :func:`read_volume` / :func:`write_volume` (NIfTI, NRRD, MHA, a DICOM
folder, 2D images), multi-channel reads, and the atomic file writing (temporary file, fsync,
rename), JSON reading/writing and SHA-256 hashing every other package uses for its outputs. It
builds on :mod:`medseg.core` only and never imports torch.
"""

from __future__ import annotations

from medseg.io.files import atomic_path, read_json, sha256_file, write_json, write_text
from medseg.io.volumes import (
    IMAGE_2D_SUFFIXES,
    ITK_SUFFIXES,
    NIFTI_SUFFIXES,
    VOLUME_SUFFIXES,
    check_same_grid,
    read_channels,
    read_volume,
    strip_volume_suffix,
    volume_suffix,
    write_volume,
)

__all__ = [
    "IMAGE_2D_SUFFIXES",
    "ITK_SUFFIXES",
    "NIFTI_SUFFIXES",
    "VOLUME_SUFFIXES",
    "atomic_path",
    "check_same_grid",
    "read_channels",
    "read_json",
    "read_volume",
    "sha256_file",
    "strip_volume_suffix",
    "volume_suffix",
    "write_json",
    "write_text",
    "write_volume",
]
