"""Pairing references with predictions: which files belong to which case, and which label map applies.

References come from a folder of label files or a manifest (whose cases may name further raters);
predictions from a folder of files named ``<case_id>.<ext>`` (``<case_id>.dcm``: a DICOM-SEG). A case
is identified by its file name without the format suffix (or the manifest's case id). A reference without a prediction
becomes a ``missing_prediction`` case; a prediction without a reference is reported as unpaired.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from medseg.core.labels import LabelSet
from medseg.data.manifest import Manifest, load_manifest, manifest_from_dict
from medseg.errors import ManifestError, MedsegUserError
from medseg.evaluation.field_of_view import FOV_KEY
from medseg.io.files import read_json
from medseg.io.volumes import DICOM_SEG_SUFFIX, VOLUME_SUFFIXES, strip_volume_suffix, volume_suffix

__all__ = ["CaseJob", "case_jobs", "find_volumes", "resolve_labels"]


@dataclass(frozen=True)
class CaseJob:
    case_id: str
    reference: str | None
    prediction: str | None
    probabilities: str | None = None
    image: str | None = None
    instances: str | None = None  # a detection model's instance map (``medseg predict``, ``instances/<case>.csv``)
    instance_scores: str | None = None  # its table (instance_id, label, score, ...), a .csv beside it
    raters: tuple[tuple[str, str], ...] = ()  # (rater name, path) beyond the primary reference
    value_maps: tuple[tuple[str, tuple[tuple[int, int], ...]], ...] = ()
    field_of_view: str | None = None  # the case's field-of-view mask: only pixels inside it are scored


def find_volumes(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise MedsegUserError(f"{folder}: not a folder")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if volume_suffix(path) in VOLUME_SUFFIXES or (path.is_file() and path.name.lower().endswith(DICOM_SEG_SUFFIX)):
            case_id = strip_volume_suffix(path)
            if case_id in found:
                raise MedsegUserError(f"{folder}: two files for case {case_id!r}: {found[case_id].name}, {path.name}")
            found[case_id] = path
    return found


def resolve_labels(
    labels: LabelSet | Manifest | str | os.PathLike[str] | None, manifest: Manifest | None, data_root: Path | None
) -> tuple[LabelSet, Manifest | None]:
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
    content = read_json(path, what="manifest", error=ManifestError)
    if not isinstance(content, dict):
        raise ManifestError(f"{path}: the top level must be a JSON object")
    # Only the label-related keys matter here: the cases may not exist under any data root.
    content = {k: v for k, v in content.items() if k in ("name", "labels", "regions", "things", "nsd_tolerance_mm")}
    content["training"] = [{"image": "unused.nii.gz"}]
    return manifest_from_dict(content, data_root=path.parent, source=path)


def case_jobs(
    reference: str | os.PathLike[str] | Manifest,
    prediction: str | os.PathLike[str],
    *,
    data_root: str | os.PathLike[str] | None,
    probabilities: str | os.PathLike[str] | None,
    subset: str | None,
    scores: str | os.PathLike[str] | None = None,
    field_of_view: bool = True,
) -> tuple[list[CaseJob], Manifest | None, list[str]]:
    """The cases to score, the reference manifest (None for a folder) and the unpaired predictions.

    ``field_of_view``: score a manifest case only inside its ``fov_mask`` when it has one
    (:mod:`medseg.evaluation.field_of_view`).
    """
    prediction_files = find_volumes(Path(prediction))
    probability_files = find_volumes(Path(probabilities)) if probabilities is not None else {}
    instance_files = find_volumes(Path(scores)) if scores is not None else {}

    def instances_of(case_id: str) -> dict[str, str | None]:
        path = instance_files.get(case_id)
        table = Path(scores) / f"{case_id}.csv" if scores is not None else None
        return {
            "instances": str(path) if path is not None else None,
            "instance_scores": str(table) if table is not None and table.is_file() else None,
        }

    manifest: Manifest | None = None
    if isinstance(reference, Manifest):
        manifest = reference
    elif Path(reference).is_file() and str(reference).endswith(".json"):
        manifest = load_manifest(reference, data_root=data_root)
    jobs: list[CaseJob] = []
    if manifest is not None:
        for case in manifest.labelled_cases:
            if subset is not None and case.subset != subset:
                continue
            raters = tuple(
                (manifest.raters[key], str(case.extras[key])) for key in manifest.label_keys()[1:] if key in case.extras
            )
            value_maps = tuple(
                (name, tuple(sorted(manifest.label_value_map.get(key, {}).items())))
                for key, name in manifest.raters.items()
            )
            jobs.append(
                CaseJob(
                    case_id=case.case_id,
                    reference=str(case.label),
                    prediction=str(prediction_files[case.case_id]) if case.case_id in prediction_files else None,
                    probabilities=str(probability_files[case.case_id]) if case.case_id in probability_files else None,
                    image=str(case.images[0]),
                    raters=raters,
                    value_maps=value_maps,
                    field_of_view=str(case.extras[FOV_KEY]) if field_of_view and FOV_KEY in case.extras else None,
                    **instances_of(case.case_id),
                )
            )
    else:
        for case_id, path in find_volumes(Path(reference)).items():
            jobs.append(
                CaseJob(
                    case_id=case_id,
                    reference=str(path),
                    prediction=str(prediction_files[case_id]) if case_id in prediction_files else None,
                    probabilities=str(probability_files[case_id]) if case_id in probability_files else None,
                    **instances_of(case_id),
                )
            )
    if not jobs:
        raise MedsegUserError(f"{reference}: no reference label files found")
    known = {job.case_id for job in jobs}
    unpaired = sorted(set(prediction_files) - known)
    return jobs, manifest, unpaired
