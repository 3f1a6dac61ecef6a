"""The per-case result cache of a batch evaluation (``out/.cache``): a rerun recomputes only what changed.

A case's key hashes everything its result depends on: the cache format, the medseg version (a new
version may compute a metric differently), every evaluation setting (labels, regions, things, NSD
tolerances, connectivity, matching, resampling, geometry tolerance), the case id and the path,
size and modification time of every input file (reference, prediction, probabilities, further
raters, field-of-view mask) with the raters' label value maps. A stored result whose key differs is recomputed.
The settings are :meth:`~medseg.evaluation.case.EvaluationSettings.to_json`, which holds every
field of the settings, so a new setting is part of the key without a change here.

:data:`CACHE_VERSION` counts the layout of a stored result: 2 added the detections records of
the pooled AP (a result stored without them would silently leave its case out of the pool).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from medseg import __version__
from medseg.evaluation.pairing import CaseJob
from medseg.io.files import write_json

__all__ = ["CACHE_VERSION", "file_key", "case_key", "load_cached", "store_cached"]

CACHE_VERSION = 2


def file_key(path: str | None) -> list[Any]:
    """``[path, size, mtime_ns]`` of a file (``[path, None]`` when it cannot be read, ``[None]`` for none)."""
    if path is None:
        return [None]
    try:
        stat = os.stat(path)
    except OSError:
        return [path, None]
    return [path, stat.st_size, stat.st_mtime_ns]


def case_key(job: CaseJob, settings_json: str) -> str:
    """SHA-256 key of one case: cache format, medseg version, settings, case id and input files."""
    parts = [
        CACHE_VERSION,
        __version__,
        settings_json,
        job.case_id,
        file_key(job.reference),
        file_key(job.prediction),
        file_key(job.probabilities),
        file_key(job.instances),
        file_key(job.instance_scores),
        [(name, file_key(path)) for name, path in job.raters],
        [list(v) for v in job.value_maps],
        file_key(job.field_of_view),
    ]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def _cache_file(cache_dir: Path, case_id: str) -> Path:
    safe = hashlib.sha1(case_id.encode()).hexdigest()[:16]
    return cache_dir / f"{safe}.json"


def load_cached(cache_dir: Path, case_id: str, key: str) -> dict[str, Any] | None:
    """The stored result of a case when its key matches, else None (unreadable entries are misses)."""
    path = _cache_file(cache_dir, case_id)
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stored["result"] if stored.get("key") == key else None


def store_cached(cache_dir: Path, case_id: str, key: str, result: dict[str, Any]) -> None:
    """Store a case's result under its key (atomically)."""
    write_json({"key": key, "result": result}, _cache_file(cache_dir, case_id), indent=None)
