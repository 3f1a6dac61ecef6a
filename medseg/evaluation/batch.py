"""Evaluation engine: references + predictions -> tidy tables (case x structure).

One pair is scored by :func:`medseg.evaluation.case.evaluate_pair`.

A batch is scored by :func:`evaluate`: cases are paired by id (file name without extension, or the
manifest's case id), a missing prediction becomes rows with status ``missing_prediction``, a case
that cannot be scored (corrupt file, geometry mismatch, label outside the map) becomes rows with
status ``error`` and its message, and the rest go on. Only *user* errors (a
:class:`~medseg.errors.MedsegUserError`: corrupt file, geometry mismatch, label outside the map)
become ``error`` rows; any other exception (a ``ValueError`` too) is a bug in medseg and
propagates. The ``error`` rows of a case whose reference could be read carry its ``ref_ml`` and
``image_diagonal_mm`` (the worst-case distance of :func:`~medseg.evaluation.summary.summarize`);
with an unreadable reference both stay NaN. Invalid options (``connectivity``, ``match``,
``workers``, NSD tolerances, thing names) are refused with a :class:`~medseg.errors.MedsegUserError`
naming the option before any case is read. With ``out`` set, per-case results are cached under
``out/.cache`` (:mod:`medseg.evaluation.cache`), so a rerun recomputes only what changed.

With ``scheduler`` (a running ``dask scheduler``) or ``dask_local`` (a local cluster of N processes) the
cases are scored on a Dask cluster instead (:mod:`medseg.evaluation.dask_runner`): the workers read the files
themselves and send back rows, the driver caches each case as it arrives, results are the same.

Workers are started by a forkserver (``spawn`` where there is none), never ``fork``: forking a process that holds torch
or OpenMP threads can deadlock, notably in notebooks. The metric definitions are in DESIGN.md section 6 and in the
docstrings of :mod:`medseg.metrics`.

Example:
    >>> ev = evaluate("labelsTr/", "predictions/", labels=manifest.labels, workers=2)  # doctest: +SKIP
    >>> ev.per_case.groupby("structure").dice.mean()                                    # doctest: +SKIP
"""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import numpy as np

from medseg.core.labels import LabelSet
from medseg.core.volume import Volume
from medseg.data.manifest import Manifest, remap_labels
from medseg.errors import MedsegUserError
from medseg.evaluation.cache import case_key, load_cached, store_cached
from medseg.evaluation.case import (
    EvaluationSettings,
    check_options,
    check_tolerance,
    empty_rows,
    evaluate_pair,
    read_instance_table,
)
from medseg.evaluation.dask_runner import check_dask_options, dask_client, require_distributed, run_cases
from medseg.evaluation.field_of_view import outside_to_zero, read_field_of_view, restrict_to_field_of_view
from medseg.evaluation.pairing import CaseJob, case_jobs, resolve_labels
from medseg.evaluation.raters import inter_rater_rows, per_rater_rows
from medseg.evaluation.result import Evaluation, assemble
from medseg.io.volumes import check_same_grid, read_volume

__all__ = ["Evaluation", "evaluate"]

#: label arrays a serial run keeps in memory for the report's overlays (the most recent cases)
KEPT_LABEL_BYTES = 256 * 2**20


def _read_label(path: str, value_map: Mapping[int, int] | None = None) -> Volume:
    return remap_labels(read_volume(path, kind="label"), value_map)


def _keep_arrays(kept: dict[str, np.ndarray], arrays: Mapping[str, np.ndarray]) -> None:
    """Add ``arrays`` to ``kept`` and drop the oldest entries beyond :data:`KEPT_LABEL_BYTES`."""
    kept.update(arrays)
    while kept and sum(a.nbytes for a in kept.values()) > KEPT_LABEL_BYTES:
        del kept[next(iter(kept))]


