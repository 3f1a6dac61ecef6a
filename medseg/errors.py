"""Error types that separate *user* errors from bugs.

A :class:`MedsegUserError` is a problem with what the user gave medseg: a corrupt or missing
file, a manifest without labels, a geometry mismatch, an option out of range. The command line
prints it as one line (no traceback) and exits non-zero. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

__all__ = [
    "MedsegUserError",
    "InvalidFileError",
    "GeometryMismatchError",
    "LabelValueError",
    "ManifestError",
    "CheckpointError",
    "OutputError",
]


class MedsegUserError(ValueError):
    """A problem with the user's input; its message names the file/value and the problem."""


class InvalidFileError(MedsegUserError):
    """A file is missing, unreadable, corrupt or in an unsupported format."""


class GeometryMismatchError(MedsegUserError):
    """Two volumes that must share a voxel grid do not (shape, spacing, origin or direction)."""


class LabelValueError(MedsegUserError):
    """A label map holds values that are non-integral or not in the label map."""


class ManifestError(MedsegUserError):
    """A dataset manifest is invalid (bad JSON, no labels, no cases, path outside the data root)."""


class CheckpointError(MedsegUserError):
    """A checkpoint is not a medseg checkpoint, is truncated, or comes from a newer format."""


class OutputError(MedsegUserError):
    """An output cannot be written (read-only folder, full disk, permission denied)."""
