"""Plans files: writing them from a dataset (``medseg plan``), reading and checking them.

``plans.json`` is plain, editable JSON (see :mod:`medseg.planning.rules` for how it is made). A
plans file read back is validated at once: a missing or mistyped key is one
:class:`~medseg.errors.MedsegUserError` naming the file and the key, before any case is read.

Example:
    >>> plans = plan_dataset("data_manifests/msd_hippocampus.json",
    ...                      data_root="../shared/data/msd_hippocampus", out="plans.json")  # doctest: +SKIP
    >>> plans = load_plans("plans.json")                                                    # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from medseg.data.manifest import Manifest, load_manifest
from medseg.errors import MedsegUserError
from medseg.io.files import read_json, write_json
from medseg.planning.architectures import (
    ARCHITECTURE_NAMES,
    DEFAULT_ARCHITECTURE,
    TRAINING_OVERRIDES,
    TWO_D_ONLY,
    apply_architecture,
    configuration_architecture,
    validate_architecture,
)
from medseg.planning.fast import fast_fingerprint
from medseg.planning.fingerprint import dataset_identity, fingerprint_dataset
from medseg.planning.presets import DEFAULT_AUGMENTATION, PLANS_FORMAT_VERSION
from medseg.planning.rules import make_plans

__all__ = ["check_plans_match", "load_plans", "plan_dataset", "validate_plans"]


def check_plans_match(plans: Mapping[str, Any], manifest: Manifest) -> None:
    """Raise :class:`MedsegUserError` when plans were made for a different dataset.

    Labels (id -> name) and channels must agree; the dataset name may differ (a manifest and
    the dataset.json it derives from name the same data differently) and is only reported. The
    plans' own structure is :func:`validate_plans`'s to check.
    """
    if not isinstance(plans.get("dataset"), Mapping):
        raise MedsegUserError("plans: not a medseg plans file (no 'dataset'); see validate_plans")
    theirs = plans["dataset"]
    ours = dataset_identity(manifest)
    problems = []
    if {str(k): v for k, v in dict(theirs.get("labels", {})).items()} != ours["labels"]:
        problems.append(f"labels {theirs.get('labels')} vs {ours['labels']}")
    if list(theirs.get("channels", [])) != ours["channels"]:
        problems.append(f"channels {theirs.get('channels')} vs {ours['channels']}")
    if problems:
        raise MedsegUserError(
            f"plans were made for dataset {theirs.get('name')!r}, not {ours['name']!r}: " + "; ".join(problems)
        )


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_ints(value: Any, length: int | None = None) -> bool:
    return (
        isinstance(value, list)
        and (length is None or len(value) == length)
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    )


def validate_plans(plans: Any, *, source: str | os.PathLike[str] = "plans") -> dict[str, Any]:
    """Check every key medseg reads from plans; the first problem is one error naming ``source`` and the key.

    Checked: ``dataset`` (``labels``, ``channels``), ``normalization`` (a scheme per channel;
    ``ct`` needs ``clip``, ``mean``, ``sd``), each configuration (``spatial_dims`` 2 or 3,
    ``spacing_mm``, ``patch_size``, ``batch_size``, ``architecture`` and its ``network`` keys
    (``filters``, ``kernel_size`` and ``strides`` for DynUNet; see
    :func:`~medseg.planning.architectures.validate_architecture` for the others), ``slice_axis``
    for 2D), ``training`` values and the
    ``augmentation`` probabilities.

    Returns:
        ``plans`` as a dict.

    Raises:
        MedsegUserError: ``"<source>: plans key 'configurations.3d.patch_size' ..."``.
    """
    from medseg.planning.presets import augmentation_probabilities

    def fail(key: str, problem: str) -> MedsegUserError:
        return MedsegUserError(f"{source}: plans key {key!r} {problem}")

    if not isinstance(plans, Mapping):
        raise MedsegUserError(f"{source}: not a medseg plans file (the top level must be an object)")
    for key in ("dataset", "normalization", "configurations"):
        if key not in plans:
            raise fail(key, "is missing (not a medseg plans file, or a damaged one)")
    version = plans.get("format_version", 0)
    if not isinstance(version, int) or version > PLANS_FORMAT_VERSION:
        raise fail("format_version", f"is {version!r}; this medseg reads plans up to version {PLANS_FORMAT_VERSION}")
    dataset = plans["dataset"]
    if not isinstance(dataset, Mapping) or not isinstance(dataset.get("labels"), Mapping):
        raise fail("dataset.labels", "must be an object of label ids and names")
    if not isinstance(dataset.get("channels"), list):
        raise fail("dataset.channels", "must be a list of channel names")
    normalization = plans["normalization"]
    if not isinstance(normalization, list) or not normalization:
        raise fail("normalization", "must be a non-empty list (one scheme per channel)")
    for index, scheme in enumerate(normalization):
        where = f"normalization[{index}]"
        if not isinstance(scheme, Mapping) or scheme.get("scheme") not in ("zscore", "ct"):
            raise fail(f"{where}.scheme", "must be 'zscore' or 'ct'")
        if scheme["scheme"] == "ct":
            clip = scheme.get("clip")
            if not (isinstance(clip, list) and len(clip) == 2 and all(_number(v) for v in clip)):
                raise fail(f"{where}.clip", "must be [low, high]")
            for key in ("mean", "sd"):
                if not _number(scheme.get(key)):
                    raise fail(f"{where}.{key}", "must be a number")
    configurations = plans["configurations"]
    if not isinstance(configurations, Mapping) or not configurations:
        raise fail("configurations", "must be an object of configurations (3d, 2d)")
    for name, cfg in configurations.items():
        where = f"configurations.{name}"
        if not isinstance(cfg, Mapping):
            raise fail(where, "must be an object")
        dims = cfg.get("spatial_dims")
        if dims not in (2, 3):
            raise fail(f"{where}.spatial_dims", f"must be 2 or 3, got {dims!r}")
        spacing = cfg.get("spacing_mm")
        if not (isinstance(spacing, list) and len(spacing) == 3 and all(_number(v) and v > 0 for v in spacing)):
            raise fail(f"{where}.spacing_mm", f"must be 3 positive numbers, got {spacing!r}")
        if not _positive_ints(cfg.get("patch_size"), dims):
            raise fail(f"{where}.patch_size", f"must be {dims} positive integers, got {cfg.get('patch_size')!r}")
        if not _positive_ints([cfg.get("batch_size")]):
            raise fail(f"{where}.batch_size", f"must be a positive integer, got {cfg.get('batch_size')!r}")
        if dims == 2 and cfg.get("slice_axis") not in (0, 1, 2):
            raise fail(f"{where}.slice_axis", f"must be 0, 1 or 2, got {cfg.get('slice_axis')!r}")
        network = cfg.get("network")
        if not isinstance(network, Mapping):
            raise fail(f"{where}.network", "is missing")
        validate_architecture(cfg, where=where, fail=fail)
        if configuration_architecture(cfg) != DEFAULT_ARCHITECTURE:
            continue
        if not _positive_ints(network.get("filters")):
            raise fail(f"{where}.network.filters", "must be a list of positive integers")
        if network.get("architecture", "DynUNet") == "DynUNet":
            for key in ("kernel_size", "strides"):
                value = network.get(key)
                if not (isinstance(value, list) and all(_positive_ints(v, dims) for v in value)):
                    raise fail(f"{where}.network.{key}", f"must be a list of {dims}-integer lists")
    training = plans.get("training", {})
    if not isinstance(training, Mapping):
        raise fail("training", "must be an object")
    for key in ("learning_rate", "momentum", "weight_decay", "poly_exponent", "cache_budget_gb"):
        if key in training and not _number(training[key]):
            raise fail(f"training.{key}", f"must be a number, got {training[key]!r}")
    for key in ("epochs", "iterations_per_epoch", "validate_every"):
        if key in training and not _positive_ints([training[key]]):
            raise fail(f"training.{key}", f"must be a positive integer, got {training[key]!r}")
    if "ema_decay" in training and not (_number(training["ema_decay"]) and 0.0 <= training["ema_decay"] < 1.0):
        raise fail("training.ema_decay", f"must be a number in [0, 1), got {training['ema_decay']!r}")
    if "optimizer" in training and str(training["optimizer"]).lower() not in ("sgd", "adamw"):
        raise fail("training.optimizer", f"must be 'sgd' or 'adamw', got {training['optimizer']!r}")
    oversample = plans.get("foreground_oversample", 1.0 / 3.0)
    if not (_number(oversample) and 0.0 <= oversample <= 1.0):
        raise fail("foreground_oversample", f"must be a probability in [0, 1], got {oversample!r}")
    try:
        augmentation_probabilities(plans)
    except MedsegUserError as error:
        raise MedsegUserError(f"{source}: {error}") from None
    return dict(plans)


def load_plans(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a plans JSON file (:func:`validate_plans`); errors name the file."""
    return validate_plans(read_json(path, what="plans file"), source=path)


