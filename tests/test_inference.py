"""Segmenter: geometry of predictions (oblique, anisotropic, 2D), sliding window, TTA, ensembles, bad checkpoints."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import oblique_affine  # noqa: E402

from medseg.core.labels import LabelSet  # noqa: E402
from medseg.core.volume import Volume  # noqa: E402
from medseg.errors import CheckpointError, MedsegUserError  # noqa: E402

LABELS = {"0": "background", "1": "a", "2": "b"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_plans(*, spacing=(1.0, 1.0, 1.5), channels=("MRI",)) -> dict:
    """Plans for a 3-stage DynUNet with 16-voxel patches (3d) and a 2d configuration."""
    return {
        "format_version": 1,
        "dataset": {"name": "tiny", "labels": LABELS, "regions": {}, "channels": list(channels)},
        "normalization": [{"channel": c, "scheme": "zscore"} for c in channels],
        "configurations": {
            "3d": {
                "spatial_dims": 3,
                "spacing_mm": list(spacing),
                "patch_size": [16, 16, 16],
                "batch_size": 2,
                "network": {
                    "architecture": "DynUNet",
                    "filters": [4, 8, 8],
                    "kernel_size": [[3, 3, 3]] * 3,
                    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                    "deep_supervision": False,
                },
            },
            "2d": {
                "spatial_dims": 2,
                "slice_axis": 2,
                "spacing_mm": list(spacing),
                "patch_size": [16, 16],
                "batch_size": 2,
                "network": {
                    "architecture": "DynUNet",
                    "filters": [4, 8, 8],
                    "kernel_size": [[3, 3]] * 3,
                    "strides": [[1, 1], [2, 2], [2, 2]],
                    "deep_supervision": False,
                },
            },
        },
    }


def write_checkpoint(
    run_dir: Path,
    *,
    plans: dict | None = None,
    config: str = "3d",
    seed: int = 0,
    labels: dict | None = None,
    things=(),
) -> Path:
    """A run folder with checkpoint_last.pt and checkpoint_best.pt holding a randomly initialised tiny network."""
    import json

    from medseg.model.checkpoint import save_checkpoint
    from medseg.model.networks import build_network

    plans = plans or tiny_plans()
    label_set = LabelSet.from_manifest(labels or LABELS)
    torch.manual_seed(seed)
    network = build_network(
        plans["configurations"][config], in_channels=len(plans["normalization"]), out_channels=label_set.num_classes
    )
    content = {
        "model": network.state_dict(),
        "plans": plans,
        "config": config,
        "labels": label_set.to_json(),
        "channels": ["MRI"],
    }
    save_checkpoint(content, run_dir / "checkpoint_best.pt")
    path = save_checkpoint(content, run_dir / "checkpoint_last.pt")
    (run_dir / "resolved_config.json").write_text(json.dumps({"manifest": {"things": list(things)}}))
    return path


class IntensityNet(torch.nn.Module):
    """Logits ``[0, 3x, -3x]`` of the (normalised) first channel: probabilities are a known function."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.classes = classes

    def forward(self, x):
        x = x[:, :1]
        parts = [torch.zeros_like(x), 3 * x, -3 * x][: self.classes]
        return torch.cat(parts, 1)


def segmenter(network, *, plans=None, config="3d", labels=None, tta=False, **kwargs):
    from medseg.inference import Segmenter

    return Segmenter(
        [network],
        plans=plans or tiny_plans(),
        config=config,
        labels=LabelSet.from_manifest(labels or LABELS),
        device="cpu",
        tta=tta,
        **kwargs,
    )


def smooth_volume(affine: np.ndarray, shape=(30, 25, 20)) -> tuple[Volume, np.ndarray]:
    """An image whose intensity is a smooth function of world (RAS mm) position."""
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), 0).reshape(3, -1)
    world = affine[:3, :3] @ ijk + affine[:3, 3:4]
    values = (np.sin(world[0] / 9.0) + np.cos(world[1] / 11.0) + 0.5 * np.sin(world[2] / 13.0)).reshape(shape)
    return Volume((values + 5).astype(np.float32)[None], affine), values


