"""Spreading cases over a Dask cluster (``pip install -e ".[dask]"``): the glue shared by evaluation and prediction.

Dask's ``distributed`` is the engine: a :class:`distributed.Client` connected to a running scheduler
(``dask scheduler`` + ``dask worker`` processes, on this machine or others sharing the storage) or to a
:class:`distributed.LocalCluster` of worker processes started here. Each case is one task
(``Client.submit`` with ``retries``): a task whose worker dies is run again on another worker by the
scheduler, and a task that raises is retried ``retries`` times. The driver collects results with
``as_completed`` and hands each to a callback the moment it arrives, which records it (evaluation: the
per-case cache; prediction: ``medseg_predict.json``), so a rerun after the driver was killed resumes from
the finished cases.

Workers read their inputs themselves (the paths must be valid on every worker: shared storage) and send
back only small results (per-case rows, record entries), never arrays. Worker processes are started by
``distributed`` (``spawn`` by default, never ``fork``).

Example:
    >>> with dask_client(local_workers=2) as client:                          # doctest: +SKIP
    ...     counts = run_cases(client, score, [(job,) for job in jobs], on_result=store)
    >>> counts                                                                # doctest: +SKIP
    {'0': 11, '1': 9}
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections import Counter
from types import ModuleType
from typing import Any, Callable, Iterator, Sequence

from medseg.errors import MedsegUserError

__all__ = ["INSTALL_HINT", "require_distributed", "check_dask_options", "dask_client", "run_cases"]

INSTALL_HINT = 'pip install -e ".[dask]"'
CONNECT_TIMEOUT_S = 10


def require_distributed() -> ModuleType:
    """The ``distributed`` module, or a one-line :class:`~medseg.errors.MedsegUserError` with the install hint."""
    try:
        import distributed
    except ImportError:
        raise MedsegUserError(f"--scheduler / --dask-local need Dask, which is not installed: {INSTALL_HINT}") from None
    return distributed


def check_dask_options(*, scheduler: str | None, local_workers: int | None, threads_per_worker: int = 1) -> bool:
    """Validate the Dask options; returns whether Dask is asked for at all.

    Raises:
        MedsegUserError: both a scheduler and a local cluster, a local cluster of < 1 worker, or < 1 thread.
    """
    if scheduler is not None and local_workers is not None:
        raise MedsegUserError("--scheduler and --dask-local exclude each other: give one")
    if local_workers is not None and local_workers < 1:
        raise MedsegUserError(f"--dask-local must be >= 1 worker, got {local_workers}")
    if threads_per_worker < 1:
        raise MedsegUserError(f"--dask-threads must be >= 1, got {threads_per_worker}")
    if scheduler is not None and not str(scheduler).strip():
        raise MedsegUserError("--scheduler needs an address, e.g. tcp://127.0.0.1:8786")
    return scheduler is not None or local_workers is not None


@contextlib.contextmanager
def dask_client(
    *, scheduler: str | None = None, local_workers: int | None = None, threads_per_worker: int = 1
) -> Iterator[Any]:
    """A ``distributed.Client`` for a running scheduler, or for a local cluster started (and stopped) here.

    Args:
        scheduler: address of a running ``dask scheduler`` (``tcp://host:8786``); its workers are left running.
        local_workers: start a :class:`distributed.LocalCluster` of this many worker processes instead.
        threads_per_worker: threads of each local worker (a remote worker's are set by ``dask worker --nthreads``).

    Raises:
        MedsegUserError: Dask is not installed, the options are invalid, or the scheduler cannot be reached.
    """
    check_dask_options(scheduler=scheduler, local_workers=local_workers, threads_per_worker=threads_per_worker)
    distributed = require_distributed()
    if scheduler is not None:
        try:
            client = distributed.Client(scheduler, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise MedsegUserError(f"{scheduler}: cannot reach a Dask scheduler ({first})") from None
        with client:
            yield client
        return
    with (
        distributed.LocalCluster(
            n_workers=local_workers or 1,
            threads_per_worker=threads_per_worker,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        yield client


def _on_worker(function: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    """Run ``function(*args)`` on a worker; returns ``(worker name, result)`` so the driver counts cases per worker."""
    from distributed import get_worker

    return str(get_worker().name), function(*args)


def run_cases(
    client: Any,
    function: Callable[..., Any],
    tasks: Sequence[tuple[Any, ...]],
    *,
    on_result: Callable[[int, Any], None],
    retries: int = 2,
    progress: bool = False,
    description: str = "cases",
) -> dict[str, int]:
    """Run ``function(*task)`` for every task on the cluster; call ``on_result(index, result)`` as each finishes.

    ``function`` must be importable by the workers (a top-level function of an installed module). Results
    arrive in completion order; the caller puts them back in task order. An exception that is not retried
    away propagates here (bugs are not hidden).

    Args:
        client: a ``distributed.Client`` (see :func:`dask_client`).
        function: the per-case function; its result should be small (it travels back to the driver).
        tasks: the arguments of each call.
        on_result: called in the driver for each finished task, with its index in ``tasks``.
        retries: extra attempts of a task that raised (a task whose worker died is rescheduled by the
            scheduler anyway, up to ``distributed.scheduler.allowed-failures`` times).
        progress: a progress bar on stderr showing the cases done per worker.
        description: the progress bar's label.

    Returns:
        Cases done per worker name.
    """
    distributed = require_distributed()
    run_id = uuid.uuid4().hex[:12]
    futures = [
        client.submit(
            _on_worker, function, *task, key=f"medseg-{description}-{run_id}-{i}", retries=retries, pure=False
        )
        for i, task in enumerate(tasks)
    ]
    index = {future.key: i for i, future in enumerate(futures)}
    counts: Counter[str] = Counter()
    bar = None
    if progress and futures:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(futures), desc=description, unit="case", leave=False, dynamic_ncols=True)
    try:
        for future, (worker, result) in distributed.as_completed(futures, loop=client.loop, with_results=True):
            on_result(index[future.key], result)
            counts[worker] += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(per_worker_text(counts))
    finally:
        if bar is not None:
            bar.close()
        for future in futures:
            future.release()
    return dict(sorted(counts.items()))


def per_worker_text(counts: dict[str, int] | Counter[str]) -> str:
    """``"worker 0: 5, worker 1: 4"``: the cases done per worker."""
    return ", ".join(f"worker {name}: {count}" for name, count in sorted(counts.items()))
