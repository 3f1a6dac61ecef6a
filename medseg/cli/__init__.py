"""The ``medseg`` command line: a thin typed shell over the Python API.

Each verb parses its options, calls one API function and prints the result. Imports happen
inside the verbs so ``medseg --help`` and ``medseg check`` start fast and never load torch.

User errors (:class:`~medseg.errors.MedsegUserError`: a bad file, manifest or option; an
``OSError`` such as a read-only or full output folder; running out of CUDA or host memory) print
one line ``medseg: error: ...`` naming the file or option and exit with status 2; ``--debug``
shows the traceback too. Any other exception is a bug and keeps its traceback.

The commands live in one module per family (:mod:`~medseg.cli.data`, :mod:`~medseg.cli.evaluation`,
:mod:`~medseg.cli.training`, :mod:`~medseg.cli.prediction`, :mod:`~medseg.cli.sam`), registered on
the one application in :mod:`~medseg.cli.app`; this module runs it.
"""

from __future__ import annotations

import gc
import sys
import traceback
from typing import List, Optional

import typer

# importing the command modules registers their commands, in this order in `medseg --help`
from medseg.cli import data, training, prediction, evaluation, sam  # noqa: F401  # isort: skip
from medseg.cli.app import EXIT_USER_ERROR, app

__all__ = ["app", "console", "main"]


def _user_error_message(error: BaseException) -> str | None:
    """The one-line message of an error the user can fix, or None for a bug (which keeps its traceback).

    User errors: :class:`~medseg.errors.MedsegUserError`; an ``OSError`` (read-only or full output
    folder, permission denied, missing file), named by its file; running out of memory (CUDA or
    host), with what to try instead.
    """
    from medseg.errors import MedsegUserError

    if isinstance(error, MedsegUserError):
        return str(error)
    if isinstance(error, OSError):
        where = error.filename if error.filename is not None else "file system"
        return f"{where}: {error.strerror or error}"
    if type(error).__name__ == "OutOfMemoryError" or isinstance(error, MemoryError):
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return (
            f"out of memory ({type(error).__name__}{': ' + first[:160] if first else ''}); "
            "try --device cpu, fewer --workers or a smaller --overlap"
        )
    return None


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``medseg`` console script; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        app(args=args, prog_name="medseg")  # standalone mode: always ends in SystemExit
    except SystemExit as done:
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except Exception as error:  # noqa: BLE001 - the boundary between user errors and bugs
        message = _user_error_message(error)
        if message is None:
            raise
        if debug:
            traceback.print_exc()
        typer.echo(f"medseg: error: {message}", err=True)
        return EXIT_USER_ERROR
    return 0


def _import_nibabel_without_pydicom() -> None:
    """Import nibabel while pydicom is hidden from it, saving 0.15 s of every command's start.

    nibabel imports pydicom, when installed, only to decode DICOM extensions inside NIfTI headers, which
    medseg never reads (nibabel then keeps such an extension as raw bytes). pydicom itself stays importable:
    DICOM series and DICOM-SEG read it as usual. Only the console script does this, since it owns its
    process; a notebook's nibabel is left as it is.
    """
    if "nibabel" in sys.modules or "pydicom" in sys.modules:
        return
    sys.modules["pydicom"] = None  # type: ignore[assignment]  # `import pydicom` now raises ImportError
    try:
        import nibabel  # noqa: F401
    finally:
        del sys.modules["pydicom"]


def console() -> None:
    """The ``medseg`` console script and ``python -m medseg``: :func:`main`, then a quick exit.

    nibabel is imported first, without pydicom (:func:`_import_nibabel_without_pydicom`).

    Before the interpreter shuts down, every object left is frozen (``gc.freeze``): the final
    garbage collection then skips them instead of walking numpy's, pandas' and scipy's module
    objects, which took 0.25 s of a 2 s ``medseg evaluate``. Exit handlers still run; nothing
    is skipped but that walk. (Not in :func:`main`, which tests call in one long process.)
    """
    _import_nibabel_without_pydicom()
    code = main()
    gc.freeze()
    sys.exit(code)