def expected_probabilities(values: np.ndarray) -> np.ndarray:
    z = (values - values.mean()) / values.std()
    return torch.softmax(torch.tensor(np.stack([0 * z, 3 * z, -3 * z])), 0).numpy()


# ---------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------
def test_prediction_has_input_shape_and_affine_oblique_anisotropic(tmp_path):
    from medseg.inference import Segmenter

    write_checkpoint(tmp_path / "run")
    seg = Segmenter.from_checkpoint(tmp_path / "run", device="cpu", tta=False)
    affine = oblique_affine(spacing_mm=(0.7, 1.1, 3.0))
    image = Volume(
        np.random.default_rng(0).normal(size=(1, 23, 19, 9)).astype(np.float32) + 3,
        affine,
        meta={"path": "x.nii.gz", "nifti_sform_code": 2},
    )
    label = seg.predict(image)
    assert label.kind == "label" and label.spatial_shape == image.spatial_shape
    assert np.array_equal(label.affine, image.affine)
    assert set(np.unique(label.array)) <= {0, 1, 2}
    assert label.meta["nifti_sform_code"] == 2 and label.meta["source_image"] == "x.nii.gz"


@pytest.mark.parametrize("spacing", [(0.7, 1.1, 3.0), (1.3, 0.6, 2.2)])
def test_probabilities_land_on_the_input_grid(spacing):
    """A network whose output is a function of intensity must give back that function, voxel by voxel."""
    from medseg.model.transforms import inference_transforms, invert_prediction

    seg = segmenter(IntensityNet())
    affine = oblique_affine(spacing_mm=spacing)
    image, values = smooth_volume(affine)
    probabilities = seg.predict_probabilities(image)
    assert probabilities.same_geometry(image) and probabilities.num_channels == 3
    expected = expected_probabilities(values)
    correlation = np.corrcoef(probabilities.array[1].ravel(), expected[1].ravel())[0, 1]
    assert correlation > 0.995
    flipped = np.corrcoef(probabilities.array[1][::-1].ravel(), expected[1].ravel())[0, 1]
    assert flipped < 0.9  # the check can tell a flipped map
    # cross-check with MONAI's own inverse (transforms.invert_prediction)
    chain = inference_transforms(seg.plans, "3d")
    data = chain({"image": image})
    network_probs = seg._ensemble_probabilities(data["image"].as_tensor().float())
    monai_inverse = invert_prediction(chain, data, network_probs).numpy()
    assert np.abs(monai_inverse - probabilities.array).max() < 1e-4


def test_no_interpolation_when_grids_coincide():
    seg = segmenter(IntensityNet())
    image, _ = smooth_volume(np.diag([1.0, 1.0, 1.5, 1.0]), shape=(20, 18, 17))
    probabilities = seg.predict_probabilities(image)
    from medseg.model.transforms import inference_transforms

    data = inference_transforms(seg.plans, "3d")({"image": image})
    direct = seg._ensemble_probabilities(data["image"].as_tensor().float()).numpy()
    assert np.array_equal(probabilities.array, direct)


@pytest.mark.parametrize("config", ["3d", "2d"])
@pytest.mark.parametrize("tta", [False, True])
def test_prediction_and_validation_share_one_engine(config, tta):
    """Prediction's probabilities are the softmax of the engine's logits that validation argmaxes."""
    from medseg.model.networks import build_network
    from medseg.model.transforms import inference_transforms
    from medseg.model.windows import sliding_window_logits

    plans = tiny_plans()
    torch.manual_seed(1)
    network = build_network(plans["configurations"][config], in_channels=1, out_channels=3)
    seg = segmenter(network, plans=plans, config=config, tta=tta, precision="float32")  # validation's precision
    image = Volume(np.random.default_rng(2).normal(size=(1, 30, 25, 12)).astype(np.float32), oblique_affine())
    data = inference_transforms(plans, config)({"image": image})
    ours = seg._ensemble_probabilities(data["image"].as_tensor().float())
    logits = sliding_window_logits(
        network,
        data["image"],
        plans_config=plans["configurations"][config],
        num_classes=3,
        overlap=0.5,
        mirror=tta,
        sw_batch_size=seg.sw_batch_size,
    )
    assert ours.shape == logits.shape
    assert float((ours - torch.softmax(logits, 0)).abs().max()) < 1e-5


