"""Shareable model bundles: one ``.zip`` holding a trained model, checked file by file when opened.

A bundle (written by :func:`medseg.inference.export.export_model`, ``medseg export RUN --out model.zip``)
holds::

    model_card.json             format, labels, folds, validation metrics, versions, and the
                                SHA-256 and size of every other file in the zip
    MODEL_CARD.md               the same, for people
    labels.json                 the label map, regions and input channels
    fold_K/checkpoint_*.pt      one checkpoint per fold (tensors and plain values only)
    fold_K/plans.json           the plans the fold was trained with
    fold_K/resolved_config.json the run's configuration (local paths removed)
    postprocessing.json         postprocessing rules (when the runs had them)
    refinement.json             refinement rules (when the runs had them)

Opening a bundle (:func:`open_bundle`; every ``--model`` option and
:func:`~medseg.model.checkpoint.resolve_checkpoints` do it for a ``.zip``) refuses, with one
:class:`~medseg.errors.CheckpointError` naming the file:

* an entry whose path is absolute, contains ``..`` or a backslash, or is a symbolic link
  ("zip slip"), before anything is written;
* a file listed in the card but absent from the zip, a file in the zip the card does not list,
  a size or a SHA-256 that differs from the card's ("tampered").

The files are extracted into a cache folder named by the zip's SHA-256
(``~/.cache/medseg/models/<sha256>``, or a private temporary folder when that is not writable),
by writing to a temporary folder that is renamed into place once every hash matched. A cached
copy is checked against the card again each time it is used and extracted afresh if it differs;
the only files it may hold besides the card's are ONNX exports beside the checkpoints
(``*.onnx``, :mod:`medseg.model.onnx`). Nothing is unpickled here: checkpoints are later read
with ``torch.load(weights_only=True)``.

The card's hashes detect a damaged or edited file; they cannot prove who made the zip (whoever
edits a file can edit the card). To trust a bundle, compare its own SHA-256 with the one its
author published (``medseg export`` prints it): ``open_bundle(path, expected_sha256=...)``.

Example:
    >>> folder = open_bundle("model.zip")                                    # doctest: +SKIP
    >>> bundle_checkpoints("model.zip")                                      # doctest: +SKIP
    [PosixPath('/home/me/.cache/medseg/models/3f2a.../fold_0/checkpoint_last.pt')]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
import uuid
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from medseg.errors import CheckpointError
from medseg.io.files import atomic_path, sha256_file

__all__ = [
    "BUNDLE_FORMAT",
    "BUNDLE_FORMAT_VERSION",
    "CARD_FILE",
    "CARD_MARKDOWN",
    "is_bundle",
    "write_bundle",
    "read_card",
    "open_bundle",
    "bundle_checkpoints",
    "default_cache_root",
]

BUNDLE_FORMAT = "medseg-model"
BUNDLE_FORMAT_VERSION = 1
CARD_FILE = "model_card.json"
CARD_MARKDOWN = "MODEL_CARD.md"
#: a card larger than this is not a medseg card (and is not read into memory)
_MAX_CARD_BYTES = 16 << 20
#: files a cached extraction may hold besides the card's: ONNX exports of its checkpoints
_CACHE_EXTRA_SUFFIXES = (".onnx",)


def is_bundle(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a model bundle (a ``.zip`` file; a ``.pt`` checkpoint is a zip inside, not a bundle)."""
    path = Path(path)
    return path.suffix.lower() == ".zip" and path.is_file()


def default_cache_root() -> Path:
    """Where opened bundles are extracted: ``~/.cache/medseg/models``."""
    return Path.home() / ".cache" / "medseg" / "models"


def _check_name(name: str, where: Path) -> str:
    """The entry name if it is a plain relative POSIX path inside the archive; CheckpointError otherwise."""
    posix = PurePosixPath(name)
    unsafe = (
        not name
        or "\\" in name
        or name.startswith("/")
        or (len(name) > 1 and name[1] == ":")
        or any(part in ("", ".", "..") for part in name.rstrip("/").split("/"))
        or posix.is_absolute()
    )
    if unsafe:
        raise CheckpointError(f"{where}: unsafe path {name!r} in the archive (absolute or with '..'); refused")
    return name


