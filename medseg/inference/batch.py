"""Batch prediction: a file, a folder or a manifest in, one label file per case out.

:func:`predict_batch` segments every input with a :class:`~medseg.inference.Segmenter` and
writes, into the output folder:

=================================  ==========================================================
file                               content
=================================  ==========================================================
``<name>``                         label map, with the input file's name and format (``.mhd``
                                   becomes ``.mha``, ``.nhdr`` ``.nrrd``, GIF/JPEG/BMP ``.png``,
                                   a DICOM folder ``<folder>.nii.gz``; manifest cases are named
                                   ``<case_id>`` + their image's format); ``output_format``
                                   chooses another: ``<case>.seg.nrrd`` (3D Slicer, names and
                                   colours), ``<case>.dcm`` (DICOM-SEG of a DICOM series input),
                                   ``.nii.gz`` ... (:mod:`medseg.io.label_files`)
``labels.itksnap.txt``             ITK-SNAP label descriptions: names and colours per label value
``statistics/<case>.csv``          volume (ml) and intensities per structure (``statistics``),
                                   and ``statistics.csv`` of every case
``instances/<case>.nii.gz``        instance map of the thing structures (when the model has any)
``panoptic/<case>.nii.gz``         ``label_id * 1000 + instance`` (see :mod:`medseg.postprocess`)
``probabilities/<case>.nii.gz``    float32 softmax, one channel per class (``save_probabilities``)
``medseg_predict.json``            inputs, checkpoint SHA-256s, plans, versions, device, options,
                                   per-case outputs (with their SHA-256), timings and errors
=================================  ==========================================================

The auxiliary maps live in sub-folders so the output folder stays a valid ``--prediction`` folder
for ``medseg evaluate`` (and ``probabilities/`` a valid ``--probabilities`` folder).

**Failure isolation**: a case that fails (unreadable file, wrong channel count, ...) is reported
and recorded with its error; the others go on. **Resume**: every write is atomic and the record
is rewritten after each case, so a rerun skips a case only when its record says it was written
by the same model and options from the same input (size and mtime) and the output file still has
the recorded SHA-256; anything else is predicted again.

**Dask**: with ``scheduler`` or ``dask_local`` the cases are predicted on a Dask cluster
(:mod:`medseg.inference.dask_predict`): each worker loads the model once, reads its cases and writes
their outputs (atomically); only the record entries travel back, and this process, the only writer of
``medseg_predict.json``, records each case as it arrives, so resume works the same.

Example:
    >>> result = predict_batch("runs/hippo/fold_0", "imagesTs/", "predictions/")   # doctest: +SKIP
    >>> result.failed                                                               # doctest: +SKIP
    []
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from medseg import __version__
from medseg.data.manifest import load_manifest
from medseg.errors import MedsegUserError
from medseg.evaluation.dask_runner import check_dask_options, require_distributed
from medseg.inference.case import file_fingerprint, predict_case
from medseg.inference.segmenter import Segmenter
from medseg.io.files import sha256_file, write_json
from medseg.io.label_files import check_output_format, label_file_name
from medseg.io.viewer import ITKSNAP_LABELS_FILE, write_itksnap_labels
from medseg.io.volumes import VOLUME_SUFFIXES, strip_volume_suffix, volume_suffix

__all__ = ["PredictionJob", "BatchResult", "predict_batch", "collect_inputs", "output_name", "RECORD_FILE"]

RECORD_FILE = "medseg_predict.json"
RECORD_FORMAT_VERSION = 1
_CHANNEL_PATTERN = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_OUTPUT_SUFFIX = {".mhd": ".mha", ".nhdr": ".nrrd", ".gif": ".png", ".jpg": ".png", ".jpeg": ".png", ".bmp": ".png"}


@dataclass(frozen=True)
class PredictionJob:
    """One case to predict: its id, its input files (one per channel) and its output file name."""

    case_id: str
    images: tuple[Path, ...]
    output_name: str


@dataclass
class BatchResult:
    """What :func:`predict_batch` did.

    Attributes:
        predicted: case ids predicted in this call.
        skipped: case ids whose complete outputs were reused.
        failed: ``(case_id, message)`` of cases that failed.
        notes: ``(case_id, message)`` of cases predicted with a remark (e.g. no panoptic map).
        record: path of ``medseg_predict.json``.
        elapsed_s: wall time of the call.
        cases_per_worker: cases predicted by each Dask worker (empty without Dask).
    """

    predicted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    record: Path | None = None
    elapsed_s: float = 0.0
    cases_per_worker: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether every case has a prediction."""
        return not self.failed


