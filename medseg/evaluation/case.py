"""Scoring one reference/prediction pair: every structure and region, every metric, one table row each.

:func:`evaluate_pair` checks the geometry (the error names both files and the differing field),
maps label values to class indices (values outside the label map are an error naming the file),
makes one confusion-matrix pass for the overlap metrics of every label and region, computes
bounding-box-cropped surface metrics per structure (:mod:`medseg.metrics.surface`) and matches
lesions of "thing" structures (:mod:`medseg.metrics.instances`). With scores (a probability map),
each thing structure also yields the case's detections record
(:func:`medseg.metrics.detection.detections_record`) from which a batch computes the pooled,
dataset-level AP. Every error that the user's input can cause (files, grids, options) is a
:class:`~medseg.errors.MedsegUserError` naming the file or option; any other exception is a bug.
The metric definitions are in DESIGN.md section 6 and in the docstrings of :mod:`medseg.metrics`.

Example:
    >>> settings = EvaluationSettings(labels=LabelSet({0: "background", 1: "liver"}))
    >>> result = evaluate_pair(reference, prediction, settings=settings)   # doctest: +SKIP
    >>> result.rows[0]["dice"]                                             # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

import numpy as np

from medseg.core.components import connected_components
from medseg.core.labels import LabelSet, Structure
from medseg.core.resample import resample_to
from medseg.core.volume import Volume
from medseg.data.manifest import DEFAULT_NSD_TOLERANCE_MM
from medseg.errors import GeometryMismatchError, InvalidFileError, LabelValueError, MedsegUserError

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "PER_CASE_COLUMNS",
    "resampled_onto",
    "EXTRA_COLUMNS",
    "METRIC_COLUMNS",
    "EvaluationSettings",
    "PairResult",
    "evaluate_pair",
    "empty_rows",
    "check_options",
    "check_tolerance",
]

#: the columns of ``per_case.csv``, in order (more columns may follow)
PER_CASE_COLUMNS = [
    "case_id",
    "structure",
    "label",
    "status",
    "dice",
    "iou",
    "precision",
    "recall",
    "hd_mm",
    "hd95_mm",
    "assd_mm",
    "nsd",
    "ref_ml",
    "pred_ml",
    "volume_diff_ml",
]


EXTRA_COLUMNS = ["nsd_tolerance_mm", "image_diagonal_mm", "spacing_known", "message"]


#: the metric columns of ``per_case.csv`` (NaN in a row without a score)
METRIC_COLUMNS = PER_CASE_COLUMNS[4:]


def check_options(*, connectivity: object = None, match: object = "iou", workers: object = 1) -> None:
    """Refuse an invalid evaluation option before any case is read.

    Args:
        connectivity: ``None`` (full: 8 in 2D, 26 in 3D), 1, 2 or 3.
        match: ``"iou"`` or ``"overlap"``.
        workers: an integer >= 1.

    Raises:
        MedsegUserError: naming the option, the allowed values and the value given.
    """
    if connectivity is not None and (
        isinstance(connectivity, bool)
        or not isinstance(connectivity, (int, np.integer))
        or connectivity not in (1, 2, 3)
    ):
        raise MedsegUserError(f"connectivity must be None, 1, 2 or 3 (1 = faces ... 3 = full 3D), got {connectivity!r}")
    if not isinstance(match, str) or match not in ("iou", "overlap"):
        raise MedsegUserError(f"match must be 'iou' or 'overlap', got {match!r}")
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise MedsegUserError(f"workers must be an integer >= 1, got {workers!r}")


def check_tolerance(name: str, value: object) -> float:
    """``value`` as a finite tolerance >= 0 (mm); else a :class:`MedsegUserError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise MedsegUserError(f"{name} must be a number of mm >= 0, got {value!r}")
    if not math.isfinite(float(value)) or float(value) < 0:
        raise MedsegUserError(f"{name} must be a finite number of mm >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class EvaluationSettings:
    """Everything besides the files that determines a case's result (saved in summary.json).

    Every field is part of :meth:`to_json`, and so of the per-case cache key: a changed setting
    recomputes every case.

    Attributes:
        labels: the label map with its regions.
        things: structures scored as instances (lesion-wise metrics, PQ, AP).
        nsd_tolerance_mm: NSD tolerance per structure name, ``"*"`` for the others (default 1 mm).
        connectivity: lesion connectivity, ``None`` (full) or 1..3; above the image's dimension is
            an error of that case.
        match: lesion matching, ``"iou"`` (IoU > 0.5) or ``"overlap"``.
        resample_prediction: resample predictions onto the reference grid (nearest neighbour).
        tolerance_mm: largest spacing / origin difference (mm) of two grids taken as the same.
        include_regions: score the label map's regions too.

    Raises:
        MedsegUserError: an invalid option, named (see :func:`check_options`); a thing or NSD
            tolerance naming no structure; a negative or non-finite tolerance.
    """

    labels: LabelSet
    things: tuple[str, ...] = ()
    nsd_tolerance_mm: Mapping[str, float] = field(default_factory=dict)
    connectivity: int | None = None
    match: Literal["iou", "overlap"] = "iou"
    resample_prediction: bool = False
    tolerance_mm: float = 1e-3
    include_regions: bool = True

    def __post_init__(self) -> None:
        check_options(connectivity=self.connectivity, match=self.match)
        object.__setattr__(self, "things", tuple(self.things))
        known = {s.name for s in self.labels.structures()}
        unknown = [t for t in self.things if t not in known]
        if unknown:
            raise MedsegUserError(f"things: unknown structures {unknown} (known: {sorted(known)})")
        for name, value in self.nsd_tolerance_mm.items():
            if name != "*" and name not in known:
                raise MedsegUserError(f"nsd_tolerance_mm: unknown structure {name!r} (known: {sorted(known)})")
            check_tolerance(f"nsd_tolerance_mm[{name!r}]", value)
        check_tolerance("tolerance_mm", self.tolerance_mm)

    def tolerance_for(self, structure: str) -> float:
        """NSD tolerance (mm) of a structure: its own, the ``"*"`` default, or 1 mm."""
        return float(self.nsd_tolerance_mm.get(structure, self.nsd_tolerance_mm.get("*", DEFAULT_NSD_TOLERANCE_MM)))

    def to_json(self) -> dict[str, Any]:
        """Plain JSON of every field; ``nsd_tolerance_mm`` as the tolerance each structure gets."""
        values = asdict(self)
        values["labels"] = self.labels.to_json()
        values["things"] = list(self.things)
        values["nsd_tolerance_mm"] = {s.name: self.tolerance_for(s.name) for s in self.labels.structures()}
        return values


@dataclass
class PairResult:
    """The result of one reference/prediction pair.

    Attributes:
        rows: one dict per structure with the :data:`PER_CASE_COLUMNS`.
        lesions: one dict per reference or predicted lesion of "thing" structures.
        lesion_summary: one dict per thing structure (TP/FP/FN, F1, PQ, AP...).
        confusion: ``(n, n)`` int64 confusion matrix over ``labels.ids`` (rows = reference).
        detections: one dict per thing structure whose lesions have scores: ``case_id``,
            ``structure`` and the :func:`~medseg.metrics.detection.detections_record` (``scores``,
            ``pairs``, ``n_ref``), the input of the pooled AP; not a column of any table.
    """

    rows: list[dict[str, Any]]
    lesions: list[dict[str, Any]] = field(default_factory=list)
    lesion_summary: list[dict[str, Any]] = field(default_factory=list)
    confusion: np.ndarray | None = None
    detections: list[dict[str, Any]] = field(default_factory=list)


def _structure_label(structure: Structure) -> str:
    return "+".join(str(i) for i in structure.label_ids)


def _index_map(volume: Volume, labels: LabelSet) -> np.ndarray:
    """Map label values to class indices 0..n-1 (in ``labels.ids`` order); unknown values raise."""
    array = volume.array
    if array.shape[0] != 1:
        raise LabelValueError(
            f"{volume.meta.get('path', 'label map')}: label maps have one channel, got {array.shape[0]}"
        )
    array = array[0]
    low, high = int(array.min()), int(array.max())
    # ids 0..n-1: the range check suffices; otherwise count the values present (cheaper than np.unique)
    unknown: list[int] = []
    if low < 0 or high > labels.max_id:
        unknown = sorted(set(np.unique(array).tolist()) - set(labels.ids))
    elif not labels.is_contiguous:
        present = np.flatnonzero(np.bincount(array.ravel(order="K"), minlength=labels.max_id + 1))
        unknown = sorted(set(present.tolist()) - set(labels.ids))
    if unknown:
        raise LabelValueError(
            f"{volume.meta.get('path', 'label map')}: label values {unknown[:8]} are not in the label map {list(labels.ids)}"
        )
    if labels.is_contiguous:
        return array.astype(np.uint8 if labels.max_id < 256 else np.int32, copy=False)
    lookup = np.zeros(labels.max_id + 1, dtype=np.uint8 if len(labels.ids) < 256 else np.int32)
    for index, label_id in enumerate(labels.ids):
        lookup[label_id] = index
    return lookup[array.T].T if array.flags.f_contiguous else lookup[array]  # keep the memory order


def resampled_onto(reference: Volume, prediction: Volume, *, tolerance_mm: float) -> Volume:
    """``prediction`` on ``reference``'s grid (nearest neighbour), itself when already there.

    Raises:
        GeometryMismatchError: a 2D prediction for a 3D reference or the reverse (both files named).
    """
    if reference.same_geometry(prediction, tolerance_mm=tolerance_mm):
        return prediction
    if prediction.spatial_ndim != reference.spatial_ndim:
        raise GeometryMismatchError(
            f"{prediction.meta.get('path', 'prediction')} vs {reference.meta.get('path', 'reference')}: "
            f"cannot resample a {prediction.spatial_ndim}D prediction onto a {reference.spatial_ndim}D reference"
        )
    return resample_to(prediction, reference)


def evaluate_pair(
    reference: Volume,
    prediction: Volume,
    *,
    settings: EvaluationSettings,
    case_id: str = "case",
    probabilities: Volume | None = None,
    instances: Volume | None = None,
    instance_scores: Mapping[int, tuple[int, float]] | None = None,
) -> PairResult:
    """Score one prediction against one reference, every structure and region.

    Args:
        reference: the reference label Volume (its spacing is used for all distances).
        prediction: the predicted label Volume on the same grid (or resampled when
            ``settings.resample_prediction``).
        settings: labels, thing structures, NSD tolerances, matching options.
        case_id: the id written in every row.
        probabilities: optional foreground probability map(s) on the same grid; channel ``k`` is the
            probability of class ``labels.ids[k]`` (one channel: of the thing structure), used to
            score lesions for AP.

    Raises:
        GeometryMismatchError: the grids differ (the message names both files and the field),
            also 2D against 3D when resampling.
        LabelValueError: a label map holds values outside the label map.
        InvalidFileError: the probability map has the wrong number of channels or non-finite values.
        MedsegUserError: ``settings.connectivity`` exceeds the image's dimension (thing structures only).
    """
    # the metrics (scipy) load on first use: a cached rerun and the parent of worker processes skip them
    from medseg.metrics.instances import lesion_metrics
    from medseg.metrics.overlap import confusion_matrix, overlap_from_counts
    from medseg.metrics.surface import surface_metrics, surface_metrics_multi

    labels = settings.labels
    if settings.resample_prediction:
        prediction = resampled_onto(reference, prediction, tolerance_mm=settings.tolerance_mm)
    differences = reference.geometry_differences(prediction, tolerance_mm=settings.tolerance_mm)
    if differences:
        raise GeometryMismatchError(
            f"{prediction.meta.get('path', 'prediction')} vs {reference.meta.get('path', 'reference')}: "
            f"geometry differs: {'; '.join(differences)}"
        )
    ref_index = _index_map(reference, labels)
    pred_index = _index_map(prediction, labels)
    num_classes = len(labels.ids)
    confusion = confusion_matrix(ref_index, pred_index, num_classes=num_classes)
    spacing = reference.spacing_mm
    voxel_ml = reference.voxel_volume_ml
    diagonal_mm = float(np.linalg.norm(np.array(reference.spatial_shape) * np.array(spacing)))
    spacing_known = bool(reference.meta.get("spacing_known", True))
    index_of = {label_id: i for i, label_id in enumerate(labels.ids)}

    rows: list[dict[str, Any]] = []
    ok_labels: dict[int, float] = {}
    for structure in labels.structures(include_regions=settings.include_regions):
        members = [index_of[i] for i in structure.label_ids]
        tp = int(confusion[np.ix_(members, members)].sum())
        ref_total = int(confusion[members, :].sum())
        pred_total = int(confusion[:, members].sum())
        values = overlap_from_counts(tp=tp, fp=pred_total - tp, fn=ref_total - tp, voxel_volume_ml=voxel_ml)
        row = {
            "case_id": case_id,
            "structure": structure.name,
            "label": _structure_label(structure),
            **values,
            "hd_mm": np.nan,
            "hd95_mm": np.nan,
            "assd_mm": np.nan,
            "nsd": np.nan,
            "nsd_tolerance_mm": settings.tolerance_for(structure.name),
            "image_diagonal_mm": diagonal_mm,
            "spacing_known": spacing_known,
            "message": "",
        }
        if row["status"] == "ok":
            if structure.is_region:
                ref_mask = np.isin(ref_index, members)
                pred_mask = np.isin(pred_index, members)
                row.update(
                    surface_metrics(ref_mask, pred_mask, spacing_mm=spacing, nsd_tolerance_mm=row["nsd_tolerance_mm"])
                )
            else:
                ok_labels[members[0]] = row["nsd_tolerance_mm"]
        rows.append(row)
    if ok_labels:
        surfaces = surface_metrics_multi(
            ref_index, pred_index, labels=list(ok_labels), spacing_mm=spacing, nsd_tolerance_mm=ok_labels
        )
        for row, structure in zip(rows, labels.structures(include_regions=settings.include_regions)):
            if not structure.is_region and index_of[structure.label_ids[0]] in surfaces and row["status"] == "ok":
                row.update(surfaces[index_of[structure.label_ids[0]]])

    lesions: list[dict[str, Any]] = []
    lesion_summary: list[dict[str, Any]] = []
    detections: list[dict[str, Any]] = []
    things = [s for s in labels.structures(include_regions=settings.include_regions) if s.name in settings.things]
    if things and settings.connectivity is not None and settings.connectivity > reference.spatial_ndim:
        raise MedsegUserError(
            f"{reference.meta.get('path', 'reference')}: connectivity {settings.connectivity} needs a 3D image, "
            f"this one is {reference.spatial_ndim}D (use 1..{reference.spatial_ndim} or None)"
        )
    instance_array = _instance_array(instances, instance_scores) if instances is not None else None
    for structure in things:
        members = [index_of[i] for i in structure.label_ids]
        ref_instances, _ = connected_components(np.isin(ref_index, members), connectivity=settings.connectivity)
        probability_map, scores = None, None
        if instance_array is not None and instance_scores is not None:  # the detector's own instances
            own = [i for i, (label, _) in instance_scores.items() if label in structure.label_ids]
            pred_instances = np.where(np.isin(instance_array, own), instance_array, 0).astype(np.int32)
            scores = {i: instance_scores[i][1] for i in own}
        else:
            pred_instances, _ = connected_components(np.isin(pred_index, members), connectivity=settings.connectivity)
        if probabilities is not None:
            probability_map = _thing_probability(probabilities, members, num_classes)
        summary, table = lesion_metrics(
            ref_instances,
            pred_instances,
            spacing_mm=spacing,
            criterion=settings.match,
            probabilities=probability_map,
            prediction_scores=scores,
            input_kind="instances",
        )
        lesion_summary.append({"case_id": case_id, "structure": structure.name, **summary})
        for record in table.to_dict("records"):
            lesions.append({"case_id": case_id, "structure": structure.name, **record})
        if summary["ap_scored"]:
            record = _detections(ref_instances, pred_instances, table)
            detections.append({"case_id": case_id, "structure": structure.name, **record})
    return PairResult(
        rows=rows, lesions=lesions, lesion_summary=lesion_summary, confusion=confusion, detections=detections
    )


def _detections(ref_instances: np.ndarray, pred_instances: np.ndarray, table: pd.DataFrame) -> dict[str, object]:
    """The case's detections record: the scores of the lesion table and every pair's IoU (COCO's input)."""
    from medseg.metrics.detection import detections_record
    from medseg.metrics.instances import match_instances

    match = match_instances(ref_instances, pred_instances)
    predicted = table[table["source"] == "prediction"].set_index("lesion_id")["score"]
    scores = predicted.loc[match.pred_ids].to_numpy(dtype=np.float64)
    return detections_record(
        scores=scores,
        pair_pred_index=np.searchsorted(match.pred_ids, match.pair_pred),
        pair_ref_index=np.searchsorted(match.ref_ids, match.pair_ref),
        pair_iou=match.pair_iou,
        n_ref=len(match.ref_ids),
    )


def _instance_array(instances: Volume, scores: Mapping[int, tuple[int, float]] | None) -> np.ndarray:
    """The instance map's array, every id of which must have a row in its table."""
    array = instances.array[0]
    present = {int(i) for i in np.unique(array) if i != 0}
    missing = sorted(present - set(scores or {}))
    if missing:
        raise LabelValueError(
            f"{instances.meta.get('path', 'instance map')}: instance ids {missing[:8]} have no row in the score table"
        )
    return array


def read_instance_table(path: str | os.PathLike[str]) -> dict[int, tuple[int, float]]:
    """``{instance_id: (label, score)}`` of a detection model's table (``medseg predict``, ``instances/<case>.csv``).

    Raises:
        InvalidFileError: unreadable, no ``instance_id``/``label``/``score`` columns, or a value that
            is not a number (named with its line).
    """
    import csv

    rows: dict[int, tuple[int, float]] = {}
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = {"instance_id", "label", "score"} - set(reader.fieldnames or ())
            if missing:
                raise InvalidFileError(f"{path}: score table lacks column(s) {sorted(missing)}")
            for line, row in enumerate(reader, start=2):
                try:
                    rows[int(row["instance_id"])] = (int(row["label"]), float(row["score"]))
                except (TypeError, ValueError):
                    raise InvalidFileError(f"{path}: line {line} is not instance_id,label,score numbers") from None
    except OSError as error:
        raise InvalidFileError(f"{path}: cannot read ({error.strerror or error})") from None
    return rows


def _thing_probability(probabilities: Volume, members: Sequence[int], num_classes: int) -> np.ndarray:
    """Foreground probability of one thing structure: the sum of its classes' channels, or the one channel."""
    path = probabilities.meta.get("path", "probabilities")
    array = probabilities.array.astype(np.float32, copy=False)
    if array.shape[0] == num_classes:
        array = array[list(members)].sum(axis=0)
    elif array.shape[0] == 1:
        array = array[0]
    else:
        raise InvalidFileError(f"{path}: expected 1 or {num_classes} probability channels, got {array.shape[0]}")
    if not np.all(np.isfinite(array)):
        raise InvalidFileError(f"{path}: probabilities contain NaN or infinite values")
    return array


def empty_rows(
    case_id: str, settings: EvaluationSettings, status: str, message: str = "", *, reference: Volume | None = None
) -> list[dict[str, Any]]:
    """Rows of a case without a score; with the reference known, ``ref_ml`` and the diagonal are filled."""
    rows = []
    diagonal = np.nan
    if reference is not None:
        diagonal = float(np.linalg.norm(np.array(reference.spatial_shape) * np.array(reference.spacing_mm)))
    for structure in settings.labels.structures(include_regions=settings.include_regions):
        row = {
            "case_id": case_id,
            "structure": structure.name,
            "label": _structure_label(structure),
            "status": status,
            **{m: np.nan for m in METRIC_COLUMNS},
            "nsd_tolerance_mm": settings.tolerance_for(structure.name),
            "image_diagonal_mm": diagonal,
            "spacing_known": bool(reference.meta.get("spacing_known", True)) if reference is not None else True,
            "message": message,
        }
        if reference is not None:
            count = int(np.count_nonzero(np.isin(reference.array[0], structure.label_ids)))
            row["ref_ml"] = count * reference.voxel_volume_ml
        rows.append(row)
    return rows