def plan_dataset(
    manifest_path: str | os.PathLike[str],
    *,
    data_root: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] = "plans.json",
    workers: int = 2,
    memory_budget_gb: float = 8.0,
    base_features: int = 16,
    augmentation: str = DEFAULT_AUGMENTATION,
    architecture: str = DEFAULT_ARCHITECTURE,
    fast: bool = False,
) -> dict[str, Any]:
    """Fingerprint a manifest's training cases and write ``plans.json`` and ``fingerprint.json``.

    Args:
        manifest_path: manifest file (or dataset.json).
        data_root: folder the manifest's paths are relative to.
        out: path of the plans file; ``fingerprint.json`` is written beside it.
        workers: threads reading cases.
        memory_budget_gb: see :func:`make_plans`.
        base_features: see :func:`make_plans`.
        augmentation: see :func:`make_plans`.
        architecture: the network of every configuration (:mod:`medseg.planning.architectures`):
            ``dynunet`` (default), ``fcn``, ``deeplabv3plus`` or ``maskrcnn`` (2D configurations
            only: the others are left out of the plans).
        fast: plan for a spacing no finer than 3 mm (:mod:`medseg.planning.fast`, as
            TotalSegmentator's ``--fast``).

    Returns:
        The plans.
    """
    if architecture.lower() not in ARCHITECTURE_NAMES:  # before any case is read
        raise MedsegUserError(f"unknown architecture {architecture!r} (known: {', '.join(ARCHITECTURE_NAMES)})")
    manifest = load_manifest(manifest_path, data_root=data_root)
    fingerprint = fingerprint_dataset(manifest, workers=workers)
    plans = make_plans(
        fast_fingerprint(fingerprint) if fast else fingerprint,
        memory_budget_gb=memory_budget_gb,
        base_features=base_features,
        augmentation=augmentation,
    )
    plans["configurations"] = {
        name: apply_architecture(cfg, architecture)
        for name, cfg in plans["configurations"].items()
        if architecture.lower() not in TWO_D_ONLY or int(cfg["spatial_dims"]) == 2
    }
    if not plans["configurations"]:
        raise MedsegUserError(f"{manifest_path}: no 2D configuration was planned, which {architecture} needs")
    plans["training"].update(TRAINING_OVERRIDES.get(architecture.lower(), {}))
    out = Path(out)
    write_json(fingerprint, out.with_name("fingerprint.json"))
    write_json(plans, out)
    return plans
