"""Scoring one reference/prediction pair: every structure and region, every metric, one table row each.

:func:`evaluate_pair` checks the geometry (the error names both files and the differing field),
maps label values to class indices (values outside the label map are an error naming the file),
makes one confusion-matrix pass for the overlap metrics of every label and region, computes
bounding-box-cropped surface metrics per structure (:mod:`medseg.metrics.surface`) and matches
lesions of "thing" structures (:mod:`medseg.metrics.instances`). The metric definitions are in
DESIGN.md section 6 and in the docstrings of :mod:`medseg.metrics`.

Example:
    >>> settings = EvaluationSettings(labels=LabelSet({0: "background", 1: "liver"}))
    >>> result = evaluate_pair(reference, prediction, settings=settings)   # doctest: +SKIP
    >>> result.rows[0]["dice"]                                             # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from medseg.core.labels import LabelSet, Structure
from medseg.core.resample import resample_to
from medseg.core.volume import Volume
from medseg.data.manifest import DEFAULT_NSD_TOLERANCE_MM
from medseg.errors import GeometryMismatchError, LabelValueError
from medseg.metrics.instances import lesion_metrics
from medseg.metrics.overlap import confusion_matrix, overlap_from_counts
from medseg.metrics.surface import surface_metrics, surface_metrics_multi

__all__ = [
    "PER_CASE_COLUMNS",
    "EXTRA_COLUMNS",
    "METRIC_COLUMNS",
    "EvaluationSettings",
    "PairResult",
    "evaluate_pair",
    "empty_rows",
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


METRIC_COLUMNS = [
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


@dataclass(frozen=True)
class EvaluationSettings:
    """Everything besides the files that determines a case's result (saved in summary.json)."""

    labels: LabelSet
    things: tuple[str, ...] = ()
    nsd_tolerance_mm: Mapping[str, float] = field(default_factory=dict)
    connectivity: int | None = None
    match: Literal["iou", "overlap"] = "iou"
    resample_prediction: bool = False
    tolerance_mm: float = 1e-3
    include_regions: bool = True

    def tolerance_for(self, structure: str) -> float:
        """NSD tolerance (mm) of a structure: its own, the ``"*"`` default, or 1 mm."""
        return float(self.nsd_tolerance_mm.get(structure, self.nsd_tolerance_mm.get("*", DEFAULT_NSD_TOLERANCE_MM)))

    def to_json(self) -> dict[str, Any]:
        """Plain JSON."""
        values = asdict(self)
        values["labels"] = self.labels.to_json()
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
    """

    rows: list[dict[str, Any]]
    lesions: list[dict[str, Any]] = field(default_factory=list)
    lesion_summary: list[dict[str, Any]] = field(default_factory=list)
    confusion: np.ndarray | None = None


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
    if low < 0 or high > labels.max_id or not set(np.unique(array).tolist()) <= set(labels.ids):
        unknown = sorted(set(np.unique(array).tolist()) - set(labels.ids))
        raise LabelValueError(
            f"{volume.meta.get('path', 'label map')}: label values {unknown[:8]} are not in the label map {list(labels.ids)}"
        )
    if labels.is_contiguous:
        return array.astype(np.uint8 if labels.max_id < 256 else np.int32, copy=False)
    lookup = np.zeros(labels.max_id + 1, dtype=np.uint8 if len(labels.ids) < 256 else np.int32)
    for index, label_id in enumerate(labels.ids):
        lookup[label_id] = index
    return lookup[array]


def evaluate_pair(
    reference: Volume,
    prediction: Volume,
    *,
    settings: EvaluationSettings,
    case_id: str = "case",
    probabilities: Volume | None = None,
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
        GeometryMismatchError: the grids differ (the message names both files and the field).
        LabelValueError: a label map holds values outside the label map.
    """
    labels = settings.labels
    if settings.resample_prediction and not reference.same_geometry(prediction, tolerance_mm=settings.tolerance_mm):
        prediction = resample_to(prediction, reference)
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
    for structure in labels.structures(include_regions=settings.include_regions):
        if structure.name not in settings.things:
            continue
        members = [index_of[i] for i in structure.label_ids]
        ref_mask = np.isin(ref_index, members)
        pred_mask = np.isin(pred_index, members)
        probability_map = None
        if probabilities is not None:
            probability_map = _thing_probability(probabilities, members, num_classes)
        summary, table = lesion_metrics(
            ref_mask,
            pred_mask,
            spacing_mm=spacing,
            connectivity=settings.connectivity,
            criterion=settings.match,
            probabilities=probability_map,
        )
        lesion_summary.append({"case_id": case_id, "structure": structure.name, **summary})
        for record in table.to_dict("records"):
            lesions.append({"case_id": case_id, "structure": structure.name, **record})
    return PairResult(rows=rows, lesions=lesions, lesion_summary=lesion_summary, confusion=confusion)


def _thing_probability(probabilities: Volume, members: Sequence[int], num_classes: int) -> np.ndarray:
    array = probabilities.array.astype(np.float32, copy=False)
    if array.shape[0] == num_classes:
        return array[list(members)].sum(axis=0)
    if array.shape[0] == 1:
        return array[0]
    raise ValueError(
        f"{probabilities.meta.get('path', 'probabilities')}: expected 1 or {num_classes} channels, got {array.shape[0]}"
    )


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
