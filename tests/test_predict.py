"""Batch prediction: inputs, names and formats, failure isolation, resume, medseg_predict.json."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import make_dataset, oblique_affine  # noqa: E402
from test_inference import write_checkpoint  # noqa: E402

from medseg.core.volume import Volume  # noqa: E402
from medseg.errors import MedsegUserError  # noqa: E402
from medseg.inference.batch import RECORD_FILE, collect_inputs, predict_batch  # noqa: E402
from medseg.io import read_volume, write_volume  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _inputs(folder, count=3):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        write_volume(
            Volume(rng.normal(size=(1, 14, 12, 6)).astype(np.float32) + 2, oblique_affine()),
            folder / f"case_{index}.nii.gz",
        )
    return folder


def test_folder_prediction_names_geometry_record_and_failure_isolation(tmp_path):
    write_checkpoint(tmp_path / "run")
    inputs = _inputs(tmp_path / "in")
    (inputs / "broken.nii.gz").write_bytes(b"not a nifti")
    result = predict_batch(tmp_path / "run", inputs, tmp_path / "out", device="cpu", tta=False, progress=False)
    assert sorted(result.predicted) == ["case_0", "case_1", "case_2"]
    assert [case for case, _ in result.failed] == ["broken"] and not result.ok
    assert "broken.nii.gz" in result.failed[0][1]
    for index in range(3):
        image = read_volume(inputs / f"case_{index}.nii.gz")
        label = read_volume(tmp_path / "out" / f"case_{index}.nii.gz", kind="label")
        assert label.same_geometry(image, tolerance_mm=1e-5)
    record = json.loads((tmp_path / "out" / RECORD_FILE).read_text())
    assert record["model"]["checkpoints"][0]["sha256"] and record["plans"]["configurations"]
    assert record["versions"]["torch"] and record["host"]["device"] == "cpu"
    case = record["cases"]["case_0"]
    assert case["status"] == "ok" and case["timings_s"]["network_s"] >= 0 and case["outputs"]["labels"]["sha256"]
    assert record["cases"]["broken"]["status"] == "failed"
    assert not list((tmp_path / "out").glob(".*partial*"))  # nothing half-written left behind


def test_rerun_skips_complete_outputs_and_redoes_changed_ones(tmp_path):
    write_checkpoint(tmp_path / "run")
    inputs = _inputs(tmp_path / "in")
    out = tmp_path / "out"
    first = predict_batch(tmp_path / "run", inputs, out, device="cpu", tta=False, progress=False)
    assert len(first.predicted) == 3
    again = predict_batch(tmp_path / "run", inputs, out, device="cpu", tta=False, progress=False)
    assert again.predicted == [] and sorted(again.skipped) == ["case_0", "case_1", "case_2"]
    (out / "case_1.nii.gz").write_bytes(b"damaged")  # an output that is no longer what was written
    (out / "case_2.nii.gz").unlink()
    third = predict_batch(tmp_path / "run", inputs, out, device="cpu", tta=False, progress=False)
    assert sorted(third.predicted) == ["case_1", "case_2"] and third.skipped == ["case_0"]
    read_volume(out / "case_1.nii.gz", kind="label")
    # other options or another model never reuse stale outputs
    with_tta = predict_batch(tmp_path / "run", inputs, out, device="cpu", tta=True, progress=False)
    assert len(with_tta.predicted) == 3
    write_checkpoint(tmp_path / "other", seed=5)
    other = predict_batch(tmp_path / "other", inputs, out, device="cpu", tta=True, progress=False)
    assert len(other.predicted) == 3
    # the network's precision changes labels (a few voxels in bfloat16): another precision predicts again
    exact = predict_batch(tmp_path / "other", inputs, out, device="cpu", tta=True, progress=False, precision="float32")
    mixed = predict_batch(tmp_path / "other", inputs, out, device="cpu", tta=True, progress=False, precision="mixed")
    assert len(exact.predicted) + len(exact.skipped) == 3 and len(mixed.predicted) == 3  # float32 -> bfloat16
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["model"]["precision"] == "bfloat16"


def test_manifest_input_with_subset_and_formats(tmp_path):
    manifest = make_dataset(tmp_path / "data", num_cases=3)
    write_checkpoint(tmp_path / "run", things=("back",), labels={"0": "background", "1": "front", "2": "back"})
    result = predict_batch(
        tmp_path / "run",
        manifest,
        tmp_path / "out",
        device="cpu",
        tta=False,
        save_probabilities=True,
        subset="training",
        progress=False,
    )
    assert sorted(result.predicted) == ["case_000", "case_001", "case_002"]
    probabilities = read_volume(tmp_path / "out" / "probabilities" / "case_000.nii.gz")
    assert probabilities.num_channels == 3 and np.allclose(probabilities.array.sum(0), 1.0, atol=1e-4)
    labels = read_volume(tmp_path / "out" / "case_000.nii.gz", kind="label")
    panoptic = read_volume(tmp_path / "out" / "panoptic" / "case_000.nii.gz", kind="label")
    instances = read_volume(tmp_path / "out" / "instances" / "case_000.nii.gz", kind="label")
    assert np.array_equal(panoptic.array // 1000, labels.array)
    assert np.array_equal(instances.array > 0, labels.array == 2)
    with pytest.raises(MedsegUserError, match="no cases"):
        collect_inputs(manifest, subset="test")


def test_output_keeps_name_and_format_of_2d_and_itk_inputs(tmp_path):
    from test_inference import tiny_plans

    from medseg.io import volume_suffix

    plans = tiny_plans()
    plans["configurations"]["3d"] = {**plans["configurations"]["2d"], "spacing_mm": [1.0, 1.0]}
    del plans["configurations"]["3d"]["slice_axis"]
    write_checkpoint(tmp_path / "run2d", plans=plans)
    inputs = tmp_path / "in"
    inputs.mkdir()
    pixels = np.random.default_rng(1).integers(1, 255, size=(1, 20, 18)).astype(np.uint8)
    write_volume(Volume(pixels, np.eye(4), kind="label"), inputs / "fundus.png")
    write_volume(Volume(pixels.astype(np.float32), np.diag([0.5, 0.5, 1, 1])), inputs / "scan.mha")
    result = predict_batch(tmp_path / "run2d", inputs, tmp_path / "out", device="cpu", progress=False)
    assert sorted(result.predicted) == ["fundus", "scan"]
    assert volume_suffix(next((tmp_path / "out").glob("fundus*"))) == ".png"
    assert read_volume(tmp_path / "out" / "scan.mha", kind="label").same_geometry(read_volume(inputs / "scan.mha"))


def test_multichannel_folder_grouping(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for case in ("a", "b"):
        for channel in range(2):
            (folder / f"{case}_{channel:04d}.nii.gz").write_bytes(b"")
    jobs = collect_inputs(folder, num_channels=2)
    assert [(j.case_id, [p.name for p in j.images], j.output_name) for j in jobs] == [
        ("a", ["a_0000.nii.gz", "a_0001.nii.gz"], "a.nii.gz"),
        ("b", ["b_0000.nii.gz", "b_0001.nii.gz"], "b.nii.gz"),
    ]
    (folder / "b_0001.nii.gz").unlink()
    with pytest.raises(MedsegUserError, match="'b' has channels"):
        collect_inputs(folder, num_channels=2)
    with pytest.raises(MedsegUserError, match="input not found"):
        collect_inputs(tmp_path / "nothing")
