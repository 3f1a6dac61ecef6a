"""Planning: a dataset's fingerprint -> editable plans (spacing, normalisation, patch, topology, augmentation).

``planning`` owns ``medseg plan``: the fingerprint of the training cases
(:mod:`~medseg.planning.fingerprint`), nnU-Net's rules that turn it into a 3D and a 2D
configuration (:mod:`~medseg.planning.rules`), the named presets (:mod:`~medseg.planning.presets`)
and reading, validating and writing ``plans.json`` (:mod:`~medseg.planning.plans`). Plans are plain
JSON; the package itself needs no torch, but it sits beside ``model`` above the torch line because
only training and inference consume plans.
"""

from __future__ import annotations

from medseg.planning.fingerprint import dataset_identity, fingerprint_dataset
from medseg.planning.plans import check_plans_match, load_plans, plan_dataset, validate_plans
from medseg.planning.presets import (
    AUGMENTATION_DEFAULTS,
    AUGMENTATION_PRESETS,
    DEFAULT_AUGMENTATION,
    PLANS_FORMAT_VERSION,
    augmentation_probabilities,
)
from medseg.planning.rules import make_plans, network_topology, target_spacing

__all__ = [
    "AUGMENTATION_DEFAULTS",
    "AUGMENTATION_PRESETS",
    "DEFAULT_AUGMENTATION",
    "PLANS_FORMAT_VERSION",
    "augmentation_probabilities",
    "check_plans_match",
    "dataset_identity",
    "fingerprint_dataset",
    "load_plans",
    "make_plans",
    "network_topology",
    "plan_dataset",
    "target_spacing",
    "validate_plans",
]
