"""Batch prediction on a Dask cluster: every worker loads the model once, predicts cases and writes their outputs.

The model is loaded on each worker by a ``distributed`` worker plugin (:class:`SegmenterPlugin`, registered
under a name keyed by the checkpoints' SHA-256s and the options), so a worker loads it once however many
cases it predicts, and a worker that joins or is restarted later loads it when it starts. Each case is one
task (:func:`medseg.evaluation.dask_runner.run_cases`): the worker reads the inputs from the shared storage,
writes the outputs atomically (:func:`medseg.inference.case.predict_case`) and sends back only the case's
record entry; the driver records it in ``medseg_predict.json`` as it arrives, so a rerun resumes from there.

Each worker runs one case at a time with ``torch_threads`` threads (start remote workers with
``dask worker --nthreads 1``); a remote worker whose checkpoint files differ from the driver's (other hashes)
is refused with an error naming the files. This module needs the ``dask`` extra (``pip install -e ".[dask]"``);
:func:`medseg.inference.batch.predict_batch` imports it only when Dask is asked for, after checking it is installed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from distributed.diagnostics.plugin import WorkerPlugin

from medseg.errors import CheckpointError
from medseg.evaluation.dask_runner import dask_client, run_cases
from medseg.inference.case import predict_case

__all__ = ["SegmenterPlugin", "predict_on_dask"]


class SegmenterPlugin(WorkerPlugin):
    """A ``distributed`` worker plugin holding one loaded :class:`~medseg.inference.segmenter.Segmenter` per worker.

    Args:
        model: run folder(s) / checkpoint(s), as paths valid on the workers.
        options: keyword options of :meth:`Segmenter.from_checkpoint` (``which``, ``device``, ``tta``, ...).
        torch_threads: torch's intra-op threads in each worker process.
    """

    idempotent = True  # registered again under the same name (same model and options): nothing to do

    def __init__(self, model: str | Sequence[str], options: dict[str, Any], *, torch_threads: int = 1) -> None:
        self.model = model
        self.options = dict(options)
        self.torch_threads = torch_threads
        self.segmenter: Any = None

    def setup(self, worker: Any) -> None:
        """Load the model (called by ``distributed`` in each worker process, once)."""
        import torch

        from medseg.inference.segmenter import Segmenter

        torch.set_num_threads(self.torch_threads)
        self.segmenter = Segmenter.from_checkpoint(self.model, **self.options)

    def teardown(self, worker: Any) -> None:
        """Drop the model."""
        self.segmenter = None


def plugin_name(checkpoint_hashes: Sequence[str], options: dict[str, Any]) -> str:
    """The plugin's name: one per model (checkpoint hashes) and loading options."""
    content = json.dumps([list(checkpoint_hashes), options], sort_keys=True, default=str)
    return "medseg-segmenter-" + hashlib.sha256(content.encode()).hexdigest()[:16]


def predict_on_worker(
    name: str, checkpoint_hashes: list[str], images: list[str], output: str, options: dict[str, Any]
) -> dict[str, Any]:
    """A task: predict one case with this worker's model and write its outputs; returns its record entry.

    Raises:
        CheckpointError: the worker's checkpoint files are not the driver's (other SHA-256s).
    """
    from distributed import get_worker

    segmenter = get_worker().plugins[name].segmenter
    hashes = [h for _, h in segmenter.checkpoints]
    if hashes != list(checkpoint_hashes):
        paths = ", ".join(p for p, _ in segmenter.checkpoints)
        raise CheckpointError(f"{paths}: on worker {get_worker().name} these checkpoints differ from the driver's")
    return predict_case(segmenter, [Path(p) for p in images], Path(output), **options)


def predict_on_dask(
    model: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    jobs: Sequence[Any],
    output: Path,
    *,
    load_options: dict[str, Any],
    checkpoint_hashes: Sequence[str],
    case_options: dict[str, Any],
    on_entry: Callable[[Any, dict[str, Any]], None],
    scheduler: str | None = None,
    local_workers: int | None = None,
    torch_threads: int = 1,
    progress: bool = False,
) -> dict[str, int]:
    """Predict ``jobs`` (:class:`~medseg.inference.batch.PredictionJob`) on a Dask cluster.

    Args:
        model: run folder(s) / checkpoint(s); absolute paths are sent to the workers.
        jobs: the cases to predict.
        output: the output folder (shared storage).
        load_options: options of :meth:`Segmenter.from_checkpoint`.
        checkpoint_hashes: the driver's checkpoint SHA-256s (the workers must load the same).
        case_options: keyword options of :func:`~medseg.inference.case.predict_case` besides the case's own.
        on_entry: called in the driver with ``(job, entry)`` as each case finishes.
        scheduler: address of a running ``dask scheduler``; or
        local_workers: the worker processes of a local cluster.
        torch_threads: torch threads of each worker.
        progress: show the cases done per worker.

    Returns:
        Cases predicted per worker name.
    """
    paths: str | list[str] = (
        str(Path(model).resolve()) if isinstance(model, (str, os.PathLike)) else [str(Path(m).resolve()) for m in model]
    )
    name = plugin_name(checkpoint_hashes, load_options)
    tasks = [
        (
            name,
            list(checkpoint_hashes),
            [str(Path(p).resolve()) for p in job.images],
            str(output.resolve()),
            {"case_id": job.case_id, "output_name": job.output_name, **case_options},
        )
        for job in jobs
    ]
    with dask_client(scheduler=scheduler, local_workers=local_workers) as client:
        client.register_plugin(SegmenterPlugin(paths, load_options, torch_threads=torch_threads), name=name)
        return run_cases(
            client,
            predict_on_worker,
            tasks,
            on_result=lambda i, entry: on_entry(jobs[i], entry),
            progress=progress,
            description="predict",
        )
