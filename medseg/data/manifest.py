"""Dataset manifests: which cases exist, where their files are, what the labels mean.

medseg reads a plain MSD / nnU-Net ``dataset.json`` as it is, and a superset of it (the files in
``data_manifests/``). Every path in a manifest is relative to a **data root** given at run time
(``--data-root``); a path that is absolute or escapes the data root (``../``, a symlink out) is
rejected. The superset adds, all optional:

=======================  ===================================================================
key                      meaning
=======================  ===================================================================
``regions``              ``{"whole_tumour": ["necrosis", "edema", 3, 4]}`` names or ids
``things``               structures scored as instances (lesion-wise metrics, PQ), by name
``nsd_tolerance_mm``     a number for every structure, or ``{"structure": mm}``; default 1
``case_lists``           which lists hold cases; default ``["training", "test"]``. Only
                         ``training`` cases are planned on, trained on and split into folds;
                         an internal test split (``test_internal``) is never used for a choice
``raters``               extra label keys scored as other raters: ``{"label_observer2": "observer2"}``
``label_value_map``      per label key, stored value -> label id: ``{"label_observer2": {"1": 255}}``
``folds``                explicit validation case ids per fold; default: 5 deterministic folds
``id``                   (per case) the case id; default derived from the image file name
``fov_mask``             (per case) a field-of-view mask: evaluation scores only inside it
                         (DRIVE's protocol; :mod:`medseg.evaluation.field_of_view`)
=======================  ===================================================================

Default folds reproduce nnU-Net's split exactly: the sorted training case ids, shuffled by
``numpy.random.RandomState(12345)`` and cut into 5 consecutive folds, the first ``n % 5`` one case
larger (scikit-learn ``KFold(5, shuffle=True, random_state=12345)``).

Example:
    >>> m = load_manifest("data_manifests/msd_hippocampus.json",
    ...                   data_root="../shared/data/msd_hippocampus")     # doctest: +SKIP
    >>> train, val = m.fold(0)                                            # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

from medseg.core.labels import LabelSet, as_label_array
from medseg.core.volume import Volume
from medseg.data.splits import kfold_split
from medseg.errors import ManifestError
from medseg.io.files import read_json
from medseg.io.volumes import read_channels, read_volume, strip_volume_suffix

__all__ = ["Case", "Manifest", "load_manifest", "kfold_split", "remap_labels", "DEFAULT_NSD_TOLERANCE_MM"]

DEFAULT_NSD_TOLERANCE_MM = 1.0
_DEFAULT_CASE_LISTS = ("training", "test")


@dataclass(frozen=True)
class Case:
    """One case of a manifest, with paths resolved under the data root.

    Attributes:
        case_id: unique id; prediction files are named after it.
        images: one path per input channel.
        label: the reference label path, or None (unlabelled test case).
        extras: other per-case files (further raters, masks) by manifest key.
        subset: the manifest list the case came from (``"training"``, ``"test"``, ...).
    """

    case_id: str
    images: tuple[Path, ...]
    label: Path | None
    extras: Mapping[str, Path] = field(default_factory=dict)
    subset: str = "training"


@dataclass(frozen=True)
class Manifest:
    """A validated dataset manifest. Build it with :func:`load_manifest`."""

    name: str
    path: Path | None
    data_root: Path
    labels: LabelSet
    channels: tuple[str, ...]
    cases: tuple[Case, ...]
    things: tuple[str, ...] = ()
    nsd_tolerance_mm: Mapping[str, float] = field(default_factory=dict)
    raters: Mapping[str, str] = field(default_factory=dict)
    label_value_map: Mapping[str, Mapping[int, int]] = field(default_factory=dict)
    folds: tuple[tuple[str, ...], ...] = ()
    tensor_image_size: str = "3D"

    @property
    def case_ids(self) -> tuple[str, ...]:
        """All case ids in manifest order."""
        return tuple(c.case_id for c in self.cases)

    @property
    def labelled_cases(self) -> tuple[Case, ...]:
        """Cases that have a reference label."""
        return tuple(c for c in self.cases if c.label is not None)

    def case(self, case_id: str) -> Case:
        """The case with this id."""
        for case in self.cases:
            if case.case_id == case_id:
                return case
        raise ManifestError(f"{self.name}: no case {case_id!r}")

    def select(self, case_ids: Iterable[str]) -> Manifest:
        """The same manifest restricted to ``case_ids`` (kept in manifest order).

        Use it to evaluate, or train on, part of a dataset: ``ms.evaluate(manifest.select(ids), "pred/")``
        scores only those cases instead of reporting every other one as ``missing_prediction``. Each
        fold keeps its validation cases that were selected, so ``select(...).fold(k)`` is fold ``k``
        of the full manifest restricted to the selection.

        Raises:
            ManifestError: an id that is not a case of this manifest (named), or no id at all.
        """
        wanted = [case_ids] if isinstance(case_ids, str) else list(case_ids)
        known = set(self.case_ids)
        unknown = [case_id for case_id in wanted if case_id not in known]
        if unknown:
            raise ManifestError(f"{self.name}: no case {unknown[0]!r} to select ({len(unknown)} unknown ids)")
        if not wanted:
            raise ManifestError(f"{self.name}: select() needs at least one case id")
        chosen = set(wanted)
        return replace(
            self,
            cases=tuple(c for c in self.cases if c.case_id in chosen),
            folds=tuple(tuple(i for i in fold if i in chosen) for fold in self.folds),
        )

    def nsd_tolerance_for(self, structure: str) -> float:
        """NSD tolerance in mm for a structure name (manifest value or the 1 mm default)."""
        return float(self.nsd_tolerance_mm.get(structure, self.nsd_tolerance_mm.get("*", DEFAULT_NSD_TOLERANCE_MM)))

    def fold(self, fold: int | str) -> tuple[tuple[Case, ...], tuple[Case, ...]]:
        """(training cases, validation cases) of a cross-validation fold; ``"all"`` (nnU-Net's fold
        "all"): every labelled training case, and no validation cases."""
        if not self.folds:
            raise ManifestError(f"{self.name}: no labelled training cases to split into folds")
        if fold == "all":
            return tuple(c for c in self.labelled_cases if c.subset == "training"), ()
        if not isinstance(fold, int) or not 0 <= fold < len(self.folds):
            raise ManifestError(f"{self.name}: fold {fold} does not exist (folds 0..{len(self.folds) - 1})")
        validation = set(self.folds[fold])
        trainable = [c for c in self.labelled_cases if c.subset == "training"]
        return (
            tuple(c for c in trainable if c.case_id not in validation),
            tuple(c for c in trainable if c.case_id in validation),
        )

    def label_keys(self) -> tuple[str, ...]:
        """``"label"`` followed by the keys of further raters."""
        return ("label",) + tuple(k for k in self.raters if k != "label")

    def read_image(self, case: Case) -> Volume:
        """The case's image, one channel per manifest channel."""
        return read_channels(case.images)

    def read_label(self, case: Case, *, key: str = "label") -> Volume:
        """A case's label map (``key`` selects another rater), with ``label_value_map`` applied."""
        path = case.label if key == "label" else case.extras.get(key)
        if path is None:
            raise ManifestError(f"{self.name}: case {case.case_id!r} has no {key!r}")
        return remap_labels(read_volume(path, kind="label"), self.label_value_map.get(key))

    def to_json(self) -> dict[str, Any]:
        """A summary of the resolved manifest (for run folders and reports)."""
        return {
            "name": self.name,
            "path": str(self.path) if self.path else None,
            "data_root": str(self.data_root),
            **self.labels.to_json(),
            "channels": list(self.channels),
            "things": list(self.things),
            "nsd_tolerance_mm": dict(self.nsd_tolerance_mm),
            "num_cases": len(self.cases),
            "folds": [list(f) for f in self.folds],
        }


