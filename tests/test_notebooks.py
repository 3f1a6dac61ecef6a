"""Notebooks run top to bottom (on small data) and are committed without outputs."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_and_is_stripped(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat", reason="install the dev extra: pip install -e '.[dev]'")
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, f"{path.name}: outputs not stripped"
    # the notebooks' scratch folders (tempfile in the kernel) go to a folder removed afterwards; a short path,
    # because worker processes put their Unix sockets under TMPDIR (at most 107 characters)
    scratch = tempfile.mkdtemp(prefix="medseg_nb_")
    monkeypatch.setenv("TMPDIR", scratch)
    try:
        NotebookClient(
            notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
        ).execute()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