def test_2d_model_slice_by_slice_on_a_3d_volume(tmp_path):
    from medseg.inference import Segmenter

    write_checkpoint(tmp_path / "run2d", config="2d")
    seg = Segmenter.from_checkpoint(tmp_path / "run2d", device="cpu", tta=True)
    image = Volume(np.random.default_rng(3).normal(size=(1, 21, 18, 7)).astype(np.float32), oblique_affine())
    label = seg.predict(image)
    assert label.spatial_shape == image.spatial_shape and np.array_equal(label.affine, image.affine)
    # slice independence: a 2D network sees each slice alone, so changing one slice leaves the others
    seg_notta = segmenter(IntensityNet(), config="2d")
    plans = tiny_plans(spacing=(1.0, 1.0, 1.0))
    seg_notta = segmenter(IntensityNet(), plans=plans, config="2d")
    cube, values = smooth_volume(np.eye(4), shape=(20, 20, 6))
    probabilities = seg_notta.predict_probabilities(cube)
    assert np.corrcoef(probabilities.array[1].ravel(), expected_probabilities(values)[1].ravel())[0, 1] > 0.99


def test_2d_images_with_2d_plans_and_non_contiguous_label_ids():
    """A PNG-like 2D image (DRIVE's labels 0/255): class index 1 is written as label 255."""
    plans = tiny_plans()
    plans["normalization"] = [{"channel": "R", "scheme": "zscore"}]
    plans["configurations"] = {"3d": {**plans["configurations"]["2d"], "spacing_mm": [1.0, 1.0]}}
    del plans["configurations"]["3d"]["slice_axis"]
    seg = segmenter(IntensityNet(classes=2), plans=plans, labels={"0": "background", "255": "vessel"}, tta=True)
    array = np.full((1, 40, 33), 10.0, np.float32)
    array[0, 10:20, 5:25] = 100.0
    image = Volume(array, np.eye(4))
    label = seg.predict(image)
    assert label.spatial_shape == (40, 33) and np.array_equal(label.affine, image.affine)
    assert set(np.unique(label.array)) == {0, 255}
    assert np.array_equal(label.array[0] == 255, array[0] > 50)


def test_2d_image_with_a_2d_configuration_of_3d_plans():
    seg = segmenter(IntensityNet(), config="2d")
    image = Volume(np.random.default_rng(4).normal(size=(1, 30, 22)).astype(np.float32), np.diag([0.5, 0.5, 1, 1]))
    label = seg.predict(image)
    assert label.spatial_shape == (30, 22) and np.array_equal(label.affine, image.affine)


# ---------------------------------------------------------------------------------------------
# determinism, TTA, ensembles
# ---------------------------------------------------------------------------------------------
def test_prediction_is_deterministic(tmp_path):
    from medseg.inference import Segmenter

    write_checkpoint(tmp_path / "run")
    image = Volume(np.random.default_rng(5).normal(size=(1, 20, 20, 10)).astype(np.float32), oblique_affine())
    first = Segmenter.from_checkpoint(tmp_path / "run", device="cpu").predict_probabilities(image)
    second = Segmenter.from_checkpoint(tmp_path / "run", device="cpu").predict_probabilities(image)
    assert np.array_equal(first.array, second.array)