def _run_job(job: CaseJob, settings: EvaluationSettings, kept: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Score one case (a top-level function: workers unpickle it by name).

    ``kept``: in a serial run, the label arrays read are added to it (see :attr:`Evaluation.label_arrays`).

    A :class:`~medseg.errors.MedsegUserError` becomes ``error`` rows (with the reference's
    diagonal when the reference was read); any other exception is a bug and propagates.
    """
    result: dict[str, Any] = {
        "case_id": job.case_id,
        "reference": job.reference,
        "prediction": job.prediction,
        "image": job.image,
        "field_of_view": job.field_of_view,
        "status": "ok",
        "message": "",
        "rows": [],
        "lesions": [],
        "lesion_summary": [],
        "confusion": None,
        "per_rater": [],
        "inter_rater": [],
        "detections": [],
    }
    value_maps = {name: dict(pairs) for name, pairs in job.value_maps}
    reference: Volume | None = None
    # the prediction is decoded on a second thread while this one reads the reference: zlib
    # releases the GIL, so a pair of .nii.gz files takes about the time of one
    reader = ThreadPoolExecutor(max_workers=1) if job.prediction is not None else None
    pending = reader.submit(_read_label, job.prediction) if reader is not None else None
    try:
        reference = _read_label(job.reference, value_maps.get("rater1"))  # type: ignore[arg-type]
        inside = None
        if job.field_of_view is not None:
            inside = read_field_of_view(job.field_of_view, reference, tolerance_mm=settings.tolerance_mm)
            reference = outside_to_zero(reference, inside)
        raters = [("rater1", reference)] + [
            (name, _read_label(path, value_maps.get(name))) for name, path in job.raters
        ]
        if inside is not None:  # the other raters too, on the reference's grid
            grid = {"resample": False, "tolerance_mm": settings.tolerance_mm}
            raters[1:] = [(name, restrict_to_field_of_view(r, reference, inside, **grid)) for name, r in raters[1:]]
        if len(raters) > 1:
            result["inter_rater"] = inter_rater_rows(job.case_id, raters, settings)
        if job.prediction is None:
            result["status"] = "missing_prediction"
            result["rows"] = empty_rows(job.case_id, settings, "missing_prediction", reference=reference)
            return result
        prediction = pending.result()  # type: ignore[union-attr]
        if inside is not None:
            prediction = restrict_to_field_of_view(
                prediction,
                reference,
                inside,
                resample=settings.resample_prediction,
                tolerance_mm=settings.tolerance_mm,
            )
        if kept is not None and not value_maps.get("rater1"):
            _keep_arrays(kept, {job.reference: reference.array[0], job.prediction: prediction.array[0]})
        probabilities = read_volume(job.probabilities) if job.probabilities else None
        if probabilities is not None:
            check_same_grid(reference, probabilities, tolerance_mm=settings.tolerance_mm)
            probabilities = outside_to_zero(probabilities, inside) if inside is not None else probabilities
        instances, instance_scores = None, None
        if job.instances is not None:
            if job.instance_scores is None:
                raise MedsegUserError(
                    f"{job.instances}: no score table {Path(job.instances).name.split('.')[0]}.csv beside it"
                )
            instances = read_volume(job.instances, kind="label")
            check_same_grid(reference, instances, tolerance_mm=settings.tolerance_mm)
            instances = outside_to_zero(instances, inside) if inside is not None else instances
            instance_scores = read_instance_table(job.instance_scores)
        pair = evaluate_pair(
            reference,
            prediction,
            settings=settings,
            case_id=job.case_id,
            probabilities=probabilities,
            instances=instances,
            instance_scores=instance_scores,
        )
        result["rows"], result["lesions"], result["lesion_summary"] = pair.rows, pair.lesions, pair.lesion_summary
        result["confusion"] = pair.confusion.tolist() if pair.confusion is not None else None
        result["detections"] = pair.detections
        if len(raters) > 1:
            result["per_rater"] = per_rater_rows(job.case_id, raters, prediction, settings)
    except MedsegUserError as error:  # bad input of this case: record it, go on (anything else is a bug)
        result["status"] = "error"
        result["message"] = str(error)
        result["rows"] = empty_rows(job.case_id, settings, "error", str(error), reference=reference)
        result["lesions"], result["lesion_summary"], result["confusion"] = [], [], None
        result["per_rater"], result["detections"] = [], []
    finally:
        if reader is not None:
            reader.shutdown(wait=True)  # a failed reference leaves no thread reading behind
    return result


def evaluate(
    reference: str | os.PathLike[str] | Manifest,
    prediction: str | os.PathLike[str],
    *,
    labels: LabelSet | Manifest | str | os.PathLike[str] | None = None,
    data_root: str | os.PathLike[str] | None = None,
    probabilities: str | os.PathLike[str] | None = None,
    scores: str | os.PathLike[str] | None = None,
    things: Iterable[str] | None = None,
    nsd_tolerance_mm: float | Mapping[str, float] | None = None,
    connectivity: int | None = None,
    match: Literal["iou", "overlap"] = "iou",
    resample_prediction: bool = False,
    subset: str | None = None,
    workers: int = 1,
    out: str | os.PathLike[str] | None = None,
    progress: bool = False,
    scheduler: str | None = None,
    dask_local: int | None = None,
    dask_threads: int = 1,
    field_of_view: bool = True,
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
        scores: folder of a detection model's instance maps and score tables (``OUT/instances``
            of ``medseg predict`` with a ``maskrcnn`` model): the thing structures'
            predicted lesions are those instances, each with its own score (AP50/AP75).
        things: structures scored as instances; defaults to the manifest's ``things``.
        nsd_tolerance_mm: one tolerance (mm, >= 0), or per structure (``"*"``: the others); defaults to
            the manifest's (else 1 mm).
        connectivity: lesion connectivity: None (full, the default), 1 (faces), 2 or 3 (<= the image's
            dimension).
        match: lesion matching, ``"iou"`` (IoU > 0.5) or ``"overlap"`` (any overlap).
        resample_prediction: resample predictions onto the reference grid (nearest neighbour)
            instead of reporting a geometry mismatch.
        subset: only cases of this manifest list (e.g. ``"test_labelled"``).
        workers: processes scoring cases in parallel (forkserver or spawn, never fork; >= 1).
        out: when given, cache per-case results in ``out/.cache`` (a rerun recomputes only changed
            cases). Writing the tables is :func:`medseg.evaluation.report.write_outputs`.
        progress: show a progress bar on stderr (with Dask: the cases done per worker).
        scheduler: score the cases on the Dask cluster of this running scheduler (``tcp://host:8786``;
            the paths must be valid on its workers); see :mod:`medseg.evaluation.dask_runner`.
        dask_local: score them on a local Dask cluster of this many worker processes instead.
        dask_threads: threads of each local Dask worker.
        field_of_view: score a manifest case only inside its field-of-view mask (per-case key
            ``fov_mask``, as DRIVE's protocol does; :mod:`medseg.evaluation.field_of_view`).
            False scores every pixel.

    Raises:
        MedsegUserError: an invalid option (named), before any case is read; missing folders or
            no reference files. Per-case user errors become ``error`` rows instead.
    """
    # options first: an invalid one is refused before any folder is listed or case read
    check_options(connectivity=connectivity, match=match, workers=workers)
    if probabilities is not None and scores is not None:
        raise MedsegUserError("give --probabilities or --scores, not both: each scores the predicted lesions")
    if check_dask_options(scheduler=scheduler, local_workers=dask_local, threads_per_worker=dask_threads):
        require_distributed()
    tolerances: dict[str, float] | None = None
    if isinstance(nsd_tolerance_mm, Mapping):
        tolerances = {str(k): check_tolerance(f"nsd_tolerance_mm[{k!r}]", v) for k, v in nsd_tolerance_mm.items()}
    elif nsd_tolerance_mm is not None:
        tolerances = {"*": check_tolerance("nsd_tolerance_mm", nsd_tolerance_mm)}
    jobs, manifest, unpaired = case_jobs(
        reference,
        prediction,
        data_root=data_root,
        probabilities=probabilities,
        subset=subset,
        scores=scores,
        field_of_view=field_of_view,
    )
    label_set, label_manifest = resolve_labels(labels, manifest, Path(data_root) if data_root else None)
    source = label_manifest or manifest
    if tolerances is None:
        tolerances = dict(source.nsd_tolerance_mm) if source else {}
    if isinstance(things, str):
        things = [things]
    thing_names = tuple(things) if things is not None else (tuple(source.things) if source else ())
    settings = EvaluationSettings(  # refuses unknown things / tolerance names, still before any case is read
        labels=label_set,
        things=thing_names,
        nsd_tolerance_mm=tolerances,
        connectivity=connectivity,
        match=match,
        resample_prediction=resample_prediction,
    )
    dask = {"scheduler": scheduler, "local_workers": dask_local, "threads_per_worker": dask_threads}
    per_worker: dict[str, int] = {}
    kept: dict[str, np.ndarray] = {}
    results = _run_jobs(
        jobs,
        settings,
        workers=workers,
        cache_dir=Path(out) / ".cache" if out else None,
        progress=progress,
        dask=dask if scheduler is not None or dask_local is not None else None,
        per_worker=per_worker,
        kept=kept,
    )
    evaluation = assemble(results, settings, unpaired)
    evaluation.cases_per_worker = per_worker
    evaluation.label_arrays = kept
    return evaluation


def _worker_context() -> multiprocessing.context.BaseContext:
    """Worker processes that never inherit this process's state: forkserver (POSIX), else spawn.

    Never ``fork``: a forked copy of a process holding torch or OpenMP threads can deadlock (notably
    in notebooks). The forkserver is a fresh process that imports this module once and forks the
    workers from itself, so they start warm (208 hippocampus cases with 2 workers: 3.0 s against
    3.3-4.0 s with spawn, whose workers each import numpy, pandas and scipy again).
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["medseg.evaluation.batch"])  # takes effect when the server starts
        return context
    return multiprocessing.get_context("spawn")


def _run_jobs(
    jobs: list[CaseJob],
    settings: EvaluationSettings,
    *,
    workers: int,
    cache_dir: Path | None,
    progress: bool,
    dask: dict[str, Any] | None = None,
    per_worker: dict[str, int] | None = None,
    kept: dict[str, np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    settings_json = json.dumps(settings.to_json(), sort_keys=True, default=str)
    results: dict[str, dict[str, Any]] = {}
    todo: list[tuple[CaseJob, str]] = []
    for job in jobs:
        key = case_key(job, settings_json)
        cached = load_cached(cache_dir, job.case_id, key) if cache_dir else None
        if cached is not None:
            results[job.case_id] = cached
        else:
            todo.append((job, key))
    bar = None
    if progress and todo and dask is None:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="evaluating", unit="case", leave=False)

    def finish(job: CaseJob, key: str, result: dict[str, Any]) -> None:
        results[job.case_id] = result
        if cache_dir is not None and result["status"] != "error":
            store_cached(cache_dir, job.case_id, key, result)
        if bar is not None:
            bar.update(1)

    if dask is not None and todo:  # the cluster's workers read the files and send back rows
        with dask_client(**dask) as client:
            counts = run_cases(
                client,
                _run_job,
                [(job, settings) for job, _ in todo],
                on_result=lambda i, result: finish(*todo[i], result),
                progress=progress,
                description="evaluating",
            )
        if per_worker is not None:
            per_worker.update(counts)
    elif workers == 1 or len(todo) <= 1:
        for job, key in todo:
            finish(job, key, _run_job(job, settings, kept))
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=_worker_context()) as pool:
            futures = {pool.submit(_run_job, job, settings): (job, key) for job, key in todo}
            for future in as_completed(futures):
                job, key = futures[future]
                finish(job, key, future.result())
    if bar is not None:
        bar.close()
    return [results[job.case_id] for job in jobs]
