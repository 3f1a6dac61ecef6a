"""`medseg check`: every fault is reported with case id and file; exit codes; JSON output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import make_dataset

from medseg.cli import main
from medseg.data.check import check_manifest
from medseg.data.manifest import load_manifest


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, affine), str(path))


def _problems(path: Path) -> list[str]:
    report = check_manifest(load_manifest(path))
    return [str(p) for p in report.problems]


def test_clean_dataset_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_dataset(tmp_path, num_cases=3)
    report = check_manifest(load_manifest(path))
    assert report.ok and report.cases_checked == 3 and report.cases_ok == 3
    assert main(["check", str(path)]) == 0
    assert "checked 3 cases: 3 OK, 0 problems" in capsys.readouterr().out


def _break(tmp_path: Path, fault: str) -> Path:
    path = make_dataset(tmp_path, num_cases=3)
    image_path = tmp_path / "imagesTr" / "case_001.nii.gz"
    label_path = tmp_path / "labelsTr" / "case_001.nii.gz"
    image = nib.load(str(image_path))
    label = nib.load(str(label_path))
    data, lab, affine = np.asarray(image.dataobj), np.asarray(label.dataobj), image.affine.copy()
    if fault == "missing":
        label_path.unlink()
    elif fault == "unreadable":
        image_path.write_bytes(b"\x1f\x8b garbage")
    elif fault == "shape":
        _nifti(label_path, lab[:-1], affine)
    elif fault == "spacing":
        scaled = affine.copy()
        scaled[:3, 0] *= 1.1
        _nifti(label_path, lab, scaled)
    elif fault == "origin":
        moved = affine.copy()
        moved[:3, 3] += [0.5, 0, 0]
        _nifti(label_path, lab, moved)
    elif fault == "direction":
        flipped = affine.copy()
        flipped[:3, 0] *= -1
        _nifti(label_path, lab, flipped)
    elif fault == "label_value":
        lab = lab.copy()
        lab[0, 0, 0] = 7
        _nifti(label_path, lab, affine)
    elif fault == "non_integral":
        _nifti(label_path, lab.astype(np.float32) + 0.25 * (lab > 0), affine)
    elif fault == "nan":
        data = data.copy()
        data[1, 1, 1] = np.nan
        data[2, 2, 2] = np.inf
        _nifti(image_path, data, affine)
    return path


@pytest.mark.parametrize(
    "fault, file_name, message",
    [
        ("missing", "labelsTr/case_001.nii.gz", "file not found"),
        ("unreadable", "imagesTr/case_001.nii.gz", "cannot read"),
        ("shape", "labelsTr/case_001.nii.gz", "geometry differs from case_001.nii.gz: shape"),
        ("spacing", "labelsTr/case_001.nii.gz", "spacing_mm"),
        ("origin", "labelsTr/case_001.nii.gz", "origin"),
        ("direction", "labelsTr/case_001.nii.gz", "direction"),
        ("label_value", "labelsTr/case_001.nii.gz", "label values 7 are not in the label map"),
        ("non_integral", "labelsTr/case_001.nii.gz", "non-integral values"),
        ("nan", "imagesTr/case_001.nii.gz", "2 NaN/Inf voxels"),
    ],
)
def test_each_fault_is_reported(tmp_path: Path, capsys, fault: str, file_name: str, message: str) -> None:
    path = _break(tmp_path, fault)
    problems = _problems(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"case_001: {(tmp_path / file_name).resolve()}: ")
    assert message in problems[0]
    assert main(["check", str(path)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("checked 3 cases: 2 OK, 1 problem ")


def test_all_problems_reported_at_once(tmp_path: Path, capsys) -> None:
    path = make_dataset(tmp_path, num_cases=3)
    (tmp_path / "labelsTr" / "case_000.nii.gz").unlink()
    (tmp_path / "imagesTr" / "case_002.nii.gz").write_bytes(b"junk")
    assert main(["check", str(path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["cases_checked"] == 3 and report["cases_ok"] == 1
    assert sorted(p["case_id"] for p in report["problems"]) == ["case_000", "case_002"]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"labels": ', "invalid JSON"),
        ('{"training": [{"image": "a.nii.gz"}]}', "no 'labels'"),
        ('{"labels": {"0": "bg"}, "training": []}', "no cases"),
    ],
)
def test_bad_manifest_is_one_line_without_traceback(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(content)
    result = subprocess.run([sys.executable, "-m", "medseg.cli", "check", str(path)], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"medseg: error: {path}") and message in lines[0]
    assert "Traceback" not in result.stderr
    debug = subprocess.run(
        [sys.executable, "-m", "medseg.cli", "--debug", "check", str(path)], capture_output=True, text=True
    )
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_missing_data_root_and_bad_option(tmp_path: Path, capsys) -> None:
    path = make_dataset(tmp_path, num_cases=1)
    assert main(["check", str(path), "--data-root", str(tmp_path / "nowhere")]) == 2
    assert "data root is not a folder" in capsys.readouterr().err
    assert main(["check", str(path), "--workers", "0"]) == 2


def test_singular_affine_is_a_problem_not_a_crash(tmp_path: Path, capsys) -> None:
    path = make_dataset(tmp_path, num_cases=2)
    label_path = tmp_path / "labelsTr" / "case_001.nii.gz"
    header = nib.Nifti1Header()
    header.set_data_shape(nib.load(str(label_path)).shape)
    header.set_data_dtype(np.uint8)
    header.set_qform(None, code=0)
    header.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=1)  # a zero voxel size: no valid geometry
    data = np.asarray(nib.load(str(label_path)).dataobj)
    nib.save(nib.Nifti1Image(data, None, header=header), str(label_path))
    assert main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "case_001" in out and "invalid geometry" in out and "checked 2 cases: 1 OK" in out