def output_name(path: str | os.PathLike[str], *, case_id: str | None = None) -> str:
    """Output file name for an input: same name and format (formats medseg cannot write are mapped)."""
    path = Path(path)
    suffix = ".nii.gz" if path.is_dir() else volume_suffix(path)
    if not suffix:
        raise MedsegUserError(f"{path}: unknown image format")
    stem = case_id if case_id is not None else (path.name if path.is_dir() else strip_volume_suffix(path))
    return stem + _OUTPUT_SUFFIX.get(suffix, suffix)


def _volume_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if not p.name.startswith(".") and p.is_file() and volume_suffix(p) in VOLUME_SUFFIXES
    )


def collect_inputs(
    source: str | os.PathLike[str],
    *,
    data_root: str | os.PathLike[str] | None = None,
    num_channels: int = 1,
    subset: str | None = None,
) -> list[PredictionJob]:
    """The cases of a FILE, a DIR or a MANIFEST (``.json``).

    A folder of volume files gives one case per file; with a multi-channel model, files named
    ``<case>_0000``, ``<case>_0001``, ... (nnU-Net's convention) are grouped into one case. A folder
    holding no volume files is read as one DICOM series.

    Args:
        source: the input.
        data_root: data root of a manifest.
        num_channels: channels the model takes.
        subset: only the manifest cases of this list (``"training"``, ``"test"``, ...).

    Raises:
        MedsegUserError: the input does not exist, or holds no cases, or channels are missing.
    """
    source = Path(source)
    if not source.exists():
        raise MedsegUserError(f"{source}: input not found")
    if source.is_file() and source.name.lower().endswith(".json"):
        manifest = load_manifest(source, data_root=data_root)
        cases = [c for c in manifest.cases if subset is None or c.subset == subset]
        if not cases:
            raise MedsegUserError(f"{source}: no cases{f' in list {subset!r}' if subset else ''}")
        return [PredictionJob(c.case_id, tuple(c.images), output_name(c.images[0], case_id=c.case_id)) for c in cases]
    if source.is_file():
        if num_channels != 1:
            raise MedsegUserError(
                f"{source}: the model takes {num_channels} channels; give a folder of "
                "<case>_0000.<ext> ... files or a manifest"
            )
        return [PredictionJob(strip_volume_suffix(source), (source,), output_name(source))]
    files = _volume_files(source)
    if not files:
        return [PredictionJob(source.name, (source,), output_name(source))]  # a DICOM series
    if num_channels == 1:
        return [PredictionJob(strip_volume_suffix(p), (p,), output_name(p)) for p in files]
    groups: dict[str, dict[int, Path]] = {}
    for path in files:
        match = _CHANNEL_PATTERN.match(strip_volume_suffix(path))
        if match is None:
            raise MedsegUserError(
                f"{path}: the model takes {num_channels} channels; name files <case>_0000, <case>_0001, ..."
            )
        groups.setdefault(match["case"], {})[int(match["channel"])] = path
    jobs = []
    for case_id, channels in sorted(groups.items()):
        if sorted(channels) != list(range(num_channels)):
            raise MedsegUserError(
                f"{source}: case {case_id!r} has channels {sorted(channels)}, expected 0..{num_channels - 1}"
            )
        ordered = tuple(channels[c] for c in range(num_channels))
        jobs.append(PredictionJob(case_id, ordered, output_name(ordered[0], case_id=case_id)))
    return jobs


