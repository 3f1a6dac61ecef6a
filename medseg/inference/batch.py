"""Batch prediction: a file, a folder or a manifest in, one label file per case out.

:func:`predict_batch` segments every input with a :class:`~medseg.inference.Segmenter` and
writes, into the output folder:

=================================  ==========================================================
file                               content
=================================  ==========================================================
``<name>``                         label map, with the input file's name and format (``.mhd``
                                   becomes ``.mha``, ``.nhdr`` ``.nrrd``, GIF/JPEG/BMP ``.png``,
                                   a DICOM folder ``<folder>.nii.gz``; manifest cases are named
                                   ``<case_id>`` + their image's format)
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from medseg import __version__
from medseg.data.manifest import load_manifest
from medseg.errors import MedsegUserError
from medseg.inference.postprocess import instance_maps
from medseg.inference.segmenter import Segmenter
from medseg.io.files import sha256_file, write_json
from medseg.io.volumes import VOLUME_SUFFIXES, read_channels, strip_volume_suffix, volume_suffix, write_volume

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
        record: path of ``medseg_predict.json``.
        elapsed_s: wall time of the call.
    """

    predicted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    record: Path | None = None
    elapsed_s: float = 0.0

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


def _file_fingerprint(path: Path) -> list[Any]:
    try:
        if path.is_dir():
            stats = [f.stat() for f in sorted(path.iterdir()) if f.is_file()]
            return [str(path), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)]
        stat = path.stat()
    except OSError:  # a vanished input never matches a record: the case is redone (and then fails clearly)
        return [str(path), None, None]
    return [str(path), stat.st_size, stat.st_mtime_ns]


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


def _complete(entry: dict[str, Any] | None, job: PredictionJob, output: Path, model_key: str) -> bool:
    if not entry or entry.get("status") != "ok" or entry.get("model_key") != model_key:
        return False
    if entry.get("inputs") != [_file_fingerprint(p) for p in job.images]:
        return False
    for item in entry.get("outputs", {}).values():
        path = output / item["file"]
        if not path.is_file() or sha256_file(path) != item["sha256"]:
            return False
    return bool(entry.get("outputs"))


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
    progress: bool = True,
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
        instances: write instance and panoptic maps for the model's thing structures.
        watershed: split touching instances with a marker watershed.
        which: ``"last"`` (default) or ``"best"`` checkpoint of run folders (``best`` was chosen on
            the run's own validation cases: optimistic there).
        postprocessing: ``"auto"``, a ``postprocessing.json`` path, or None (none applied).
        progress: show a progress bar.

    Returns:
        A :class:`BatchResult`; failed cases are listed there and in the record, not raised.

    Raises:
        MedsegUserError: no inputs, or a model that cannot be loaded (:class:`CheckpointError`).
    """
    from tqdm.auto import tqdm

    start = time.monotonic()
    if isinstance(model, Segmenter):
        segmenter = model
    else:
        segmenter = Segmenter.from_checkpoint(
            model, which=which, device=device, tta=tta, overlap=overlap, postprocessing=postprocessing
        )
    jobs = collect_inputs(input, data_root=data_root, num_channels=len(segmenter.plans["normalization"]), subset=subset)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    record_path = output / RECORD_FILE
    description = segmenter.describe()
    write_instances = instances and bool(segmenter.things)
    key = _model_key(description, instances=write_instances, watershed=watershed, save_probabilities=save_probabilities)
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
    bar = tqdm(jobs, desc="predict", unit="case", disable=not progress, dynamic_ncols=True)
    for job in bar:
        bar.set_postfix_str(job.case_id)
        target = output / job.output_name
        if _complete(record["cases"].get(job.case_id), job, output, key):
            result.skipped.append(job.case_id)
            continue
        clock = time.monotonic()
        try:
            volume = read_channels(list(job.images))
            prediction = segmenter.predict_full(volume, probabilities=save_probabilities)
            written = {"labels": write_volume(prediction.labels, target)}
            if write_instances:
                instance_array, panoptic_array = instance_maps(
                    prediction.labels.array[0],
                    labels=segmenter.labels,
                    things=segmenter.things,
                    spacing_mm=volume.spacing_mm,
                    watershed=watershed,
                )
                written["instances"] = write_volume(
                    prediction.labels.with_array(instance_array[None]), output / "instances" / f"{job.case_id}.nii.gz"
                )
                written["panoptic"] = write_volume(
                    prediction.labels.with_array(panoptic_array[None]), output / "panoptic" / f"{job.case_id}.nii.gz"
                )
            if prediction.probabilities is not None:
                written["probabilities"] = write_volume(
                    prediction.probabilities, output / "probabilities" / f"{job.case_id}.nii.gz"
                )
            record["cases"][job.case_id] = {
                "status": "ok",
                "model_key": key,
                "inputs": [_file_fingerprint(p) for p in job.images],
                "outputs": {
                    name: {"file": str(path.relative_to(output)), "sha256": sha256_file(path)}
                    for name, path in written.items()
                },
                "shape": list(volume.spatial_shape),
                "spacing_mm": [round(s, 6) for s in volume.spacing_mm],
                "timings_s": prediction.timings_s,
                "seconds": round(time.monotonic() - clock, 3),
            }
            result.predicted.append(job.case_id)
        except (MedsegUserError, MemoryError, torch.cuda.OutOfMemoryError) as error:
            # a bad input or a case too large for this machine must not stop the batch; any other
            # exception is a bug in medseg and propagates
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if not isinstance(error, MedsegUserError):
                message = f"out of memory ({type(error).__name__}): {message}; try --device cpu or a smaller --overlap"
            record["cases"][job.case_id] = {
                "status": "failed",
                "inputs": [str(p) for p in job.images],
                "error": message,
                "seconds": round(time.monotonic() - clock, 3),
            }
            result.failed.append((job.case_id, message))
            if progress:
                bar.write(f"failed: {job.case_id}: {message}")
        _write_record(record, record_path)
    bar.close()
    _write_record(record, record_path)
    result.elapsed_s = round(time.monotonic() - start, 3)
    return result
