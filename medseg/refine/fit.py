"""``medseg refine fit``: measure SAM refinement on a fold's validation cases, keep it only where it helps.

The U-Net of the run predicts each validation case of the fold (exactly as ``medseg predict``
would: same checkpoint, postprocessing and TTA), every structure is refined under every setting
of the grid (:func:`medseg.refine.refine.default_grid`; SAM is asked once per slice embedding and
prompt kind, the settings differ in fusion and candidate choice), each result is scored with
medseg's own evaluation (Dice, HD95, NSD of the structure, :func:`evaluate_pair`), and the gate
(:mod:`medseg.refine.gate`) accepts a setting per structure or rejects the structure.

``refinement.json`` (atomic, in the run folder) records, bound to the SHA-256 of the U-Net
checkpoint(s) and of the SAM checkpoint: the criteria, the change limit, the validation cases and,
per structure, ``accepted`` (setting, measured deltas with bootstrap CIs) or ``rejected`` (why).
``medseg predict --sam`` (:mod:`medseg.refine.apply`) refuses a file bound to other weights.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from medseg import __version__
from medseg.core.labels import LabelSet, Structure
from medseg.core.volume import Volume
from medseg.errors import MedsegUserError
from medseg.evaluation.case import EvaluationSettings, evaluate_pair
from medseg.io.files import read_json, sha256_file, write_json
from medseg.refine.gate import CaseScore, GateCriteria, decide, paired_deltas
from medseg.refine.protocol import PromptBackend
from medseg.refine.refine import (
    CostMeter,
    RefineSetting,
    SliceEncoder,
    compose,
    default_grid,
    propose,
    slice_axis,
    structure_by_name,
)

__all__ = [
    "REFINEMENT_FILE",
    "REFINEMENT_FORMAT",
    "ValidationCase",
    "sam_fingerprint",
    "score_structure",
    "fit_cases",
    "fit_refinement",
]

REFINEMENT_FILE = "refinement.json"
REFINEMENT_FORMAT = "medseg-refinement"
DEFAULT_MAX_CHANGE_FRACTION = 0.5


@dataclass(frozen=True)
class ValidationCase:
    """One validation case: its image, its reference and the U-Net's label map, all on one grid."""

    case_id: str
    image: Volume
    reference: Volume
    unet: Volume


def sam_fingerprint(path: str | os.PathLike[str]) -> dict[str, str]:
    """``{"path", "sha256"}`` of a SAM checkpoint: a file's SHA-256, or for a folder the SHA-256 of
    its files' relative paths and SHA-256s (sorted; hidden files ignored).

    Raises:
        MedsegUserError: the path does not exist.
    """
    path = Path(path)
    if path.is_file():
        return {"path": str(path), "sha256": sha256_file(path)}
    if not path.is_dir():
        raise MedsegUserError(f"{path}: SAM checkpoint not found")
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.parts))
    for file in files:
        digest.update(f"{file.relative_to(path).as_posix()}\0{sha256_file(file)}\n".encode())
    return {"path": str(path), "sha256": digest.hexdigest()}


def score_structure(
    reference: Volume, prediction: np.ndarray, structure: Structure, *, case_id: str, nsd_tolerance_mm: float
) -> CaseScore:
    """Dice, HD95 and NSD of one structure, by :func:`evaluate_pair` on the two binary masks."""
    labels = LabelSet({0: "background", 1: structure.name})
    settings = EvaluationSettings(labels=labels, nsd_tolerance_mm={"*": nsd_tolerance_mm}, include_regions=False)
    ref_mask = np.isin(reference.array[0], structure.label_ids).astype(np.uint8)
    pred_mask = np.isin(prediction, structure.label_ids).astype(np.uint8)
    meta = {"path": reference.meta.get("path", case_id)}
    result = evaluate_pair(
        Volume(ref_mask[None], reference.affine, kind="label", meta=meta),
        Volume(pred_mask[None], reference.affine, kind="label", meta=meta),
        settings=settings,
        case_id=case_id,
    )
    return CaseScore.from_row(result.rows[0])


