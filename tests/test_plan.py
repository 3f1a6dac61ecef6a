"""Planning rules: target spacing, anisotropy, topology, patch/batch limits, normalisation by modality."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SHARED_DATA, make_dataset

from medseg.data.manifest import load_manifest
from medseg.errors import LabelValueError, MedsegUserError
from medseg.planning import (
    AUGMENTATION_DEFAULTS,
    AUGMENTATION_PRESETS,
    DEFAULT_AUGMENTATION,
    check_plans_match,
    fingerprint_dataset,
    load_plans,
    make_plans,
    network_topology,
    plan_dataset,
    target_spacing,
)


def _fingerprint(spacings, shapes, channels=("MRI",)):
    return {
        "dataset": {
            "name": "synthetic",
            "labels": {"0": "background", "1": "organ"},
            "regions": {},
            "channels": list(channels),
        },
        "spacings_mm": spacings,
        "shapes": shapes,
        "intensity": [
            {"channel": c, "mean": 40.0, "sd": 10.0, "percentile_00_5": -100.0, "percentile_99_5": 200.0}
            for c in channels
        ],
    }


def test_target_spacing_is_the_median_for_isotropic_data() -> None:
    assert target_spacing([[1, 1, 1], [0.8, 1.2, 1.4], [0.9, 0.7, 1.0]]) == [0.9, 1.0, 1.0]


def test_anisotropic_low_resolution_axis_takes_its_10th_percentile() -> None:
    spacings = [[0.8, 0.8, s] for s in (2.5, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0, 6.0, 6.0, 6.0)]
    target = target_spacing(spacings)
    assert target[:2] == [0.8, 0.8]
    # median 5.0 > 3 x 0.8, so the 10th percentile of the z spacings is used instead
    assert target[2] == pytest.approx(np.percentile([s[2] for s in spacings], 10))
    assert target[2] < 5.0


def test_topology_pools_the_coarse_axis_only_once_spacings_are_similar() -> None:
    kernels, strides, patch = network_topology([160, 160, 20], [0.8, 0.8, 3.0], max_stages=6)
    assert strides[0] == [1, 1, 1]
    assert strides[1] == [2, 2, 1]  # z (3 mm) is more than twice as coarse as 0.8 mm
    assert kernels[0] == [3, 3, 1]  # no 3-wide kernel across the coarse axis at full resolution
    z_pools = [s[2] for s in strides]
    first_z_pool = z_pools.index(2)
    # by then the in-plane spacing has grown to within a factor 2 of 3 mm
    in_plane_spacing = 0.8 * np.prod([s[0] for s in strides[:first_z_pool]])
    assert 3.0 <= 2 * in_plane_spacing
    total = np.prod(np.array(strides), axis=0)
    assert all(p % t == 0 for p, t in zip(patch, total))
    assert all(p // t >= 4 for p, t in zip(patch, total))  # the deepest feature map is >= 4 voxels


def test_topology_respects_the_minimum_feature_map_and_max_stages() -> None:
    kernels, strides, patch = network_topology([35, 50, 36], [1.0, 1.0, 1.0], max_stages=5)
    assert patch == [40, 56, 40]
    assert len(strides) == 4 and strides[1:] == [[2, 2, 2]] * 3  # a 4th pooling would leave 2.5 voxels
    _, strides5, _ = network_topology([512, 512, 512], [1.0, 1.0, 1.0], max_stages=5)
    assert len(strides5) == 5


def test_patch_shrinks_under_the_voxel_cap_and_batch_is_bounded() -> None:
    plans = make_plans(_fingerprint([[1, 1, 1]] * 4, [[300, 300, 300]] * 4), max_patch_voxels=64**3)
    cfg = plans["configurations"]["3d"]
    assert np.prod(cfg["patch_size"]) <= 64**3
    assert 2 <= cfg["batch_size"] <= 4
    small = make_plans(_fingerprint([[1, 1, 1]] * 4, [[35, 50, 36]] * 4), memory_budget_gb=0.01)
    assert small["configurations"]["3d"]["batch_size"] == 2


def test_normalisation_is_chosen_by_modality() -> None:
    plans = make_plans(_fingerprint([[1, 1, 1]] * 2, [[32, 32, 32]] * 2, channels=("CT", "T1")))
    ct, t1 = plans["normalization"]
    assert ct["scheme"] == "ct" and ct["clip"] == [-100.0, 200.0] and ct["mean"] == 40.0 and ct["sd"] == 10.0
    assert t1 == {"channel": "T1", "scheme": "zscore"}


def test_2d_configuration_slices_across_the_coarsest_axis() -> None:
    plans = make_plans(_fingerprint([[0.8, 3.0, 0.8]] * 3, [[100, 20, 120]] * 3))
    cfg = plans["configurations"]["2d"]
    assert cfg["slice_axis"] == 1 and cfg["spatial_dims"] == 2
    assert len(cfg["patch_size"]) == 2 and cfg["patch_size"][0] >= 100 and cfg["patch_size"][1] >= 120


def test_fingerprint_of_a_tiny_dataset(tmp_path) -> None:
    manifest = load_manifest(make_dataset(tmp_path, num_cases=3))
    fingerprint = fingerprint_dataset(manifest, workers=1)
    assert fingerprint["num_cases"] == 3
    assert np.allclose(fingerprint["median_spacing_mm"], [0.7, 1.1, 3.0], atol=1e-4)
    assert fingerprint["median_shape"] == [8, 9, 7]
    # label 1 is a 3x4x3 box and label 2 a 2x4x3 box in every case
    assert fingerprint["class_voxels"]["1"] == 3 * 36 and fingerprint["class_voxels"]["2"] == 3 * 24
    assert fingerprint["class_voxels"]["0"] == 3 * (8 * 9 * 7 - 60)
    stats = fingerprint["intensity"][0]
    assert stats["percentile_00_5"] < stats["mean"] < stats["percentile_99_5"]
    json.dumps(fingerprint)  # plain JSON


def test_fingerprint_rejects_labels_outside_the_manifest(tmp_path) -> None:
    manifest = load_manifest(make_dataset(tmp_path, labels={"0": "background", "1": "front"}))
    with pytest.raises(LabelValueError, match=r"\[2\]"):
        fingerprint_dataset(manifest, workers=1)


def test_plan_dataset_writes_plans_and_fingerprint_and_detects_other_datasets(tmp_path) -> None:
    path = make_dataset(tmp_path / "data")
    plans = plan_dataset(path, out=tmp_path / "out" / "plans.json", workers=1)
    assert load_plans(tmp_path / "out" / "plans.json") == plans
    assert (tmp_path / "out" / "fingerprint.json").is_file()
    assert not list((tmp_path / "out").glob(".*partial*"))
    assert plans["dataset"]["labels"] == {"0": "background", "1": "front", "2": "back"}
    check_plans_match(plans, load_manifest(path))
    other = load_manifest(make_dataset(tmp_path / "other", labels={"0": "background", "1": "a", "2": "b"}))
    with pytest.raises(MedsegUserError, match="plans were made for dataset"):
        check_plans_match(plans, other)
    with pytest.raises(MedsegUserError, match="not found"):
        load_plans(tmp_path / "missing.json")


@pytest.mark.shared_data
def test_hippocampus_plans_match_nnunet() -> None:
    root = SHARED_DATA / "msd_hippocampus"
    if not root.is_dir():
        pytest.skip("hippocampus data not found")
    manifest = load_manifest(root / "dataset.json")
    fingerprint = fingerprint_dataset(manifest, cases=manifest.cases[:40], workers=2)
    plans = make_plans(fingerprint)
    cfg = plans["configurations"]["3d"]
    assert cfg["spacing_mm"] == [1.0, 1.0, 1.0]
    assert cfg["patch_size"] == [40, 56, 40]  # nnU-Net 3d_fullres patch for Task04
    assert plans["normalization"][0]["scheme"] == "zscore"


def test_2d_datasets_get_a_2d_configuration_only() -> None:
    from medseg.errors import MedsegUserError

    fingerprint = _fingerprint([[1, 1, 1]] * 2, [[32, 32, 32]] * 2)
    fingerprint["spacings_mm"] = [[1.0, 1.0]] * 2
    fingerprint["shapes"] = [[565, 584]] * 2
    plans = make_plans(fingerprint)
    assert list(plans["configurations"]) == ["2d"]
    cfg = plans["configurations"]["2d"]
    assert cfg["slice_axis"] == 2 and cfg["spacing_mm"] == [1.0, 1.0, 1.0] and len(cfg["patch_size"]) == 2
    fingerprint["shapes"] = [[5, 6, 7, 8]] * 2
    with pytest.raises(MedsegUserError, match="2D images and 3D volumes"):
        make_plans(fingerprint)


def test_augmentation_presets_are_written_into_the_plans(tmp_path) -> None:
    from medseg.cli import main

    fingerprint = _fingerprint([[1, 1, 1]] * 2, [[32, 32, 32]] * 2)
    assert make_plans(fingerprint)["augmentation"] == AUGMENTATION_PRESETS[DEFAULT_AUGMENTATION]
    assert make_plans(fingerprint, augmentation="nnunet")["augmentation"] == AUGMENTATION_DEFAULTS
    assert make_plans(fingerprint, augmentation="mirror")["augmentation"]["rotate_scale"] == 0.0
    with pytest.raises(MedsegUserError, match="unknown augmentation preset 'heavy'"):
        make_plans(fingerprint, augmentation="heavy")
    manifest = make_dataset(tmp_path / "data", num_cases=2)
    out = tmp_path / "plans.json"
    assert main(["plan", str(manifest), "--out", str(out), "--augmentation", "nnunet"]) == 0
    assert json.loads(out.read_text(encoding="utf-8"))["augmentation"] == AUGMENTATION_DEFAULTS
    assert main(["plan", str(manifest), "--out", str(out), "--augmentation", "heavy"]) == 2
