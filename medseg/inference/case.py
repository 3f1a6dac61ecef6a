"""One case of a batch prediction: read its inputs, predict, write its outputs atomically, describe what was written.

:func:`predict_case` is what :func:`medseg.inference.batch.predict_batch` does for every case, in this
process or on a Dask worker (:mod:`medseg.inference.dask_predict`); it returns the case's entry of
``medseg_predict.json`` (a small plain-JSON dict: the arrays stay where they were written). A bad input or
a case too large for the machine becomes a ``failed`` entry; any other exception is a bug and propagates.

Example:
    >>> entry = predict_case(segmenter, [Path("ct.nii.gz")], Path("out"), case_id="ct",
    ...                      output_name="ct.nii.gz", model_key=key)             # doctest: +SKIP
    >>> entry["status"], entry["outputs"]["labels"]["file"]                       # doctest: +SKIP
    ('ok', 'ct.nii.gz')
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch

from medseg.errors import MedsegUserError
from medseg.inference.detections import panoptic_from_instances, write_instance_table
from medseg.inference.postprocess import PANOPTIC_DIVISOR, instance_maps
from medseg.inference.segmenter import Segmenter
from medseg.io.files import sha256_file
from medseg.io.label_files import write_label_file
from medseg.io.volumes import read_channels, write_volume

__all__ = ["predict_case", "file_fingerprint"]


def file_fingerprint(path: Path) -> list[Any]:
    """``[path, size, mtime_ns]`` of an input file (a DICOM folder: summed size, newest mtime; unreadable: Nones)."""
    try:
        if path.is_dir():
            stats = [f.stat() for f in sorted(path.iterdir()) if f.is_file()]
            return [str(path), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)]
        stat = path.stat()
    except OSError:  # a vanished input never matches a record: the case is redone (and then fails clearly)
        return [str(path), None, None]
    return [str(path), stat.st_size, stat.st_mtime_ns]


def predict_case(
    segmenter: Segmenter,
    images: Sequence[Path],
    output: Path,
    *,
    case_id: str,
    output_name: str,
    model_key: str,
    write_instances: bool = False,
    watershed: bool = False,
    save_probabilities: bool = False,
    statistics: bool = False,
) -> dict[str, Any]:
    """Predict one case and write its outputs (each atomically) into ``output``; returns its record entry.

    Args:
        segmenter: the model.
        images: the case's input files, one per channel.
        output: the output folder.
        case_id: the case's id (names the instance, panoptic and probability files).
        output_name: file name of the label map.
        model_key: the key of the model and options (stored in the entry; resume compares it).
        write_instances: also write ``instances/`` and ``panoptic/`` maps of the thing structures
            (a detection model: its own instances, and ``instances/<case>.csv`` with their scores).
        watershed: split touching instances with a marker watershed.
        save_probabilities: also write ``probabilities/<case>.nii.gz``.
        statistics: also write ``statistics/<case>.csv`` (:mod:`medseg.evaluation.statistics`).

    Returns:
        ``{"status": "ok", "outputs": {name: {"file", "sha256"}}, ...}`` or ``{"status": "failed", "error": ...}``.
    """
    clock = time.monotonic()
    try:
        volume = read_channels(list(images))
        prediction = segmenter.predict_full(volume, probabilities=save_probabilities)
        # the name's suffix chooses the format: .seg.nrrd (Slicer), .dcm (DICOM-SEG of a series folder), any volume
        written = {
            "labels": write_label_file(
                prediction.labels, output / output_name, labels=segmenter.labels, source=images[0]
            )
        }
        panoptic_array = None
        if write_instances and segmenter.predicts_instances:  # a detector's own instances, with scores
            instance_volume, table = segmenter.predict_instances(volume)
            panoptic_array = panoptic_from_instances(
                prediction.labels.array[0], instance_volume.array[0], table, divisor=PANOPTIC_DIVISOR
            )
            written["instances"] = write_volume(instance_volume, output / "instances" / f"{case_id}.nii.gz")
            written["instance_scores"] = write_instance_table(table, output / "instances" / f"{case_id}.csv")
        elif write_instances:
            instance_array, panoptic_array = instance_maps(
                prediction.labels.array[0],
                labels=segmenter.labels,
                things=segmenter.things,
                spacing_mm=volume.spacing_mm,
                watershed=watershed,
            )
            written["instances"] = write_volume(
                prediction.labels.with_array(instance_array[None]), output / "instances" / f"{case_id}.nii.gz"
            )
        notes = []
        if write_instances and panoptic_array is None:
            (output / "panoptic" / f"{case_id}.nii.gz").unlink(missing_ok=True)  # not an earlier run's map
            notes.append(
                f"panoptic map not written: a structure has {PANOPTIC_DIVISOR} instances or more, more than "
                f"label x {PANOPTIC_DIVISOR} + instance can number (instances/{case_id}.nii.gz holds them all)"
            )
        elif write_instances:
            written["panoptic"] = write_volume(
                prediction.labels.with_array(panoptic_array[None]), output / "panoptic" / f"{case_id}.nii.gz"
            )
        if prediction.probabilities is not None:
            written["probabilities"] = write_volume(
                prediction.probabilities, output / "probabilities" / f"{case_id}.nii.gz"
            )
        if statistics:
            from medseg.evaluation.statistics import structure_statistics, write_statistics

            table = structure_statistics(volume, prediction.labels, labels=segmenter.labels)
            written["statistics"] = write_statistics(table, output / "statistics" / f"{case_id}.csv")
        return {
            "status": "ok",
            "model_key": model_key,
            "inputs": [file_fingerprint(p) for p in images],
            "outputs": {
                name: {"file": str(path.relative_to(output)), "sha256": sha256_file(path)}
                for name, path in written.items()
            },
            "shape": list(volume.spatial_shape),
            "spacing_mm": [round(s, 6) for s in volume.spacing_mm],
            "timings_s": prediction.timings_s,
            "seconds": round(time.monotonic() - clock, 3),
            **({"notes": notes} if notes else {}),
        }
    except (MedsegUserError, MemoryError, torch.cuda.OutOfMemoryError) as error:
        # a bad input or a case too large for this machine must not stop the batch; any other
        # exception is a bug in medseg and propagates
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if not isinstance(error, MedsegUserError):
            message = f"out of memory ({type(error).__name__}): {message}; try --device cpu or a smaller --overlap"
        return {
            "status": "failed",
            "inputs": [str(p) for p in images],
            "error": message,
            "seconds": round(time.monotonic() - clock, 3),
        }