def fit_cases(
    cases: Sequence[ValidationCase],
    *,
    labels: LabelSet,
    backend: PromptBackend,
    structures: Sequence[str] | None = None,
    grid: Sequence[RefineSetting] | None = None,
    criteria: GateCriteria = GateCriteria(),
    max_change_fraction: float = DEFAULT_MAX_CHANGE_FRACTION,
    nsd_tolerance_mm: Mapping[str, float] | float = 1.0,
    rgb_channels: Sequence[int] | None = None,
    meter: CostMeter | None = None,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """The gate's decision per structure, from already predicted validation cases.

    Args:
        cases: the validation cases with the U-Net's predictions.
        labels: the label map.
        backend: the SAM backend.
        structures: structure names to refine (default: every label and region).
        grid: settings to try (default: :func:`default_grid`).
        criteria: the gate's criteria.
        max_change_fraction: a refinement changing more of a structure is refused (as at predict).
        nsd_tolerance_mm: per structure name (``"*"``: the others), or one value for all.
        rgb_channels: image channels feeding SAM's R, G, B.
        meter: where encoder and decoder time are added.
        progress: progress bar.

    Returns:
        structure name -> decision (see :func:`medseg.refine.gate.decide`), with the per-case
        deltas of the chosen (or best rejected) setting under ``"cases"``.
    """
    from tqdm.auto import tqdm

    if not cases:
        raise MedsegUserError("refinement needs at least one validation case")
    chosen = [structure_by_name(labels, n) for n in structures] if structures else labels.structures()
    grid = list(grid) if grid else default_grid()
    names = [s.name for s in grid]
    if len(set(names)) != len(names):
        raise ValueError("the settings of the grid must differ")
    tolerance = nsd_tolerance_mm if isinstance(nsd_tolerance_mm, Mapping) else {"*": float(nsd_tolerance_mm)}
    before: dict[str, list[CaseScore]] = {s.name: [] for s in chosen}
    after: dict[str, dict[str, list[CaseScore]]] = {s.name: {n: [] for n in names} for s in chosen}
    notes: dict[str, dict[str, dict[str, int]]] = {s.name: {} for s in chosen}
    meter = meter if meter is not None else CostMeter()
    for case in tqdm(cases, desc="refine fit", unit="case", disable=not progress):
        if case.unet.spatial_ndim != 3:
            raise MedsegUserError(f"{case.case_id}: refinement needs 3D images, this one is {case.unet.spatial_ndim}D")
        encoder = SliceEncoder(
            case.image, backend, axis=slice_axis(case.image.spacing_mm), rgb_channels=rgb_channels, meter=meter
        )
        unet_array = case.unet.array[0]
        for structure in chosen:
            nsd = float(tolerance.get(structure.name, tolerance.get("*", 1.0)))
            before[structure.name].append(
                score_structure(case.reference, unet_array, structure, case_id=case.case_id, nsd_tolerance_mm=nsd)
            )
            proposals = propose(
                encoder,
                np.isin(unet_array, structure.label_ids),
                settings=grid,
                max_change_fraction=max_change_fraction,
            )
            for name, proposal in proposals.items():
                refined = unet_array if proposal.mask is None else compose(unet_array, structure, proposal.mask)
                after[structure.name][name].append(
                    score_structure(case.reference, refined, structure, case_id=case.case_id, nsd_tolerance_mm=nsd)
                )
                if proposal.reason:
                    key = proposal.reason.split(" (")[0]
                    counter = notes[structure.name].setdefault(name, {})
                    counter[key] = counter.get(key, 0) + 1
    parameters = {s.name: s.to_json() for s in grid}
    decisions: dict[str, dict[str, Any]] = {}
    for structure in chosen:
        results = {n: paired_deltas(before[structure.name], after[structure.name][n]) for n in names}
        decision = decide(results, criteria, settings=parameters)
        shown = decision.get("setting") or decision.get("best", {}).get("setting")
        if shown:
            deltas = results[shown]
            decision["cases"] = [
                {
                    "case_id": score.case_id,
                    "dice_before": _finite(deltas["dice_before"][i]),
                    "dice_after": _finite(deltas["dice_after"][i]),
                    "hd95_mm_before": _finite(deltas["hd95_mm_before"][i]),
                    "hd95_mm_after": _finite(deltas["hd95_mm_after"][i]),
                    "nsd_before": _finite(deltas["nsd_before"][i]),
                    "nsd_after": _finite(deltas["nsd_after"][i]),
                }
                for i, score in enumerate(before[structure.name])
            ]
            decision["fallbacks"] = notes[structure.name].get(shown, {})
        decisions[structure.name] = decision
    return decisions


def _finite(value: float) -> float | None:
    return round(float(value), 6) if np.isfinite(value) else None


def _run_folder(model: str | os.PathLike[str]) -> Path:
    path = Path(model)
    return path.parent if path.is_file() else path


def fit_refinement(
    model: str | os.PathLike[str],
    sam: str | os.PathLike[str],
    *,
    manifest: str | os.PathLike[str],
    data_root: str | os.PathLike[str] | None = None,
    fold: int = 0,
    backend: PromptBackend | None = None,
    which: str = "last",
    device: str = "auto",
    tta: bool = True,
    structures: Sequence[str] | None = None,
    grid: Sequence[RefineSetting] | None = None,
    criteria: GateCriteria = GateCriteria(),
    max_change_fraction: float = DEFAULT_MAX_CHANGE_FRACTION,
    rgb_channels: Sequence[int] | None = None,
    max_cases: int | None = None,
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Predict the fold's validation cases, fit the gate per structure, write ``refinement.json``.

    Args:
        model: the run folder (or its checkpoint) of the fold's U-Net.
        sam: the SAM checkpoint (its hash binds the result).
        manifest: the manifest; its fold ``fold`` gives the validation cases.
        data_root: the manifest's data root.
        fold: the fold the run was trained on (its validation cases were not trained on).
        backend: the SAM backend (default: loaded from ``sam`` by :func:`medseg.refine.loading.load_sam`).
        which: ``"last"`` or ``"best"`` checkpoint (as ``medseg predict --checkpoint``).
        device: where the U-Net and SAM run.
        tta: mirroring TTA of the U-Net (as ``medseg predict --tta``).
        structures: structures to refine (default: every label and region).
        grid: refinement settings to try (default: :func:`default_grid`).
        criteria: the gate's criteria.
        max_change_fraction: a refinement changing more of a structure falls back to the U-Net.
        rgb_channels: image channels feeding SAM's R, G, B.
        max_cases: use only the first N validation cases (for quick trials; recorded).
        out: where to write (default: ``<run>/refinement.json``).
        progress: progress bar.

    Returns:
        The content written.

    Raises:
        MedsegUserError: the run was trained on another fold, the fold has no cases, a structure is unknown.
    """
    from medseg.data.manifest import load_manifest
    from medseg.inference.segmenter import Segmenter
    from medseg.refine.loading import load_sam

    start = time.monotonic()
    run = _run_folder(model)
    resolved_path = run / "resolved_config.json"
    if resolved_path.is_file():
        recorded_fold = read_json(resolved_path, what="run configuration").get("fold")
        if recorded_fold == "all":
            raise MedsegUserError(
                f"{run}: the run was trained on every case (fold 'all'); fit on a fold run, "
                "whose validation cases it never saw"
            )
        if isinstance(recorded_fold, int) and recorded_fold != fold:
            raise MedsegUserError(
                f"{run}: the run was trained on fold {recorded_fold}, not fold {fold}; "
                "fit on the fold whose validation cases it never saw"
            )
    loaded = load_manifest(manifest, data_root=data_root)
    _, validation = loaded.fold(fold)
    validation = tuple(c for c in validation if c.label is not None)
    if max_cases is not None:
        validation = validation[:max_cases]
    if not validation:
        raise MedsegUserError(f"{manifest}: fold {fold} has no labelled validation cases")
    for name in structures or ():
        try:
            structure_by_name(loaded.labels, name)
        except ValueError as error:
            raise MedsegUserError(f"--structure: {error}") from None
    segmenter = Segmenter.from_checkpoint(model, which=which, device=device, tta=tta)
    sam_identity = sam_fingerprint(sam)
    if backend is None:
        backend = load_sam(sam, device=device)
    cases = []
    from tqdm.auto import tqdm

    for case in tqdm(validation, desc="U-Net", unit="case", disable=not progress):
        image = loaded.read_image(case)
        cases.append(ValidationCase(case.case_id, image, loaded.read_label(case), segmenter.predict(image)))
    meter = CostMeter()
    grid = list(grid) if grid else default_grid()
    tolerances = {s.name: loaded.nsd_tolerance_for(s.name) for s in loaded.labels.structures()}
    decisions = fit_cases(
        cases,
        labels=segmenter.labels,
        backend=backend,
        structures=structures,
        grid=grid,
        criteria=criteria,
        max_change_fraction=max_change_fraction,
        nsd_tolerance_mm=tolerances,
        rgb_channels=rgb_channels,
        meter=meter,
        progress=progress,
    )
    content = {
        "format": REFINEMENT_FORMAT,
        "format_version": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "medseg": __version__,
        "checkpoints": [{"path": p, "sha256": h} for p, h in segmenter.checkpoints],
        "sam": {**sam_identity, "backend": getattr(backend, "name", type(backend).__name__)},
        "unet": {"which": which, "tta": tta, "postprocessing": segmenter.postprocessing},
        "manifest": str(manifest),
        "fold": fold,
        "validation_cases": [c.case_id for c in cases],
        "criteria": criteria.to_json(),
        "max_change_fraction": max_change_fraction,
        "rgb_channels": list(rgb_channels) if rgb_channels is not None else None,
        "grid": [s.to_json() for s in grid],
        "structures": decisions,
        "cost": {**meter.to_json(), "elapsed_s": round(time.monotonic() - start, 2)},
    }
    target = Path(out) if out is not None else run / REFINEMENT_FILE
    write_json(content, target)
    content["written"] = str(target)
    return content
