"""Scoring inside a field-of-view mask (DRIVE's protocol): a false positive outside the mask does not count."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medseg.cli import main
from medseg.data.manifest import load_manifest
from medseg.evaluation import evaluate
from medseg.io import read_volume
from tests.test_drive_2d import _write_gif, make_drive_like


def _predictions(manifest_path: Path, out: Path, *, outside: bool) -> dict[str, np.ndarray]:
    """Observer 1's labels as predictions, with a 3x3 false positive in a corner outside the FOV when ``outside``."""
    manifest = load_manifest(manifest_path)
    out.mkdir()
    fov = {}
    for case in manifest.cases:
        if case.subset != "test_labelled":
            continue
        labels = read_volume(case.label, kind="label").channel(0).copy()
        mask = read_volume(case.extras["fov_mask"], kind="label").channel(0) > 0
        assert not mask[:3, :3].any()  # the corner lies outside the circular field of view
        if outside:
            labels[:3, :3] = 255
        _write_gif(labels, out / f"{case.case_id}.gif")
        fov[case.case_id] = mask
    return fov


def test_a_false_positive_outside_the_field_of_view_is_not_scored(tmp_path) -> None:
    manifest = make_drive_like(tmp_path / "data", num_training=1, num_test=2)
    _predictions(manifest, tmp_path / "pred", outside=True)

    inside = evaluate(manifest, tmp_path / "pred", subset="test_labelled")
    whole = evaluate(manifest, tmp_path / "pred", subset="test_labelled", field_of_view=False)

    assert inside.per_case["dice"].tolist() == [1.0, 1.0]
    assert inside.per_case["hd_mm"].tolist() == [0.0, 0.0]
    assert (whole.per_case["dice"] < 1.0).all()  # the same files, every pixel scored: the corner counts
    assert (whole.per_case["hd_mm"] > 10).all()
    assert all(str(path).endswith("_mask.gif") for path in inside.cases["field_of_view"])
    assert whole.cases["field_of_view"].isna().all()
    # observer 2 (shifted by a pixel, so partly outside the FOV) is scored inside it too
    assert set(inside.inter_rater["rater_b"]) == {"observer2"}


def test_the_report_and_summary_say_how_many_cases_were_scored_inside_their_mask(tmp_path, capsys) -> None:
    manifest = make_drive_like(tmp_path / "data", num_training=1, num_test=2)
    _predictions(manifest, tmp_path / "pred", outside=True)
    out = tmp_path / "eval"
    args = [
        "evaluate",
        "--reference",
        str(manifest),
        "--prediction",
        str(tmp_path / "pred"),
        "--subset",
        "test_labelled",
    ]
    assert main([*args, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["field_of_view_cases"] == 2
    assert summary["structures"]["vessel"]["dice"]["mean"] == 1.0
    assert "2 cases are scored only inside their field-of-view mask" in (out / "report.html").read_text()
    assert main([*args, "--out", str(tmp_path / "whole"), "--whole-image"]) == 0
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["field_of_view_cases"] == 0 and summary["structures"]["vessel"]["dice"]["mean"] < 1.0


def test_a_changed_mask_is_scored_again_on_a_cached_rerun(tmp_path) -> None:
    manifest = make_drive_like(tmp_path / "data", num_training=1, num_test=1)
    fov = _predictions(manifest, tmp_path / "pred", outside=True)
    out = tmp_path / "eval"
    assert evaluate(manifest, tmp_path / "pred", subset="test_labelled", out=out).per_case["dice"].tolist() == [1.0]
    case_id = next(iter(fov))
    mask_path = load_manifest(manifest).case(case_id).extras["fov_mask"]
    _write_gif(np.ones_like(fov[case_id], dtype=np.uint8) * 255, mask_path)  # the whole image is imaged now
    assert evaluate(manifest, tmp_path / "pred", subset="test_labelled", out=out).per_case["dice"].tolist()[0] < 1.0


def test_a_mask_of_another_size_fails_its_case_naming_the_mask(tmp_path) -> None:
    manifest = make_drive_like(tmp_path / "data", num_training=1, num_test=2)
    _predictions(manifest, tmp_path / "pred", outside=False)
    case = [c for c in load_manifest(manifest).cases if c.subset == "test_labelled"][0]
    _write_gif(np.full((10, 10), 255, np.uint8), case.extras["fov_mask"])

    result = evaluate(manifest, tmp_path / "pred", subset="test_labelled")

    statuses = dict(zip(result.cases["case_id"], result.cases["status"]))
    assert statuses[case.case_id] == "error" and list(statuses.values()).count("ok") == 1
    message = result.cases.set_index("case_id").loc[case.case_id, "message"]
    assert Path(case.extras["fov_mask"]).name in message and "geometry differs" in message


def test_a_prediction_on_a_finer_grid_is_resampled_then_masked() -> None:
    """``resample_prediction``: onto the reference grid first (nearest neighbour), then the mask applies."""
    from medseg.core.volume import Volume
    from medseg.evaluation.field_of_view import restrict_to_field_of_view

    reference = Volume(np.zeros((1, 4, 4, 2), np.uint8), np.eye(4), kind="label")
    fine_affine = np.diag([0.5, 0.5, 0.5, 1.0])
    fine_affine[:3, 3] = -0.25  # voxel centres of the 2x finer grid nest inside the coarse voxels
    prediction = Volume(np.ones((1, 8, 8, 4), np.uint8), fine_affine, kind="label")
    inside = np.zeros((4, 4, 2), bool)
    inside[1:3, 1:3] = True

    restricted = restrict_to_field_of_view(prediction, reference, inside, resample=True, tolerance_mm=1e-3)
    assert restricted.spatial_shape == (4, 4, 2) and np.array_equal(restricted.channel(0) > 0, inside)
    # without resampling a volume on another grid is left for the pair's grid check to name
    assert restrict_to_field_of_view(prediction, reference, inside, resample=False, tolerance_mm=1e-3) is prediction
