"""`LabelSet`: the ordered map between structure names and label ids, plus named regions.

A label map's integer values mean something only through a LabelSet. It reads both manifest
styles:

* MSD: ``{"0": "background", "1": "Anterior", "2": "Posterior"}`` (id -> name)
* nnU-Net v2: ``{"background": 0, "Anterior": 1, "Posterior": 2}`` (name -> id), where a value may
  also be a list of ids, which nnU-Net uses for regions.

Regions are named sets of labels that are evaluated (and may be trained) as one structure, e.g.
BraTS whole tumour = {1, 2, 3, 4}, tumour core = {1, 3, 4}, enhancing tumour = {4}.

Example:
    >>> labels = LabelSet.from_manifest({"0": "background", "1": "liver", "2": "tumour"},
    ...                                 regions={"liver_and_tumour": ["liver", "tumour"]})
    >>> labels.foreground_ids, labels.id_of("tumour"), labels.regions["liver_and_tumour"]
    ((1, 2), 2, (1, 2))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from medseg.errors import LabelValueError, ManifestError

__all__ = ["LabelSet", "Structure", "as_label_array"]


@dataclass(frozen=True)
class Structure:
    """One evaluated structure: a single label or a region (several labels scored as one).

    Attributes:
        name: structure name (``"Anterior"``, ``"whole_tumour"``).
        label_ids: the label ids that make up the structure's mask.
        is_region: whether this is a region rather than a single label.
    """

    name: str
    label_ids: tuple[int, ...]
    is_region: bool = False

    @property
    def label(self) -> int | None:
        """The single label id, or None for a region."""
        return None if self.is_region else self.label_ids[0]


@dataclass(frozen=True)
class LabelSet:
    """Ordered id <-> name map with named regions.

    Attributes:
        names: mapping id -> name in ascending id order; id 0 is background.
        regions: mapping region name -> tuple of label ids.
    """

    names: Mapping[int, str]
    regions: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ordered = dict(sorted((int(k), str(v)) for k, v in dict(self.names).items()))
        if not ordered:
            raise ManifestError("label map is empty")
        if any(i < 0 for i in ordered):
            raise ManifestError(f"label ids must be >= 0, got {sorted(ordered)}")
        seen: dict[str, int] = {}
        for label_id, name in ordered.items():
            if name in seen:
                raise ManifestError(f"label name {name!r} is used by ids {seen[name]} and {label_id}")
            seen[name] = label_id
        regions: dict[str, tuple[int, ...]] = {}
        for region, ids in dict(self.regions).items():
            ids_tuple = tuple(sorted({int(i) for i in ids}))
            unknown = [i for i in ids_tuple if i not in ordered]
            if unknown or not ids_tuple:
                raise ManifestError(
                    f"region {region!r} refers to unknown label ids {unknown} (known: {sorted(ordered)})"
                )
            if region in seen:
                raise ManifestError(f"region {region!r} has the same name as a label")
            regions[str(region)] = ids_tuple
        object.__setattr__(self, "names", ordered)
        object.__setattr__(self, "regions", regions)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_manifest(
        cls,
        labels: Mapping[str, Any],
        *,
        regions: Mapping[str, Iterable[int | str]] | None = None,
    ) -> LabelSet:
        """Build from a manifest's ``labels`` (MSD or nnU-Net style) and optional ``regions``.

        Region members may be label ids or label names. nnU-Net-style entries whose value is a
        list of ids become regions.
        """
        if not isinstance(labels, Mapping) or not labels:
            raise ManifestError("'labels' must be a non-empty mapping")
        names: dict[int, str] = {}
        derived_regions: dict[str, list[int]] = {}
        msd_style = all(_is_int_string(k) for k in labels)
        for key, value in labels.items():
            if msd_style:
                names[int(key)] = str(value)
            elif isinstance(value, int) and not isinstance(value, bool):
                names[int(value)] = str(key)
            elif isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
                if len(value) == 1:
                    names[int(value[0])] = str(key)
                else:
                    derived_regions[str(key)] = [int(v) for v in value]
            elif isinstance(value, str) and _is_int_string(value):
                names[int(value)] = str(key)
            else:
                raise ManifestError(
                    f"label entry {key!r}: {value!r} is neither MSD style ('1': 'liver') nor nnU-Net style ('liver': 1)"
                )
        by_name = {name: label_id for label_id, name in names.items()}
        for region, members in (regions or {}).items():
            ids = []
            for member in members:
                if isinstance(member, str) and not _is_int_string(member):
                    if member not in by_name:
                        raise ManifestError(
                            f"region {region!r}: unknown label name {member!r} (known: {sorted(by_name)})"
                        )
                    ids.append(by_name[member])
                else:
                    ids.append(int(member))
            derived_regions[str(region)] = ids
        return cls(names, {k: tuple(v) for k, v in derived_regions.items()})

    # -- queries --------------------------------------------------------------------------
    @property
    def ids(self) -> tuple[int, ...]:
        """All label ids, ascending, background included."""
        return tuple(self.names)

    @property
    def foreground_ids(self) -> tuple[int, ...]:
        """All label ids except 0."""
        return tuple(i for i in self.names if i != 0)

    @property
    def max_id(self) -> int:
        """Largest label id."""
        return max(self.names)

    @property
    def num_classes(self) -> int:
        """Number of classes a network predicts (ids must be 0..n-1 for training)."""
        return len(self.names)

    @property
    def is_contiguous(self) -> bool:
        """Whether ids are exactly 0..n-1 (networks need this; DRIVE's {0, 255} is not)."""
        return self.ids == tuple(range(len(self.names)))

    def name_of(self, label_id: int) -> str:
        """Name of a label id."""
        try:
            return self.names[int(label_id)]
        except KeyError:
            raise ValueError(f"unknown label id {label_id} (known: {list(self.names)})") from None

    def id_of(self, name: str) -> int:
        """Label id of a name."""
        for label_id, label_name in self.names.items():
            if label_name == name:
                return label_id
        raise ValueError(f"unknown label name {name!r} (known: {list(self.names.values())})")

    def structures(self, *, include_regions: bool = True) -> list[Structure]:
        """Foreground labels, then regions, as the structures an evaluation scores."""
        result = [Structure(self.names[i], (i,)) for i in self.foreground_ids]
        if include_regions:
            result += [Structure(name, ids, True) for name, ids in self.regions.items()]
        return result

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (MSD style labels + regions by id), the inverse of :meth:`from_manifest`."""
        return {
            "labels": {str(i): n for i, n in self.names.items()},
            "regions": {name: list(ids) for name, ids in self.regions.items()},
        }


def _is_int_string(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        int(value)
    except ValueError:
        return False
    return True


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
                f"{source}: label map holds non-integral values (e.g. {example!r}); labels must be whole numbers"
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