def write_bundle(
    files: Mapping[str, str | os.PathLike[str]],
    card: Mapping[str, Any],
    out: str | os.PathLike[str],
    *,
    markdown: str,
) -> tuple[Path, dict[str, Any]]:
    """Write a bundle atomically: ``files`` (archive name -> file), ``MODEL_CARD.md`` and the card.

    The card written is ``card`` plus ``format``, ``format_version`` and ``files`` (SHA-256 and
    size of every entry, ``MODEL_CARD.md`` included).

    Returns:
        The zip's path and the card as written.
    """
    out = Path(out)
    entries: dict[str, dict[str, Any]] = {}
    for name, source in files.items():
        _check_name(name, out)
        entries[name] = {"sha256": sha256_file(source), "bytes": Path(source).stat().st_size}
    markdown_bytes = markdown.encode("utf-8")
    entries[CARD_MARKDOWN] = {"sha256": hashlib.sha256(markdown_bytes).hexdigest(), "bytes": len(markdown_bytes)}
    written = {"format": BUNDLE_FORMAT, "format_version": BUNDLE_FORMAT_VERSION, **dict(card)}
    written["files"] = dict(sorted(entries.items()))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as temporary:
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(CARD_FILE, json.dumps(written, indent=2, ensure_ascii=False) + "\n")
            archive.writestr(CARD_MARKDOWN, markdown_bytes)
            for name, source in sorted(files.items()):
                archive.write(source, name)
    return out, written


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: model bundle not found") from None
    except (zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"{path}: not a readable zip file ({error})") from None


def _entries(archive: zipfile.ZipFile, path: Path) -> dict[str, zipfile.ZipInfo]:
    """The archive's file entries by name, after the zip-slip, link and duplicate checks."""
    entries: dict[str, zipfile.ZipInfo] = {}
    for info in archive.infolist():
        name = _check_name(info.filename, path)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise CheckpointError(f"{path}: {name} is a symbolic link; refused")
        if info.is_dir():
            continue
        if name in entries:
            raise CheckpointError(f"{path}: {name} appears twice in the archive; refused")
        entries[name] = info
    return entries


def _parse_card(archive: zipfile.ZipFile, entries: Mapping[str, zipfile.ZipInfo], path: Path) -> dict[str, Any]:
    info = entries.get(CARD_FILE)
    if info is None:
        raise CheckpointError(f"{path}: no {CARD_FILE} (not a medseg model bundle)")
    if info.file_size > _MAX_CARD_BYTES:
        raise CheckpointError(f"{path}: {CARD_FILE} is {info.file_size} bytes, not a medseg model card")
    try:
        card = json.loads(archive.read(info).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"{path}: {CARD_FILE} is not readable JSON ({str(error)[:160]})") from None
    if not isinstance(card, dict) or card.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(f"{path}: {CARD_FILE} is not a medseg model card (no format {BUNDLE_FORMAT!r})")
    version = card.get("format_version")
    if not isinstance(version, int) or version > BUNDLE_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: model bundle format version {version!r} is not one this medseg reads "
            f"(up to {BUNDLE_FORMAT_VERSION}); upgrade medseg"
        )
    files = card.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{path}: {CARD_FILE} lists no files")
    for name, entry in files.items():
        _check_name(name, path)
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not isinstance(entry.get("bytes"), int)
        ):
            raise CheckpointError(f"{path}: {CARD_FILE} has no sha256 and size for {name}")
    checkpoints = card.get("checkpoints")
    if not isinstance(checkpoints, list) or not checkpoints or any(c not in files for c in checkpoints):
        raise CheckpointError(f"{path}: {CARD_FILE} lists no checkpoints among its files")
    return card


