"""Datasets: manifests (which cases exist, where their files are, what the labels mean), folds, checks.

``data`` owns the dataset description: :func:`load_manifest` reads an MSD / nnU-Net
``dataset.json`` or medseg's superset of it with every path kept inside its data root, the
cross-validation folds (nnU-Net's split), and ``medseg check``, which validates every case and
reports all problems at once. It builds on :mod:`medseg.core` and :mod:`medseg.io`; no torch.
"""

from __future__ import annotations

from medseg.data.check import CheckReport, Problem, check_manifest
from medseg.data.manifest import (
    DEFAULT_NSD_TOLERANCE_MM,
    Case,
    Manifest,
    load_manifest,
    manifest_from_dict,
    remap_labels,
)
from medseg.data.splits import kfold_split

__all__ = [
    "DEFAULT_NSD_TOLERANCE_MM",
    "Case",
    "CheckReport",
    "Manifest",
    "Problem",
    "check_manifest",
    "kfold_split",
    "load_manifest",
    "manifest_from_dict",
    "remap_labels",
]
