"""``medseg plan --fast``: plans at 3 mm or coarser, the case's physical extent kept."""

from __future__ import annotations

import json

import pytest
from conftest import make_dataset

from medseg.cli import main
from medseg.planning.fast import FAST_SPACING_MM, fast_fingerprint


def test_fast_fingerprint_keeps_the_physical_extent():
    fingerprint = {
        "spacings_mm": [[0.78, 0.78, 1.5], [0.7, 0.7, 5.0]],
        "shapes": [[512, 512, 300], [512, 512, 60]],
        "median_spacing_mm": [0.74, 0.74, 3.25],
        "intensity": [{"channel": "CT"}],
    }
    fast = fast_fingerprint(fingerprint)
    assert fast["spacings_mm"] == [[3.0, 3.0, 3.0], [3.0, 3.0, 5.0]]  # coarser axes are kept
    assert fast["shapes"][0] == pytest.approx([512 * 0.78 / 3, 512 * 0.78 / 3, 150.0])
    assert fast["shapes"][1][2] == 60 and fast["median_spacing_mm"] == [3.0, 3.0, 4.0]
    assert fast["intensity"] == fingerprint["intensity"] and fingerprint["spacings_mm"][0][0] == 0.78


def test_plan_fast_from_the_command_line(tmp_path, capsys):
    manifest = make_dataset(tmp_path / "data", shape=(40, 36, 30))  # 0.7 x 1.1 x 3.0 mm voxels
    assert main(["plan", str(manifest), "--out", str(tmp_path / "plans.json"), "--fast"]) == 0
    plans = json.loads((tmp_path / "plans.json").read_text())
    assert plans["configurations"]["3d"]["spacing_mm"] == [FAST_SPACING_MM] * 3
    fingerprint = json.loads((tmp_path / "fingerprint.json").read_text())
    assert fingerprint["spacings_mm"][0] == pytest.approx([0.7, 1.1, 3.0], abs=1e-4)  # the real one
    assert main(["plan", str(manifest), "--out", str(tmp_path / "normal.json")]) == 0
    normal = json.loads((tmp_path / "normal.json").read_text())
    assert normal["configurations"]["3d"]["spacing_mm"][0] == pytest.approx(0.7, abs=1e-4)
    assert "spacing_mm [3.0, 3.0, 3.0]" in capsys.readouterr().out
