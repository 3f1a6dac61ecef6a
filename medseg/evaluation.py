"""Evaluation engine: references + predictions -> tidy tables (case x structure).

One pair is scored by :func:`evaluate_pair`: a geometry check (the error names both files and the
differing field), one confusion-matrix pass for the overlap metrics of every label and region,
bounding-box-cropped surface metrics per structure (:mod:`medseg.metrics.surface`), and lesion
matching for "thing" structures (:mod:`medseg.metrics.instances`).

A batch is scored by :func:`evaluate`: cases are paired by id (file name without extension, or the
manifest's case id), a missing prediction becomes rows with status ``missing_prediction``, a case
that cannot be scored (corrupt file, geometry mismatch, label outside the map) becomes rows with
status ``error`` and its message, and the rest go on. With ``out`` set, per-case results are
cached under ``out/.cache`` keyed by the input files (path, size, mtime) and the settings, so a
rerun recomputes only what changed. The metric definitions are in DESIGN.md section 6 and in the
docstrings of :mod:`medseg.metrics`.

Example:
    >>> ev = evaluate("labelsTr/", "predictions/", labels=manifest.labels, workers=2)  # doctest: +SKIP
    >>> ev.per_case.groupby("structure").dice.mean()                                    # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np
import pandas as pd

from medseg.errors import GeometryMismatchError, LabelValueError, MedsegUserError
from medseg.io import (
    IMAGE_2D_SUFFIXES,
    ITK_SUFFIXES,
    NIFTI_SUFFIXES,
    atomic_path,
    check_same_grid,
    read_json,
    read_volume,
    strip_volume_suffix,
    volume_suffix,
)
from medseg.labels import LabelSet, Structure
from medseg.manifest import DEFAULT_NSD_TOLERANCE_MM, Manifest, load_manifest, remap_labels
from medseg.volume import Volume

__all__ = [
    "PER_CASE_COLUMNS",
    "PairResult",
    "Evaluation",
    "EvaluationSettings",
    "evaluate_pair",
    "evaluate",
]

#: the columns of ``per_case.csv``, in order (more columns may follow)
PER_CASE_COLUMNS = [
    "case_id", "structure", "label", "status", "dice", "iou", "precision", "recall",
    "hd_mm", "hd95_mm", "assd_mm", "nsd", "ref_ml", "pred_ml", "volume_diff_ml",
]
_EXTRA_COLUMNS = ["nsd_tolerance_mm", "image_diagonal_mm", "spacing_known", "message"]
_METRICS = ["dice", "iou", "precision", "recall", "hd_mm", "hd95_mm", "assd_mm", "nsd", "ref_ml", "pred_ml", "volume_diff_ml"]
_CACHE_VERSION = 1


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
        raise LabelValueError(f"{volume.meta.get('path', 'label map')}: label maps have one channel, got {array.shape[0]}")
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
    from medseg.metrics.instances import lesion_metrics
    from medseg.metrics.overlap import confusion_matrix, overlap_from_counts
    from medseg.metrics.surface import surface_metrics, surface_metrics_multi

    labels = settings.labels
    if settings.resample_prediction and not reference.same_geometry(prediction, tolerance_mm=settings.tolerance_mm):
        from medseg.resample import resample_to

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
            "hd_mm": np.nan, "hd95_mm": np.nan, "assd_mm": np.nan, "nsd": np.nan,
            "nsd_tolerance_mm": settings.tolerance_for(structure.name),
            "image_diagonal_mm": diagonal_mm,
            "spacing_known": spacing_known,
            "message": "",
        }
        if row["status"] == "ok":
            if structure.is_region:
                ref_mask = np.isin(ref_index, members)
                pred_mask = np.isin(pred_index, members)
                row.update(surface_metrics(ref_mask, pred_mask, spacing_mm=spacing,
                                           nsd_tolerance_mm=row["nsd_tolerance_mm"]))
            else:
                ok_labels[members[0]] = row["nsd_tolerance_mm"]
        rows.append(row)
    if ok_labels:
        surfaces = surface_metrics_multi(ref_index, pred_index, labels=list(ok_labels), spacing_mm=spacing,
                                         nsd_tolerance_mm=ok_labels)
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
            ref_mask, pred_mask, spacing_mm=spacing, connectivity=settings.connectivity,
            criterion=settings.match, probabilities=probability_map,
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


# ---------------------------------------------------------------------------------------------
# batch
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Job:
    case_id: str
    reference: str | None
    prediction: str | None
    probabilities: str | None = None
    image: str | None = None
    raters: tuple[tuple[str, str], ...] = ()  # (rater name, path) beyond the primary reference
    value_maps: tuple[tuple[str, tuple[tuple[int, int], ...]], ...] = ()


@dataclass
class Evaluation:
    """The result of a batch evaluation: pandas tables and the accumulated confusion matrix.

    Attributes:
        per_case: one row per case x structure (:data:`PER_CASE_COLUMNS` + extras).
        cases: one row per case: files, per-case mIoU, status, error message.
        lesions: one row per lesion of thing structures (empty when none).
        lesion_summary: one row per case x thing structure: TP/FP/FN, F1, PQ, AP...
        per_rater: prediction against every rater and against the STAPLE / majority consensus.
        inter_rater: each pair of raters (the human baseline).
        confusion: summed confusion matrix over all scored cases (dataset-level mIoU).
        settings: the settings used.
    """

    per_case: pd.DataFrame
    cases: pd.DataFrame
    lesions: pd.DataFrame
    lesion_summary: pd.DataFrame
    per_rater: pd.DataFrame
    inter_rater: pd.DataFrame
    confusion: np.ndarray
    settings: EvaluationSettings

    @property
    def dataset_miou(self) -> float:
        """Dataset-level mIoU: IoU per foreground class from the summed confusion matrix, averaged."""
        from medseg.metrics.overlap import miou_from_confusion

        foreground = [i for i, label_id in enumerate(self.settings.labels.ids) if label_id != 0]
        return float(miou_from_confusion(self.confusion, labels=foreground))

    @property
    def failed(self) -> pd.DataFrame:
        """Cases that could not be scored, with their error messages."""
        return self.cases[self.cases["status"] == "error"]

    def _repr_html_(self) -> str:  # notebooks
        from medseg.report import summarize

        return summarize(self.per_case).to_html(float_format=lambda v: f"{v:.4f}")


def _find_volumes(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise MedsegUserError(f"{folder}: not a folder")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if volume_suffix(path) in NIFTI_SUFFIXES + ITK_SUFFIXES + IMAGE_2D_SUFFIXES:
            case_id = strip_volume_suffix(path)
            if case_id in found:
                raise MedsegUserError(f"{folder}: two files for case {case_id!r}: {found[case_id].name}, {path.name}")
            found[case_id] = path
    return found


def _resolve_labels(labels: LabelSet | Manifest | str | os.PathLike[str] | None, manifest: Manifest | None,
                    data_root: Path | None) -> tuple[LabelSet, Manifest | None]:
    if isinstance(labels, LabelSet):
        return labels, manifest
    if isinstance(labels, Manifest):
        return labels.labels, labels
    if labels is not None:
        path = Path(labels)
        loaded = _load_labels_manifest(path)
        return loaded.labels, loaded
    if manifest is not None:
        return manifest.labels, manifest
    raise MedsegUserError("no label map: pass labels= (a LabelSet or a manifest) or a manifest as reference")


def _load_labels_manifest(path: Path) -> Manifest:
    from medseg.manifest import manifest_from_dict
    from medseg.errors import ManifestError

    content = read_json(path, what="manifest", error=ManifestError)
    if not isinstance(content, dict):
        raise ManifestError(f"{path}: the top level must be a JSON object")
    # Only the label-related keys matter here: the cases may not exist under any data root.
    content = {k: v for k, v in content.items() if k in ("name", "labels", "regions", "things", "nsd_tolerance_mm")}
    content["training"] = [{"image": "unused.nii.gz"}]
    return manifest_from_dict(content, data_root=path.parent, source=path)


def _jobs(
    reference: str | os.PathLike[str] | Manifest,
    prediction: str | os.PathLike[str],
    *,
    data_root: str | os.PathLike[str] | None,
    probabilities: str | os.PathLike[str] | None,
    subset: str | None,
) -> tuple[list[_Job], Manifest | None, list[str]]:
    prediction_files = _find_volumes(Path(prediction))
    probability_files = _find_volumes(Path(probabilities)) if probabilities is not None else {}
    manifest: Manifest | None = None
    if isinstance(reference, Manifest):
        manifest = reference
    elif Path(reference).is_file() and str(reference).endswith(".json"):
        manifest = load_manifest(reference, data_root=data_root)
    jobs: list[_Job] = []
    if manifest is not None:
        for case in manifest.labelled_cases:
            if subset is not None and case.subset != subset:
                continue
            raters = tuple(
                (manifest.raters[key], str(case.extras[key]))
                for key in manifest.label_keys()[1:] if key in case.extras
            )
            value_maps = tuple(
                (name, tuple(sorted(manifest.label_value_map.get(key, {}).items())))
                for key, name in manifest.raters.items()
            )
            jobs.append(_Job(
                case_id=case.case_id,
                reference=str(case.label),
                prediction=str(prediction_files[case.case_id]) if case.case_id in prediction_files else None,
                probabilities=str(probability_files[case.case_id]) if case.case_id in probability_files else None,
                image=str(case.images[0]),
                raters=raters,
                value_maps=value_maps,
            ))
    else:
        for case_id, path in _find_volumes(Path(reference)).items():
            jobs.append(_Job(
                case_id=case_id,
                reference=str(path),
                prediction=str(prediction_files[case_id]) if case_id in prediction_files else None,
                probabilities=str(probability_files[case_id]) if case_id in probability_files else None,
            ))
    if not jobs:
        raise MedsegUserError(f"{reference}: no reference label files found")
    known = {job.case_id for job in jobs}
    unpaired = sorted(set(prediction_files) - known)
    return jobs, manifest, unpaired


def _read_label(path: str, value_map: Mapping[int, int] | None = None) -> Volume:
    return remap_labels(read_volume(path, kind="label"), value_map)


def _file_key(path: str | None) -> list[Any]:
    if path is None:
        return [None]
    try:
        stat = os.stat(path)
    except OSError:
        return [path, None]
    return [path, stat.st_size, stat.st_mtime_ns]


def _job_key(job: _Job, settings_json: str) -> str:
    parts = [
        _CACHE_VERSION, settings_json, job.case_id,
        _file_key(job.reference), _file_key(job.prediction), _file_key(job.probabilities),
        [(name, _file_key(path)) for name, path in job.raters], [list(v) for v in job.value_maps],
    ]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def _empty_rows(case_id: str, settings: EvaluationSettings, status: str, message: str = "",
                *, reference: Volume | None = None) -> list[dict[str, Any]]:
    """Rows of a case without a score; with the reference known, ``ref_ml`` and the diagonal are filled."""
    rows = []
    diagonal = np.nan
    if reference is not None:
        diagonal = float(np.linalg.norm(np.array(reference.spatial_shape) * np.array(reference.spacing_mm)))
    for structure in settings.labels.structures(include_regions=settings.include_regions):
        row = {
            "case_id": case_id, "structure": structure.name, "label": _structure_label(structure),
            "status": status, **{m: np.nan for m in _METRICS},
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


def _run_job(job: _Job, settings: EvaluationSettings) -> dict[str, Any]:
    """Score one case; never raises for user errors (they become ``error`` rows)."""
    result: dict[str, Any] = {
        "case_id": job.case_id, "reference": job.reference, "prediction": job.prediction,
        "image": job.image, "status": "ok", "message": "", "rows": [], "lesions": [], "lesion_summary": [],
        "confusion": None, "per_rater": [], "inter_rater": [],
    }
    value_maps = {name: dict(pairs) for name, pairs in job.value_maps}
    try:
        reference = _read_label(job.reference, value_maps.get("rater1"))  # type: ignore[arg-type]
        raters = [("rater1", reference)] + [(name, _read_label(path, value_maps.get(name))) for name, path in job.raters]
        if len(raters) > 1:
            result["inter_rater"] = _inter_rater(job.case_id, raters, settings)
        if job.prediction is None:
            result["status"] = "missing_prediction"
            result["rows"] = _empty_rows(job.case_id, settings, "missing_prediction", reference=reference)
            return result
        prediction = _read_label(job.prediction)
        probabilities = read_volume(job.probabilities) if job.probabilities else None
        if probabilities is not None:
            check_same_grid(reference, probabilities, tolerance_mm=settings.tolerance_mm)
        pair = evaluate_pair(reference, prediction, settings=settings, case_id=job.case_id, probabilities=probabilities)
        result["rows"], result["lesions"], result["lesion_summary"] = pair.rows, pair.lesions, pair.lesion_summary
        result["confusion"] = pair.confusion.tolist() if pair.confusion is not None else None
        if len(raters) > 1:
            result["per_rater"] = _per_rater(job.case_id, raters, prediction, settings)
    except (MedsegUserError, ValueError) as error:  # bad input of this case: record it, go on
        result["status"] = "error"
        result["message"] = str(error)
        result["rows"] = _empty_rows(job.case_id, settings, "error", str(error))
        result["lesions"], result["lesion_summary"], result["confusion"] = [], [], None
    return result


def _inter_rater(case_id: str, raters: list[tuple[str, Volume]], settings: EvaluationSettings) -> list[dict[str, Any]]:
    rows = []
    for a in range(len(raters)):
        for b in range(a + 1, len(raters)):
            pair = evaluate_pair(raters[a][1], raters[b][1], settings=settings, case_id=case_id)
            for row in pair.rows:
                rows.append({"rater_a": raters[a][0], "rater_b": raters[b][0], **row})
    return rows


def _per_rater(case_id: str, raters: list[tuple[str, Volume]], prediction: Volume,
               settings: EvaluationSettings) -> list[dict[str, Any]]:
    from medseg.consensus import majority_vote, staple

    rows = []
    references = list(raters)
    references.append(("majority", majority_vote([v for _, v in raters], labels=settings.labels)))
    references.append(("staple", staple([v for _, v in raters], labels=settings.labels)))
    for name, reference in references:
        pair = evaluate_pair(reference, prediction, settings=settings, case_id=case_id)
        rows += [{"rater": name, **row} for row in pair.rows]
    return rows


def evaluate(
    reference: str | os.PathLike[str] | Manifest,
    prediction: str | os.PathLike[str],
    *,
    labels: LabelSet | Manifest | str | os.PathLike[str] | None = None,
    data_root: str | os.PathLike[str] | None = None,
    probabilities: str | os.PathLike[str] | None = None,
    things: Iterable[str] | None = None,
    nsd_tolerance_mm: float | Mapping[str, float] | None = None,
    connectivity: int | None = None,
    match: Literal["iou", "overlap"] = "iou",
    resample_prediction: bool = False,
    subset: str | None = None,
    workers: int = 1,
    out: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> Evaluation:
    """Evaluate a folder of predictions against references; see the module docstring.

    Args:
        reference: a folder of reference label files, or a manifest (path or Manifest) whose
            cases' ``label`` are the references (further raters are evaluated too).
        prediction: folder of predicted label files named ``<case_id>.<ext>``.
        labels: the label map: a LabelSet, a Manifest or a manifest path. Defaults to the
            reference manifest's.
        data_root: data root of a reference manifest.
        probabilities: folder of probability maps named like the predictions (AP scores).
        things: structures scored as instances; defaults to the manifest's ``things``.
        nsd_tolerance_mm: one tolerance, or per structure; defaults to the manifest's (else 1 mm).
        connectivity: lesion connectivity (1 = faces ... ndim = full, the default).
        match: lesion matching, ``"iou"`` (IoU > 0.5) or ``"overlap"`` (any overlap).
        resample_prediction: resample predictions onto the reference grid (nearest neighbour)
            instead of reporting a geometry mismatch.
        subset: only cases of this manifest list (e.g. ``"test_labelled"``).
        workers: processes scoring cases in parallel.
        out: when given, cache per-case results in ``out/.cache`` (a rerun recomputes only changed
            cases). Writing the tables is :func:`medseg.report.write_outputs`.
        progress: show a progress bar on stderr.
    """
    jobs, manifest, unpaired = _jobs(reference, prediction, data_root=data_root,
                                     probabilities=probabilities, subset=subset)
    label_set, label_manifest = _resolve_labels(labels, manifest, Path(data_root) if data_root else None)
    source = label_manifest or manifest
    if nsd_tolerance_mm is None:
        tolerances = dict(source.nsd_tolerance_mm) if source else {}
    elif isinstance(nsd_tolerance_mm, Mapping):
        tolerances = {str(k): float(v) for k, v in nsd_tolerance_mm.items()}
    else:
        tolerances = {"*": float(nsd_tolerance_mm)}
    thing_names = tuple(things) if things is not None else (source.things if source else ())
    known = {s.name for s in label_set.structures()}
    unknown = [t for t in thing_names if t not in known]
    if unknown:
        raise MedsegUserError(f"unknown thing structures {unknown} (known: {sorted(known)})")
    if match not in ("iou", "overlap"):
        raise MedsegUserError(f"match must be 'iou' or 'overlap', got {match!r}")
    if workers < 1:
        raise MedsegUserError(f"workers must be >= 1, got {workers}")
    settings = EvaluationSettings(
        labels=label_set, things=thing_names, nsd_tolerance_mm=tolerances, connectivity=connectivity,
        match=match, resample_prediction=resample_prediction,
    )
    results = _run_jobs(jobs, settings, workers=workers, cache_dir=Path(out) / ".cache" if out else None,
                        progress=progress)
    return _assemble(results, settings, jobs, unpaired)


def _run_jobs(jobs: list[_Job], settings: EvaluationSettings, *, workers: int, cache_dir: Path | None,
              progress: bool) -> list[dict[str, Any]]:
    settings_json = json.dumps(settings.to_json(), sort_keys=True, default=str)
    results: dict[str, dict[str, Any]] = {}
    todo: list[tuple[_Job, str]] = []
    for job in jobs:
        key = _job_key(job, settings_json)
        cached = _load_cached(cache_dir, job.case_id, key) if cache_dir else None
        if cached is not None:
            results[job.case_id] = cached
        else:
            todo.append((job, key))
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="evaluating", unit="case", leave=False)

    def finish(job: _Job, key: str, result: dict[str, Any]) -> None:
        results[job.case_id] = result
        if cache_dir is not None and result["status"] != "error":
            _store_cached(cache_dir, job.case_id, key, result)
        if bar is not None:
            bar.update(1)

    if workers == 1 or len(todo) <= 1:
        for job, key in todo:
            finish(job, key, _run_job(job, settings))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(_run_job, job, settings): (job, key) for job, key in todo}
            for future in as_completed(futures):
                job, key = futures[future]
                finish(job, key, future.result())
    if bar is not None:
        bar.close()
    return [results[job.case_id] for job in jobs]


def _cache_file(cache_dir: Path, case_id: str) -> Path:
    safe = hashlib.sha1(case_id.encode()).hexdigest()[:16]
    return cache_dir / f"{safe}.json"


def _load_cached(cache_dir: Path, case_id: str, key: str) -> dict[str, Any] | None:
    path = _cache_file(cache_dir, case_id)
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stored["result"] if stored.get("key") == key else None


def _store_cached(cache_dir: Path, case_id: str, key: str, result: dict[str, Any]) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(_cache_file(cache_dir, case_id)) as temporary:
        temporary.write_text(json.dumps({"key": key, "result": result}, default=_json_default), encoding="utf-8")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _assemble(results: list[dict[str, Any]], settings: EvaluationSettings, jobs: list[_Job],
              unpaired: list[str]) -> Evaluation:
    rows = [row for r in results for row in r["rows"]]
    per_case = pd.DataFrame(rows, columns=PER_CASE_COLUMNS + _EXTRA_COLUMNS)
    num_classes = len(settings.labels.ids)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    case_rows = []
    for result in results:
        if result["confusion"] is not None:
            confusion += np.asarray(result["confusion"], dtype=np.int64)
        case_rows.append({
            "case_id": result["case_id"], "status": result["status"], "reference": result["reference"],
            "prediction": result["prediction"], "image": result.get("image"),
            "miou": _case_miou(result["rows"], settings), "message": result["message"],
        })
    for case_id in unpaired:
        case_rows.append({"case_id": case_id, "status": "no_reference", "reference": None, "prediction": None,
                          "image": None, "miou": np.nan, "message": "prediction without a reference"})
    return Evaluation(
        per_case=per_case,
        cases=pd.DataFrame(case_rows, columns=["case_id", "status", "reference", "prediction", "image", "miou", "message"]),
        lesions=pd.DataFrame([l for r in results for l in r["lesions"]]),
        lesion_summary=pd.DataFrame([l for r in results for l in r["lesion_summary"]]),
        per_rater=pd.DataFrame([l for r in results for l in r["per_rater"]]),
        inter_rater=pd.DataFrame([l for r in results for l in r["inter_rater"]]),
        confusion=confusion,
        settings=settings,
    )


def _case_miou(rows: list[dict[str, Any]], settings: EvaluationSettings) -> float:
    """Mean IoU over the single-label structures of a case that are present in either mask."""
    regions = set(settings.labels.regions)
    values = [r["iou"] for r in rows if r["structure"] not in regions and r["status"] in ("ok", "ref_empty", "pred_empty")]
    return float(np.mean(values)) if values else float("nan")