def read_card(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The model card of a bundle (after the zip-slip and format checks; file hashes are not checked here)."""
    path = Path(path)
    with _open_zip(path) as archive:
        return _parse_card(archive, _entries(archive, path), path)


def _compare_listing(names: set[str], card: Mapping[str, Any], path: Path) -> None:
    listed = set(card["files"])
    missing = sorted(listed - names)
    if missing:
        raise CheckpointError(f"{path}: {missing[0]} is listed in {CARD_FILE} but missing from the bundle; refused")
    extra = sorted(names - listed - {CARD_FILE})
    if extra:
        raise CheckpointError(f"{path}: {extra[0]} is in the bundle but not listed in {CARD_FILE}; refused")


def _extract_verified(path: Path, target: Path) -> dict[str, Any]:
    """Check the listing, sizes and hashes while extracting every file of ``path`` into ``target``."""
    with _open_zip(path) as archive:
        entries = _entries(archive, path)
        card = _parse_card(archive, entries, path)
        _compare_listing(set(entries), card, path)
        for name, info in entries.items():
            destination = target.joinpath(*name.split("/"))
            if name == CARD_FILE:
                destination.write_bytes(archive.read(info))
                continue
            expected = card["files"][name]
            if info.file_size != expected["bytes"]:
                raise CheckpointError(
                    f"{path}: {name} is {info.file_size} bytes, the card says {expected['bytes']}; tampered, refused"
                )
            destination.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            written = 0
            try:
                with archive.open(info) as source, open(destination, "wb") as sink:
                    for block in iter(lambda source=source: source.read(1 << 20), b""):
                        written += len(block)
                        if written > expected["bytes"]:
                            break
                        digest.update(block)
                        sink.write(block)
            except (zipfile.BadZipFile, EOFError, zlib.error) as error:  # bad CRC, truncated, bad deflate data
                raise CheckpointError(f"{path}: {name} cannot be read from the archive ({error}); refused") from None
            if written != expected["bytes"] or digest.hexdigest() != expected["sha256"]:
                raise CheckpointError(
                    f"{path}: {name} does not match the SHA-256 in {CARD_FILE}; the file was changed, refused"
                )
    return card


def _card_bytes(path: Path) -> bytes:
    """The raw model card of a bundle (after the zip-slip and format checks)."""
    with _open_zip(path) as archive:
        entries = _entries(archive, path)
        _parse_card(archive, entries, path)
        return archive.read(entries[CARD_FILE])


def _cached_copy_ok(folder: Path, card_bytes: bytes) -> bool:
    """Whether an extracted folder still holds the bundle's card and exactly its files with its hashes."""
    try:
        if (folder / CARD_FILE).read_bytes() != card_bytes:
            return False
        card = json.loads(card_bytes.decode("utf-8"))
        listed = card["files"]
        for name, entry in listed.items():
            file = folder.joinpath(*name.split("/"))
            if file.is_symlink() or not file.is_file() or sha256_file(file) != entry["sha256"]:
                return False
        for file in folder.rglob("*"):
            if file.is_symlink():
                return False
            name = file.relative_to(folder).as_posix()
            if file.is_file() and name != CARD_FILE and name not in listed:
                if ".partial" in file.name:  # an ONNX export another process is writing (atomic_path's temporary)
                    continue
                if not file.name.endswith(_CACHE_EXTRA_SUFFIXES) or file.name.startswith("."):
                    return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return True


def open_bundle(
    path: str | os.PathLike[str],
    *,
    cache_root: str | os.PathLike[str] | None = None,
    expected_sha256: str | None = None,
) -> Path:
    """Check a bundle and return the folder it is extracted to (see the module docstring).

    Args:
        path: the ``.zip``.
        cache_root: folder of extracted bundles (default :func:`default_cache_root`; a private
            temporary folder when it cannot be created).
        expected_sha256: the zip's SHA-256 as its author published it; a different one is refused.

    Raises:
        CheckpointError: a missing or unreadable zip, an unsafe entry, a missing, extra or changed
            file, or a zip whose SHA-256 is not ``expected_sha256``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: model bundle not found")
    digest = sha256_file(path)
    if expected_sha256 is not None and digest != expected_sha256.strip().lower():
        raise CheckpointError(f"{path}: SHA-256 {digest} is not the expected {expected_sha256}; refused")
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe-{uuid.uuid4().hex[:8]}"
        probe.mkdir()
        probe.rmdir()
    except OSError:
        root = Path(tempfile.mkdtemp(prefix="medseg-models-"))
    final = root / digest
    if final.is_dir() and _cached_copy_ok(final, _card_bytes(path)):
        return final
    staging = root / f".{digest[:16]}.{uuid.uuid4().hex[:8]}.partial"
    staging.mkdir()
    try:
        _extract_verified(path, staging)
        card = (staging / CARD_FILE).read_bytes()
        if final.exists():  # a stale or damaged copy (or one another process just finished)
            if _cached_copy_ok(final, card):
                shutil.rmtree(staging)
                return final
            # moved aside, not deleted in place: a process still reading it keeps its open files
            with contextlib.suppress(OSError):
                os.replace(final, root / f".{digest[:16]}.{uuid.uuid4().hex[:8]}.stale")
        try:
            os.replace(staging, final)
        except OSError:  # another process put its verified copy there first
            if not _cached_copy_ok(final, card):
                raise
            shutil.rmtree(staging)
    except OSError as error:
        with contextlib.suppress(OSError):
            shutil.rmtree(staging)
        raise CheckpointError(f"{path}: cannot extract into {root} ({error.strerror or error})") from None
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(staging)
        raise
    return final


def bundle_checkpoints(
    path: str | os.PathLike[str],
    *,
    cache_root: str | os.PathLike[str] | None = None,
    expected_sha256: str | None = None,
) -> list[Path]:
    """The checkpoint files of a checked, extracted bundle, in the card's fold order."""
    folder = open_bundle(path, cache_root=cache_root, expected_sha256=expected_sha256)
    card = json.loads((folder / CARD_FILE).read_text(encoding="utf-8"))
    return [folder.joinpath(*name.split("/")) for name in card["checkpoints"]]