def test_mirroring_tta_makes_prediction_flip_equivariant():
    from medseg.model.networks import build_network

    plans = tiny_plans(spacing=(1.0, 1.0, 1.0))
    torch.manual_seed(7)
    network = build_network(plans["configurations"]["3d"], in_channels=1, out_channels=3)
    array = np.random.default_rng(6).normal(size=(1, 16, 16, 16)).astype(np.float32) + 10  # one window, no crop
    image = Volume(array, np.eye(4))
    mirrored = Volume(np.ascontiguousarray(array[:, ::-1]), np.eye(4))
    gaps = {}
    for tta in (False, True):
        seg = segmenter(copy.deepcopy(network), plans=plans, tta=tta)
        a = seg.predict_probabilities(image).array
        b = seg.predict_probabilities(mirrored).array
        gaps[tta] = float(np.abs(a[:, ::-1] - b).max())
    assert gaps[True] < 1e-5
    assert gaps[False] > 1e-3  # without TTA the random network is not equivariant


def test_fold_ensemble_is_the_mean_of_fold_softmaxes(tmp_path):
    from medseg.inference import Segmenter
    from medseg.model.checkpoint import resolve_checkpoints

    write_checkpoint(tmp_path / "model" / "fold_0", seed=0)
    write_checkpoint(tmp_path / "model" / "fold_1", seed=1)
    assert len(resolve_checkpoints(tmp_path / "model")) == 2
    image = Volume(np.random.default_rng(8).normal(size=(1, 18, 17, 9)).astype(np.float32), oblique_affine())
    ensemble = Segmenter.from_checkpoint(tmp_path / "model", device="cpu", tta=False)
    assert len(ensemble.networks) == 2 and len(ensemble.describe()["checkpoints"]) == 2
    folds = [
        Segmenter.from_checkpoint(tmp_path / "model" / f"fold_{k}", device="cpu", tta=False)
        .predict_probabilities(image)
        .array
        for k in range(2)
    ]
    assert np.abs(folds[0] - folds[1]).max() > 1e-3
    assert np.abs(ensemble.predict_probabilities(image).array - (folds[0] + folds[1]) / 2).max() < 1e-5


def test_folds_with_different_plans_are_refused(tmp_path):
    from medseg.inference import Segmenter

    write_checkpoint(tmp_path / "a")
    write_checkpoint(tmp_path / "b", plans=tiny_plans(spacing=(2.0, 2.0, 2.0)))
    with pytest.raises(CheckpointError, match="plans differ"):
        Segmenter.from_checkpoint([tmp_path / "a", tmp_path / "b"], device="cpu")


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------
def test_bad_checkpoints_give_clear_errors(tmp_path):
    from medseg.inference import Segmenter
    from medseg.model.checkpoint import save_checkpoint

    good = write_checkpoint(tmp_path / "run")
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("hello")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    newer = save_checkpoint(
        {"format_version": 99, "model": {}, "plans": {}, "config": "3d", "labels": {}}, tmp_path / "newer.pt"
    )
    for path, pattern in (
        (not_a_checkpoint, "not a readable checkpoint"),
        (truncated, "not a readable checkpoint"),
        (newer, "newer"),
        (tmp_path / "missing.pt", "not found"),
        (tmp_path / "empty_dir", "checkpoint_last.pt"),
    ):
        if path.name == "empty_dir":
            path.mkdir()
        with pytest.raises(CheckpointError, match=pattern) as caught:
            Segmenter.from_checkpoint(path, device="cpu")
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_wrong_channel_count_is_a_user_error(tmp_path):
    seg = segmenter(IntensityNet())
    image = Volume(np.zeros((2, 8, 8, 8), np.float32), np.eye(4), meta={"path": "two.nii.gz"})
    with pytest.raises(MedsegUserError, match="two.nii.gz: 2 channel"):
        seg.predict(image)


