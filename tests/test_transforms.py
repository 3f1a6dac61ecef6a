"""Transform chains: geometry identical to medseg.io, inverse back to the input grid, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import oblique_affine

from medseg.core.volume import Volume
from medseg.errors import MedsegUserError
from medseg.io import read_volume, write_volume
from medseg.model.transforms import (
    LoadVolumed,
    NormalizeChannelsd,
    inference_transforms,
    invert_prediction,
    metatensor_to_volume,
    training_augmentation,
    training_cache_transforms,
)
from medseg.planning.presets import AUGMENTATION_DEFAULTS, augmentation_probabilities


def _plans(spacing, patch=(16, 16, 8), schemes=None):
    return {
        "normalization": schemes or [{"channel": "MRI", "scheme": "zscore"}],
        "foreground_oversample": 1 / 3,
        "configurations": {
            "3d": {"spatial_dims": 3, "spacing_mm": list(spacing), "patch_size": list(patch)},
            "2d": {"spatial_dims": 2, "spacing_mm": list(spacing), "patch_size": list(patch[:2]), "slice_axis": 2},
        },
    }


def _phantom(affine, shape=(30, 26, 12)):
    rng = np.random.default_rng(0)
    image = np.zeros((1, *shape), np.float32)
    image[0, 4:26, 3:23, 2:10] = rng.random((22, 20, 8)) + 1.0
    label = np.zeros((1, *shape), np.uint8)
    label[0, 8:20, 6:15, 3:8] = 1
    label[0, 20:24, 6:15, 3:8] = 2
    return Volume(image, affine), Volume(label, affine, kind="label")


def test_load_gives_the_geometry_of_medseg_io(tmp_path) -> None:
    image, _ = _phantom(oblique_affine())
    write_volume(image, tmp_path / "img.nii.gz")
    loaded = LoadVolumed(("image",))({"image": [tmp_path / "img.nii.gz"]})["image"]
    reference = read_volume(tmp_path / "img.nii.gz")
    assert np.allclose(loaded.affine.numpy(), reference.affine)
    assert np.array_equal(loaded.numpy(), reference.array)


def test_inference_chain_inverse_restores_an_oblique_anisotropic_grid() -> None:
    image, _ = _phantom(oblique_affine(spacing_mm=(0.7, 1.1, 3.0)))
    plans = _plans((1.0, 1.0, 1.5))
    chain = inference_transforms(plans)
    data = chain({"image": image})
    preprocessed = data["image"]
    assert np.allclose(np.linalg.norm(preprocessed.affine.numpy()[:3, :3], axis=0), [1.0, 1.0, 1.5], atol=1e-4)
    assert preprocessed.shape[1:] != image.spatial_shape
    probabilities = torch.softmax(torch.randn(3, *preprocessed.shape[1:]), 0)
    restored = metatensor_to_volume(invert_prediction(chain, data, probabilities))
    assert restored.num_channels == 3
    assert image.geometry_differences(restored, tolerance_mm=1e-4) == []


def test_inverse_restores_content_of_a_reoriented_cropped_image() -> None:
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.diag([0.9, 0.9, 2.0, 1.0])
    lps[:3, 3] = [20.0, -15.0, 3.0]
    image, label = _phantom(lps)
    # non-zero box of the image holds label + 1, so the foreground crop removes a known margin
    values = ((image.array > 0) * (label.array + 1)).astype(np.float32)
    image = image.with_array(values)
    identity = [{"channel": "MRI", "scheme": "ct", "clip": [-1e9, 1e9], "mean": 0.0, "sd": 1.0}]
    chain = inference_transforms(_plans((0.9, 0.9, 2.0), schemes=identity))
    data = chain({"image": image})
    assert tuple(data["image"].shape[1:]) == (22, 20, 8)  # cropped to the non-zero box
    assert np.allclose(np.diag(data["image"].affine.numpy())[:3], [0.9, 0.9, 2.0])  # now RAS
    restored = metatensor_to_volume(invert_prediction(chain, data, data["image"].as_tensor(), nearest=True))
    assert image.geometry_differences(restored) == []
    assert np.array_equal(restored.array, image.array)


def test_normalisation_schemes() -> None:
    image = torch.tensor([[[[-2000.0, 0.0], [50.0, 3000.0]]], [[[1.0, 2.0], [3.0, 4.0]]]])
    schemes = [
        {"channel": "CT", "scheme": "ct", "clip": [-100.0, 200.0], "mean": 50.0, "sd": 25.0},
        {"channel": "T1", "scheme": "zscore"},
    ]
    out = NormalizeChannelsd(schemes)({"image": image})["image"]
    assert torch.allclose(out[0].flatten(), torch.tensor([-6.0, -2.0, 0.0, 6.0]))
    assert abs(float(out[1].mean())) < 1e-6 and abs(float(out[1].std(unbiased=False)) - 1.0) < 1e-5


def test_zscore_equals_monai_normalize_intensity_and_nnunet() -> None:
    """z-score with the population sd (ddof 0), as nnU-Net's ZScoreNormalization and MONAI's transform."""
    from monai.transforms import NormalizeIntensity

    image = torch.arange(48, dtype=torch.float32).reshape(2, 2, 3, 4) ** 1.5
    schemes = [{"channel": "T1", "scheme": "zscore"}, {"channel": "T2", "scheme": "zscore"}]
    ours = NormalizeChannelsd(schemes)({"image": image})["image"]
    monai = NormalizeIntensity(channel_wise=True)(image)
    assert torch.allclose(ours, torch.as_tensor(monai), atol=1e-6)
    array = image[1].numpy().astype(np.float64)
    nnunet = (array - array.mean()) / max(array.std(), 1e-8)  # nnU-Net v2 ZScoreNormalization, no mask
    assert np.allclose(ours[1].numpy(), nnunet, atol=1e-5)


def test_training_augmentation_gives_reproducible_patches() -> None:
    image, label = _phantom(np.diag([1.0, 1.0, 2.0, 1.0]))
    plans = _plans((1.0, 1.0, 2.0), patch=(16, 16, 8))
    cached = training_cache_transforms(plans)({"image": image, "label": label})
    cached = {k: (v.as_tensor() if hasattr(v, "as_tensor") else v) for k, v in cached.items()}
    cached["label"] = cached["label"].float()

    def patches(seed):
        augment = training_augmentation(plans, seed=seed)
        return [augment(dict(cached))[0] for _ in range(6)]

    first, second, other = patches(3), patches(3), patches(4)
    for a, b in zip(first, second):
        assert tuple(a["image"].shape) == (1, 16, 16, 8)
        assert torch.equal(torch.as_tensor(a["image"]), torch.as_tensor(b["image"]))
        assert set(torch.unique(torch.as_tensor(a["label"])).tolist()) <= {0.0, 1.0, 2.0}
    assert any(not torch.equal(torch.as_tensor(a["image"]), torch.as_tensor(c["image"])) for a, c in zip(first, other))


def test_2d_augmentation_works_on_slices() -> None:
    plans = _plans((1.0, 1.0, 2.0), patch=(16, 16, 8))
    augment = training_augmentation(plans, "2d", seed=0)
    data = {"image": torch.randn(1, 20, 18), "label": (torch.rand(1, 20, 18) > 0.7).float()}
    out = augment(data)[0]
    assert tuple(out["image"].shape) == (1, 16, 16)


def test_augmentation_probabilities_come_from_the_plans() -> None:
    plans = _plans((1.0, 1.0, 2.0))
    assert augmentation_probabilities(plans) == AUGMENTATION_DEFAULTS
    assert augmentation_probabilities({**plans, "augmentation": {"noise": 0}})["noise"] == 0.0
    for bad, message in [
        ({"rotation": 0.2}, "unknown augmentation"),
        ({"noise": 1.5}, "augmentation.noise must be a probability"),
        ({"gamma": "often"}, "augmentation.gamma must be a probability"),
        ([0.1], "must be an object"),
    ]:
        with pytest.raises(MedsegUserError, match=message):
            augmentation_probabilities({**plans, "augmentation": bad})


def test_switched_off_augmentation_leaves_the_patch_as_cropped() -> None:
    image, label = _phantom(np.diag([1.0, 1.0, 2.0, 1.0]))  # non-zero box 22 x 20 x 8
    plans = {**_plans((1.0, 1.0, 2.0), patch=(24, 20, 8)), "augmentation": dict.fromkeys(AUGMENTATION_DEFAULTS, 0.0)}
    cached = training_cache_transforms(plans)({"image": image, "label": label})
    cached = {k: (v.as_tensor() if hasattr(v, "as_tensor") else v) for k, v in cached.items()}
    cached["label"] = cached["label"].float()
    assert tuple(cached["image"].shape) == (1, 24, 20, 8)
    for seed in range(3):
        out = training_augmentation(plans, seed=seed)(dict(cached))[0]
        # the patch is the whole (already patch-sized) case, untouched
        assert torch.equal(torch.as_tensor(out["image"]), cached["image"])
        assert torch.equal(torch.as_tensor(out["label"]), cached["label"])