def remap_labels(volume: Volume, mapping: Mapping[int, int] | None) -> Volume:
    """Replace stored label values by label ids (``{1: 255}``: stored 1 means label 255).

    Values not in ``mapping`` are kept. Used for raters who stored the same labels differently
    (DRIVE's second observer stores vessels as 1, the first as 255).
    """
    if not mapping:
        return volume
    remapped = volume.array.copy()
    for stored, label_id in mapping.items():
        remapped[volume.array == stored] = label_id
    return volume.with_array(as_label_array(remapped, source=str(volume.meta.get("path", "label map"))))


def load_manifest(
    path: str | os.PathLike[str],
    *,
    data_root: str | os.PathLike[str] | None = None,
) -> Manifest:
    """Read and validate a manifest (a ``dataset.json`` or one of ``data_manifests/*.json``).

    Args:
        path: the manifest file, or a folder holding ``dataset.json``.
        data_root: folder that the manifest's paths are relative to; by default the manifest's
            own folder (right for a ``dataset.json`` that sits in its dataset).

    Raises:
        ManifestError: invalid JSON, no labels, no cases, a case without an image, duplicate
            case ids, or a path that is absolute or escapes the data root. Missing *files* are
            not an error here; ``medseg check`` reports them.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.json"
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    content = read_json(path, what="manifest", error=ManifestError)
    root = Path(data_root) if data_root is not None else path.parent
    if not root.is_dir():
        raise ManifestError(f"{root}: data root is not a folder")
    return manifest_from_dict(content, data_root=root, source=path)


def manifest_from_dict(content: Mapping[str, Any], *, data_root: Path, source: Path | None = None) -> Manifest:
    """Build a :class:`Manifest` from already-parsed JSON (see :func:`load_manifest`)."""
    where = str(source) if source else "manifest"
    if not isinstance(content, Mapping):
        raise ManifestError(f"{where}: the top level must be a JSON object")
    if "labels" not in content:
        raise ManifestError(f"{where}: no 'labels' (the id -> name map of the label values)")
    try:
        labels = LabelSet.from_manifest(content["labels"], regions=content.get("regions"))
    except ManifestError as error:
        raise ManifestError(f"{where}: {error}") from None
    root = data_root.resolve()
    channels = _channels(content)
    case_lists = content.get("case_lists", _DEFAULT_CASE_LISTS)
    for key, kind in (
        ("raters", Mapping),
        ("label_value_map", Mapping),
        ("regions", Mapping),
        ("case_lists", (list, tuple)),
        ("things", (list, tuple)),
    ):
        if key in content and not isinstance(content[key], kind):
            raise ManifestError(f"{where}: {key!r} must be a JSON {'object' if kind is Mapping else 'list'}")
    for key, mapping in dict(content.get("label_value_map", {})).items():
        if not isinstance(mapping, Mapping) or not all(_is_int(k) and _is_int(v) for k, v in mapping.items()):
            raise ManifestError(
                f'{where}: label_value_map[{key!r}] must map stored values to label ids, e.g. {{"1": 255}}'
            )
    label_keys = {"label", *dict(content.get("raters", {}))}
    raw_cases: list[tuple[str, Mapping[str, Any] | str]] = []
    for list_name in case_lists:
        entries = content.get(list_name) or []
        if not isinstance(entries, list):
            raise ManifestError(f"{where}: {list_name!r} must be a list of cases")
        raw_cases += [(list_name, entry) for entry in entries]
    if not raw_cases:
        raise ManifestError(f"{where}: no cases (lists {', '.join(repr(c) for c in case_lists)} are empty or absent)")
    parsed = [_parse_case(entry, subset, root=root, where=where, label_keys=label_keys) for subset, entry in raw_cases]
    ids = _case_ids(parsed, where=where)
    cases = tuple(
        Case(case_id=i, images=p["images"], label=p["label"], extras=p["extras"], subset=p["subset"])
        for i, p in zip(ids, parsed)
    )
    trainable = [c.case_id for c in cases if c.subset == "training" and c.label is not None]
    folds = _folds(content.get("folds"), trainable, where=where)
    things = tuple(str(t) for t in content.get("things", ()))
    known_structures = {s.name for s in labels.structures()}
    unknown = [t for t in things if t not in known_structures]
    if unknown:
        raise ManifestError(f"{where}: 'things' names unknown structures {unknown}")
    return Manifest(
        name=str(content.get("name", source.stem if source else "manifest")),
        path=source,
        data_root=root,
        labels=labels,
        channels=channels,
        cases=cases,
        things=things,
        nsd_tolerance_mm=_tolerances(content.get("nsd_tolerance_mm"), known_structures, where),
        raters={"label": "rater1", **{str(k): str(v) for k, v in dict(content.get("raters", {})).items()}},
        label_value_map={
            str(key): {int(k): int(v) for k, v in dict(mapping).items()}
            for key, mapping in dict(content.get("label_value_map", {})).items()
        },
        folds=folds,
        tensor_image_size=str(content.get("tensorImageSize", "3D")),
    )


def _is_int(value: Any) -> bool:
    try:
        int(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, bool) and float(value) == int(value)


def _channels(content: Mapping[str, Any]) -> tuple[str, ...]:
    modality = content.get("channel_names", content.get("modality", {"0": "image"}))
    if isinstance(modality, Mapping):
        return tuple(str(v) for _, v in sorted(modality.items(), key=lambda kv: int(kv[0])))
    if isinstance(modality, list):
        return tuple(str(m) for m in modality)
    return (str(modality),)


def _resolve(relative: Any, *, root: Path, where: str) -> Path:
    if not isinstance(relative, str) or not relative:
        raise ManifestError(f"{where}: expected a relative path string, got {relative!r}")
    candidate = Path(relative)
    if candidate.is_absolute():
        raise ManifestError(f"{where}: path {relative!r} is absolute; paths must be relative to the data root")
    resolved = (root / candidate).resolve()
    if resolved != root and root not in resolved.parents:
        raise ManifestError(f"{where}: path {relative!r} escapes the data root {root}")
    return resolved


def _parse_case(
    entry: Mapping[str, Any] | str, subset: str, *, root: Path, where: str, label_keys: set[str]
) -> dict[str, Any]:
    if isinstance(entry, str):  # MSD test lists hold bare image paths
        entry = {"image": entry}
    if not isinstance(entry, Mapping) or "image" not in entry:
        raise ManifestError(f"{where}: a case in {subset!r} has no 'image': {entry!r}")
    images = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
    if not images:
        raise ManifestError(f"{where}: a case in {subset!r} has an empty 'image' list")
    extras: dict[str, Path] = {}
    for key, value in entry.items():
        if key in ("image", "label", "id"):
            continue
        if isinstance(value, str) and (key in label_keys or _looks_like_path(value)):
            extras[key] = _resolve(value, root=root, where=where)
    return {
        "subset": subset,
        "id": entry.get("id"),
        "images": tuple(_resolve(p, root=root, where=where) for p in images),
        "label": _resolve(entry["label"], root=root, where=where) if entry.get("label") else None,
        "extras": extras,
    }


def _looks_like_path(value: str) -> bool:
    return "/" in value or strip_volume_suffix(value) != value


def _case_ids(parsed: list[dict[str, Any]], *, where: str) -> list[str]:
    explicit = [p["id"] for p in parsed]
    from_name = [strip_volume_suffix(p["images"][0]) for p in parsed]
    from_folder = [p["images"][0].parent.name for p in parsed]
    if len(set(from_name)) == len(from_name):
        derived = from_name
    elif len(set(from_folder)) == len(from_folder):
        derived = from_folder
    else:
        derived = [f"{p['images'][0].parent.name}_{n}" for p, n in zip(parsed, from_name)]
    ids = [str(e) if e is not None else d for e, d in zip(explicit, derived)]
    for case_id in ids:
        if not case_id or case_id.startswith(".") or "/" in case_id or "\\" in case_id or ".." in case_id:
            raise ManifestError(
                f"{where}: case id {case_id!r} is not a plain file name (no '/', '\\', '..' or leading '.')"
            )
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ManifestError(f"{where}: duplicate case ids {duplicates[:5]}; give each case an 'id'")
    return ids


def _folds(explicit: Any, trainable: list[str], *, where: str) -> tuple[tuple[str, ...], ...]:
    if explicit is None:
        return tuple(tuple(f) for f in kfold_split(trainable))
    if not isinstance(explicit, list) or not all(isinstance(f, list) for f in explicit):
        raise ManifestError(f"{where}: 'folds' must be a list of lists of validation case ids")
    known = set(trainable)
    for index, fold in enumerate(explicit):
        unknown = [c for c in fold if c not in known]
        if unknown:
            raise ManifestError(f"{where}: fold {index} names unknown training cases {unknown[:5]}")
    return tuple(tuple(str(c) for c in fold) for fold in explicit)


def _tolerances(value: Any, structures: set[str], where: str) -> dict[str, float]:
    if value is None:
        return {}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"*": float(value)}
    if not isinstance(value, Mapping):
        raise ManifestError(f"{where}: 'nsd_tolerance_mm' must be a number or a mapping")
    result = {}
    for name, tolerance in value.items():
        if name != "*" and name not in structures:
            raise ManifestError(f"{where}: 'nsd_tolerance_mm' names unknown structure {name!r}")
        if not isinstance(tolerance, (int, float)) or tolerance < 0:
            raise ManifestError(f"{where}: NSD tolerance for {name!r} must be a number >= 0 mm")
        result[str(name)] = float(tolerance)
    return result