@pytest.mark.shared_data
def test_real_hippocampus_case_round_trips_in_its_own_geometry(shared_data, tmp_path):
    """A real MSD case: predicted, written and read back on exactly the image's grid (NIfTI codes kept)."""
    from medseg.io import read_volume, write_volume

    images = sorted((shared_data / "msd_hippocampus" / "imagesTr").glob("*.nii.gz"))
    if not images:
        pytest.skip("no hippocampus images")
    image = read_volume(images[0])
    plans = tiny_plans(spacing=(1.0, 1.0, 1.0))
    seg = segmenter(IntensityNet(), plans=plans, tta=True)
    written = write_volume(seg.predict(image), tmp_path / images[0].name)
    label = read_volume(written, kind="label")
    assert label.spatial_shape == image.spatial_shape
    assert np.allclose(label.affine, image.affine, atol=1e-5)
    assert label.meta["nifti_sform_code"] == image.meta["nifti_sform_code"]
    assert label.meta["nifti_qform_code"] == image.meta["nifti_qform_code"]


@pytest.mark.gpu
def test_cuda_prediction_with_amp_matches_cpu(tmp_path):
    """On CUDA the network (float16 autocast), blending, resampling and argmax run on the GPU."""
    from medseg.inference import Segmenter

    write_checkpoint(tmp_path / "run")
    image = Volume(np.random.default_rng(9).normal(size=(1, 40, 36, 20)).astype(np.float32), oblique_affine())
    cpu = Segmenter.from_checkpoint(tmp_path / "run", device="cpu").predict_probabilities(image)
    gpu_seg = Segmenter.from_checkpoint(tmp_path / "run", device="cuda")
    assert gpu_seg.amp and next(gpu_seg.networks[0].parameters()).is_cuda
    gpu = gpu_seg.predict_probabilities(image)
    assert gpu.same_geometry(image)
    assert np.abs(gpu.array - cpu.array).max() < 2e-2  # float16 autocast


def test_mixed_precision_runs_the_network_in_bfloat16_on_the_cpu_and_stays_close():
    """``precision="mixed"`` autocasts the network to bfloat16 on the CPU; the blended probabilities stay float32
    and close to float32's (bfloat16 keeps 8 mantissa bits: about 3 significant digits)."""
    from medseg.model.networks import build_network

    plans = tiny_plans()
    torch.manual_seed(1)
    network = build_network(plans["configurations"]["3d"], in_channels=1, out_channels=3)
    seen: list[torch.dtype] = []
    network.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    image = Volume(np.random.default_rng(2).normal(size=(1, 30, 25, 12)).astype(np.float32), oblique_affine())
    exact = segmenter(network, plans=plans, precision="float32").predict_probabilities(image)
    assert set(seen) == {torch.float32}
    seen.clear()
    mixed_seg = segmenter(network, plans=plans, precision="mixed")
    mixed = mixed_seg.predict_probabilities(image)
    assert set(seen) == {torch.bfloat16}
    assert mixed.array.dtype == exact.array.dtype == np.float32
    assert np.abs(mixed.array - exact.array).max() < 0.05
    assert mixed_seg.describe()["precision"] == "bfloat16"
    with pytest.raises(MedsegUserError, match="precision must be one of"):
        segmenter(network, plans=plans, precision="half")


def test_an_image_without_foreground_predicts_background_in_its_geometry():
    """An all-zero image leaves nothing after the foreground crop: background everywhere, not a crash."""
    from medseg.model.networks import build_network

    plans = tiny_plans()
    network = build_network(plans["configurations"]["3d"], in_channels=1, out_channels=3)
    image = Volume(np.zeros((1, 21, 18, 9), np.float32), oblique_affine())
    result = segmenter(network, plans=plans).predict_full(image, probabilities=True)
    assert result.labels.same_geometry(image) and not result.labels.array.any()
    assert result.probabilities is not None and result.probabilities.array.shape == (3, 21, 18, 9)
    assert np.array_equal(result.probabilities.array.sum(0), np.ones((21, 18, 9), np.float32))