def _versions() -> dict[str, str]:
    import monai
    import numpy
    import torch

    return {
        "medseg": __version__,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def _model_key(description: dict[str, Any], *, instances: bool, watershed: bool, save_probabilities: bool) -> str:
    content = {
        "checkpoints": [c["sha256"] for c in description["checkpoints"]],
        "config": description["config"],
        "tta": description["tta"],
        "overlap": description["overlap"],
        "postprocessing": description["postprocessing"],
        # both change the labels (bfloat16 vs float32: a few voxels), so a rerun with another one predicts again
        "precision": description.get("precision", "float32"),
        "runtime": description.get("runtime", "torch"),
        "instances": instances,
        "watershed": watershed,
        "save_probabilities": save_probabilities,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def _load_record(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}  # an unreadable record only means nothing is reused
    return content if isinstance(content, dict) and content.get("format") == "medseg-predict" else {}


def _write_record(record: dict[str, Any], path: Path) -> None:
    record["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    write_json(record, path)


class _RefinedSegmenter:
    """A Segmenter whose predictions pass through ``refine``; keeps the last case's statuses."""

    def __init__(self, segmenter: Segmenter, refine: Any) -> None:
        self._segmenter = segmenter
        self._refine = refine
        self.statuses: dict[str, str] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._segmenter, name)

    def predict_full(self, volume: Any, **options: Any) -> Any:
        prediction = self._segmenter.predict_full(volume, **options)
        clock = time.monotonic()
        prediction.labels, self.statuses = self._refine(volume, prediction.labels)
        prediction.timings_s["refine_s"] = round(time.monotonic() - clock, 4)
        return prediction


def _complete(entry: dict[str, Any] | None, job: PredictionJob, output: Path, model_key: str) -> bool:
    if not entry or entry.get("status") != "ok" or entry.get("model_key") != model_key:
        return False
    if entry.get("inputs") != [file_fingerprint(p) for p in job.images]:
        return False
    for item in entry.get("outputs", {}).values():
        path = output / item["file"]
        if not path.is_file() or sha256_file(path) != item["sha256"]:
            return False
    return bool(entry.get("outputs"))


def _write_all_statistics(record: dict[str, Any], output: Path) -> None:
    """``statistics.csv``: the per-case statistics tables of every predicted case, with a ``case_id`` column."""
    from medseg.evaluation.statistics import combine_statistics, write_statistics

    files = {
        case_id: output / entry["outputs"]["statistics"]["file"]
        for case_id, entry in record["cases"].items()
        if entry.get("status") == "ok" and "statistics" in entry.get("outputs", {})
    }
    if files:
        write_statistics(combine_statistics(files), output / "statistics.csv")


def predict_batch(
    model: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Any,
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    data_root: str | os.PathLike[str] | None = None,
    subset: str | None = None,
    device: str = "auto",
    tta: bool = True,
    overlap: float = 0.5,
    save_probabilities: bool = False,
    instances: bool = True,
    watershed: bool = False,
    which: str = "last",
    postprocessing: str | os.PathLike[str] | None = "auto",
    output_format: str = "auto",
    statistics: bool = False,
    progress: bool = True,
    scheduler: str | None = None,
    dask_local: int | None = None,
    dask_threads: int = 1,
    refine: Any = None,
    runtime: str = "torch",
    threads: int | None = None,
    precision: str = "auto",
) -> BatchResult:
    """Predict every case of ``input`` into ``output`` (see the module docstring).

    Args:
        model: run folder(s) / checkpoint(s) (see :meth:`Segmenter.from_checkpoint`), or a Segmenter.
        input: a volume file, a folder of them, or a manifest ``.json``.
        output: output folder (created).
        data_root: data root of a manifest input.
        subset: only this list of a manifest (e.g. ``"test"``).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        tta: mirroring test-time augmentation.
        overlap: sliding-window overlap.
        save_probabilities: also write ``probabilities/<case>.nii.gz``.
        instances: write instance and panoptic maps for the model's thing structures (a detection
            model: its own instances, with a score table ``instances/<case>.csv``).
        watershed: split touching instances with a marker watershed.
        which: ``"last"`` (default) or ``"best"`` checkpoint of run folders (``best`` was chosen on
            the run's own validation cases: optimistic there).
        postprocessing: ``"auto"``, a ``postprocessing.json`` path, or None (none applied).
        output_format: label file format, one of :data:`medseg.io.label_files.OUTPUT_FORMATS`
            (``"auto"``: the input's; ``"seg.nrrd"``: 3D Slicer; ``"dicom-seg"``: ``<case>.dcm``
            referencing the input DICOM series). ``labels.itksnap.txt`` (ITK-SNAP label names and
            colours) is written beside the label maps whatever the format.
        statistics: also write ``statistics/<case>.csv`` (volume and intensities per structure,
            :mod:`medseg.evaluation.statistics`) and ``statistics.csv`` of all cases.
        progress: show a progress bar (with Dask: the cases done per worker).
        scheduler: predict on the Dask cluster of this running scheduler (``tcp://host:8786``): each
            worker loads the model once, reads its cases and writes their outputs (shared storage);
            see :mod:`medseg.inference.dask_predict`. ``model`` must then be paths, not a Segmenter.
        dask_local: predict on a local Dask cluster of this many worker processes instead.
        dask_threads: torch threads of each Dask worker (each predicts one case at a time).
        refine: a step applied to every case's label map after the network, called as
            ``refine(image, labels) -> (labels, {structure: "applied" | "skipped: <reason>"})``;
            its ``key`` (str) joins the model key, its statuses go to the case's record entry as
            ``refinement`` (e.g. :class:`medseg.refine.apply.SamRefiner`). Not with Dask.
        runtime: ``"torch"``, ``"onnx"`` or ``"auto"`` (see :meth:`Segmenter.from_checkpoint`).
        threads: onnxruntime intra-op threads (None: one per core; Dask workers use ``dask_threads``).
        precision: the network's precision, ``auto``, ``mixed`` or ``float32`` (see :meth:`Segmenter.from_checkpoint`).

    Returns:
        A :class:`BatchResult`; failed cases are listed there and in the record, not raised.

    Raises:
        MedsegUserError: no inputs, or a model that cannot be loaded (:class:`CheckpointError`).
    """
    from tqdm.auto import tqdm

    start = time.monotonic()
    check_output_format(output_format)
    use_dask = check_dask_options(scheduler=scheduler, local_workers=dask_local, threads_per_worker=dask_threads)
    if use_dask:
        require_distributed()
        if isinstance(model, Segmenter):
            raise MedsegUserError("predicting on Dask needs the model's paths (the workers load it), not a Segmenter")
    if isinstance(model, Segmenter):
        segmenter = model
    else:
        segmenter = Segmenter.from_checkpoint(
            model,
            which=which,
            device=device,
            tta=tta,
            overlap=overlap,
            postprocessing=postprocessing,
            runtime=runtime,
            threads=threads,
            precision=precision,
        )
    # files per case: the dataset's channels (an RGB photograph is one file holding the 3 channels it normalises)
    file_channels = len(segmenter.plans["dataset"].get("channels") or segmenter.plans["normalization"])
    jobs = collect_inputs(input, data_root=data_root, num_channels=file_channels, subset=subset)
    not_series = [job.images[0] for job in jobs if not job.images[0].is_dir()]
    if output_format == "dicom-seg" and not_series:
        raise MedsegUserError(
            f"{not_series[0]}: --output-format dicom-seg needs DICOM series folders as input, not files"
        )
    if output_format != "auto":
        jobs = [
            replace(job, output_name=label_file_name(strip_volume_suffix(job.output_name), "", output_format))
            for job in jobs
        ]
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    write_itksnap_labels(segmenter.labels, output / ITKSNAP_LABELS_FILE)
    record_path = output / RECORD_FILE
    description = segmenter.describe()
    write_instances = instances and (bool(segmenter.things) or segmenter.predicts_instances)
    key = _model_key(description, instances=write_instances, watershed=watershed, save_probabilities=save_probabilities)
    if refine is not None:
        if use_dask:
            raise MedsegUserError("refinement runs in this process: drop --scheduler / --dask-local")
        key = hashlib.sha256(f"{key}:{refine.key}".encode()).hexdigest()
        segmenter = _RefinedSegmenter(segmenter, refine)  # type: ignore[assignment]
    if output_format != "auto" or statistics:  # other outputs: a case written before is not complete
        key = hashlib.sha256(f"{key}|{output_format}|{statistics}".encode()).hexdigest()
    previous = _load_record(record_path)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    record: dict[str, Any] = {
        "format": "medseg-predict",
        "format_version": RECORD_FORMAT_VERSION,
        "created": previous.get("created", now),
        "input": str(input),
        "data_root": str(data_root) if data_root is not None else None,
        "output": str(output),
        "model": description,
        "model_key": key,
        "options": {
            "save_probabilities": save_probabilities,
            "instances": write_instances,
            "watershed": watershed,
            "which": which,
            "output_format": output_format,
            "statistics": statistics,
        },
        "versions": _versions(),
        "host": {"platform": platform.platform(), "device": str(segmenter.device)},
        "plans": segmenter.plans,
        "cases": dict(previous.get("cases", {})),
    }
    result = BatchResult(record=record_path)
    names = [job.output_name for job in jobs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise MedsegUserError(f"{input}: several inputs would write {duplicates[:3]}")
    case_options = {
        "model_key": key,
        "write_instances": write_instances,
        "watershed": watershed,
        "save_probabilities": save_probabilities,
        "statistics": statistics,
    }

    def record_case(job: PredictionJob, entry: dict[str, Any]) -> None:
        """Record a finished case (the driver is the only writer of the record)."""
        if entry["status"] == "ok":  # fingerprinted under the paths a rerun compares (Dask workers see resolved ones)
            entry["inputs"] = [file_fingerprint(p) for p in job.images]
        record["cases"][job.case_id] = entry
        if entry["status"] == "ok":
            result.predicted.append(job.case_id)
            result.notes += [(job.case_id, note) for note in entry.get("notes", [])]
        else:
            result.failed.append((job.case_id, entry["error"]))
            if progress:
                tqdm.write(f"failed: {job.case_id}: {entry['error']}")
        _write_record(record, record_path)

    todo = []
    for job in jobs:
        if _complete(record["cases"].get(job.case_id), job, output, key):
            result.skipped.append(job.case_id)
        else:
            todo.append(job)
    if use_dask and todo:
        from medseg.inference.dask_predict import predict_on_dask

        result.cases_per_worker = predict_on_dask(
            model,
            todo,
            output,
            load_options={
                "which": which,
                "device": device,
                "tta": tta,
                "overlap": overlap,
                "postprocessing": postprocessing,
                "runtime": description["runtime"],  # as resolved here: every worker runs what the record says
                "threads": dask_threads if runtime != "torch" else None,
                "precision": "mixed" if description["precision"] != "float32" else "float32",
            },
            checkpoint_hashes=[c["sha256"] for c in description["checkpoints"]],
            case_options=case_options,
            on_entry=record_case,
            scheduler=scheduler,
            local_workers=dask_local,
            torch_threads=dask_threads,
            progress=progress,
        )
    else:
        bar = tqdm(todo, desc="predict", unit="case", disable=not progress, dynamic_ncols=True)
        for job in bar:
            bar.set_postfix_str(job.case_id)
            entry = predict_case(
                segmenter, job.images, output, case_id=job.case_id, output_name=job.output_name, **case_options
            )
            if refine is not None and entry["status"] == "ok":
                entry["refinement"] = segmenter.statuses
            record_case(job, entry)
        bar.close()
    # cases finish in any order on Dask: the record and the result list them in input order
    order = {job.case_id: i for i, job in enumerate(jobs)}
    record["cases"] = dict(sorted(record["cases"].items(), key=lambda item: order.get(item[0], len(order))))
    result.predicted.sort(key=order.__getitem__)
    result.failed.sort(key=lambda failure: order[failure[0]])
    result.notes.sort(key=lambda note: order[note[0]])
    _write_record(record, record_path)
    if statistics:
        _write_all_statistics(record, output)
    result.elapsed_s = round(time.monotonic() - start, 3)
    return result
