"""Files medseg writes and reads besides images: atomic writes, JSON, hashes.

Every output is written **atomically**: the data go to a temporary file beside the target, which
is flushed to disk (``fsync``) and only then renamed over the target (``os.replace``, atomic on
POSIX and Windows), and the folder entry is synced too. A crash, a full disk or a read-only
folder therefore never leaves a half-written file under the target's name: the target is either
the old file or the complete new one. A failure is one :class:`~medseg.errors.OutputError`
naming the target and the reason.

Example:
    >>> with atomic_path("out/table.csv") as tmp:        # doctest: +SKIP
    ...     frame.to_csv(tmp)
    >>> write_json({"a": 1}, "out/summary.json")        # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterator

from medseg.errors import MedsegUserError, OutputError

__all__ = ["atomic_path", "write_text", "write_json", "read_json", "sha256_file", "suffix_of"]

_COMPOUND_SUFFIXES = (".nii.gz", ".tar.gz")


def suffix_of(path: str | os.PathLike[str]) -> str:
    """The file's suffix, ``".nii.gz"`` counted as one (``""`` when it has none)."""
    name = Path(path).name.lower()
    for suffix in _COMPOUND_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return "".join(Path(name).suffixes[-1:])


def _fsync(path: Path, *, directory: bool = False) -> None:
    """Flush a file (or a folder entry) to disk; a file is opened for writing (Windows flushes no read-only handle)."""
    flags = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if directory else os.O_RDWR
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms cannot open folders: the rename is still atomic
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; fsync it and rename it onto ``path`` if the block succeeds.

    The temporary name keeps the target's suffix, so format-by-extension writers work. On any
    error the temporary file is removed and the target is left as it was; an ``OSError`` (read-only
    folder, full disk, permission denied) becomes an :class:`OutputError` naming ``path``.
    """
    path = Path(path)
    suffix = suffix_of(path)
    base = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    temporary = path.with_name(f".{base}.{uuid.uuid4().hex[:8]}.partial{suffix}")
    try:
        yield temporary
        _fsync(temporary)
        os.replace(temporary, path)
        _fsync(path.parent, directory=True)
    except BaseException as error:
        with contextlib.suppress(OSError):
            temporary.unlink()
        if isinstance(error, OSError):
            raise OutputError(f"{path}: cannot write ({error.strerror or error})") from error
        raise


def write_text(text: str, path: str | os.PathLike[str], *, make_parents: bool = True) -> Path:
    """Write UTF-8 text atomically (creating the parent folder)."""
    path = Path(path)
    if make_parents:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"{path.parent}: cannot create folder ({error.strerror or error})") from error
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return path


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays as plain JSON; anything else as its string."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def write_json(content: Any, path: str | os.PathLike[str], *, indent: int | None = 2) -> Path:
    """Write JSON atomically (UTF-8, a trailing newline; numpy values become plain numbers)."""
    text = json.dumps(content, indent=indent, ensure_ascii=False, default=_json_default)
    return write_text(text + "\n", path)


def read_json(path: str | os.PathLike[str], *, what: str, error: type[MedsegUserError] = MedsegUserError) -> Any:
    """Parse a JSON file; any failure is one ``error`` naming the file and ``what`` it should be.

    Messages: ``"<path>: <what> not found"``, ``"<path>: invalid JSON (line L, column C: ...)"``,
    ``"<path>: cannot read <what> (<reason>)"``.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except json.JSONDecodeError as problem:
        raise error(f"{path}: invalid JSON (line {problem.lineno}, column {problem.colno}: {problem.msg})") from None
    except (OSError, UnicodeDecodeError) as problem:
        raise error(f"{path}: cannot read {what} ({problem})") from None


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
