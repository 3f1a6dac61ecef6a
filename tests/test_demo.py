"""`medseg demo`: the synthetic data generator and a smoke run of the whole pipeline on a tiny budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from medseg.apps.demo import make_synthetic_case, make_synthetic_dataset
from medseg.errors import MedsegUserError


@pytest.fixture
def restore_torch_threads():
    """run_demo(num_threads=1) sets torch's thread count; put it back afterwards."""
    torch = pytest.importorskip("torch")
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def test_synthetic_case_has_two_adjacent_structures_bias_and_noise():
    image, label = make_synthetic_case(np.random.default_rng(3))
    assert image.dtype == np.float32 and label.dtype == np.uint8 and image.shape == label.shape
    counts = np.bincount(label.ravel(), minlength=3)
    assert counts[1] > 300 and counts[2] > 300
    touching = ndimage.binary_dilation(label == 1) & (label == 2)
    assert touching.any()  # the two structures share a boundary
    assert image[label > 0].mean() > image[label == 0].mean()  # brighter than the surrounding tissue
    background = image[(label == 0)]
    assert background.std() > 0.05 * background.mean()  # texture, bias and noise, not a flat field
    other = make_synthetic_case(np.random.default_rng(4))[1]
    assert not np.array_equal(other, label)  # cases differ in shape and position


def test_synthetic_dataset_is_a_valid_manifest(tmp_path):
    from medseg.data.manifest import load_manifest

    path = make_synthetic_dataset(tmp_path, num_training=3, num_test=2, shape=(20, 24, 20))
    manifest = load_manifest(path)
    assert manifest.labels.names == {0: "background", 1: "anterior", 2: "posterior"}
    assert len([c for c in manifest.cases if c.subset == "test" and c.label is not None]) == 2
    volume = manifest.read_image(manifest.cases[0])
    assert volume.spatial_shape == (20, 24, 20) and volume.spacing_mm == (1.0, 1.0, 1.0)
    assert json.loads(path.read_text())["numTraining"] == 3


def test_demo_runs_the_whole_pipeline_on_a_tiny_budget(tmp_path, restore_torch_threads):
    from medseg.apps.demo import run_demo

    messages: list[str] = []
    result = run_demo(
        tmp_path / "demo",
        train_minutes=0.1,
        num_training=5,
        num_test=2,
        shape=(24, 28, 24),
        device="cpu",
        num_threads=1,
        tta=False,
        progress=False,
        log=messages.append,
    )
    assert result.report.is_file() and (result.evaluation / "per_case.csv").is_file()
    assert (result.run_dir / "checkpoint_best.pt").is_file() and (result.predictions / "medseg_predict.json").is_file()
    assert sorted(p.name for p in result.predictions.glob("*.nii.gz")) == ["synth_te000.nii.gz", "synth_te001.nii.gz"]
    assert set(result.dice) == {"anterior", "posterior"} and result.num_heldout == 2
    assert all(0.0 <= value <= 1.0 for value in result.dice.values())
    assert any("report" in m for m in messages) and any("Dice" in m for m in messages)
    with pytest.raises(MedsegUserError, match="already holds a demo run"):
        run_demo(tmp_path / "demo", train_minutes=0.1, progress=False, log=messages.append)
