"""Writing a report must not switch matplotlib's backend (a notebook's own plots would stop showing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_dataset

from medseg.data import load_manifest
from medseg.evaluation import compare, evaluate, write_outputs
from medseg.io import write_volume


def test_evaluation_and_comparison_reports_leave_the_backend_alone(tmp_path: Path) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    manifest = load_manifest(make_dataset(tmp_path / "data", num_cases=4))
    folders = {}
    for name, shift in (("a", 0), ("b", 1)):
        folders[name] = tmp_path / name
        for case in manifest.cases:
            label = manifest.read_label(case)
            write_volume(
                label.with_array(np.roll(label.array, shift, axis=1)), folders[name] / f"{case.case_id}.nii.gz"
            )
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # stands in for a notebook's inline backend
    try:
        evaluations = {name: evaluate(manifest, folder) for name, folder in folders.items()}
        written = write_outputs(evaluations["b"], tmp_path / "eval_b")  # box plots and worst-case overlays
        comparison = compare(evaluations["a"], evaluations["b"]).write(tmp_path / "comparison")  # paired plots
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    for report in (written["report"], comparison["report"]):
        assert "data:image/png;base64," in report.read_text(encoding="utf-8")
