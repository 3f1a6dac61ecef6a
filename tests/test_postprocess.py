"""Postprocessing: components, rules chosen from validation Dice, instance and panoptic maps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medseg.core.labels import LabelSet
from medseg.core.volume import Volume
from medseg.errors import MedsegUserError
from medseg.inference.postprocess import (
    PANOPTIC_DIVISOR,
    apply_postprocessing,
    determine_postprocessing,
    instance_maps,
    keep_largest_component,
    load_postprocessing,
    remove_small_components,
    save_postprocessing,
)

LABELS = LabelSet.from_manifest({"0": "background", "1": "organ", "2": "lesion"})


def ball(shape, centre, radius):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    return ((grid - np.asarray(centre)) ** 2).sum(-1) <= radius**2


def test_keep_largest_and_remove_small():
    mask = ball((20, 20, 20), (6, 6, 6), 4) | ball((20, 20, 20), (16, 16, 16), 2)
    largest = keep_largest_component(mask)
    assert np.array_equal(largest, ball((20, 20, 20), (6, 6, 6), 4))
    small = int(ball((20, 20, 20), (16, 16, 16), 2).sum())
    assert np.array_equal(remove_small_components(mask, min_voxels=small + 1), largest)
    assert np.array_equal(remove_small_components(mask, min_voxels=small), mask)
    assert not keep_largest_component(np.zeros((4, 4), bool)).any()
    # diagonal neighbours are one component with full connectivity, two with face connectivity
    diagonal = np.zeros((3, 3), bool)
    diagonal[0, 0] = diagonal[1, 1] = True
    assert keep_largest_component(diagonal).sum() == 2
    assert keep_largest_component(diagonal, connectivity=1).sum() == 1


def _cases(num_cases=4):
    """Organ: one blob, predicted with a spurious far blob. Lesion: two real blobs, predicted exactly."""
    shape = (24, 24, 24)
    references, predictions = [], []
    for index in range(num_cases):
        ref = np.zeros(shape, np.uint8)
        ref[ball(shape, (8, 8, 8 + index % 2), 5)] = 1
        ref[ball(shape, (19, 19, 5), 2)] = 2
        ref[ball(shape, (19, 5, 19), 2)] = 2
        pred = ref.copy()
        pred[ball(shape, (20, 20, 20), 2)] = 1  # false positive of the organ, far away
        pred[ball(shape, (8, 8, 8 + index % 2), 5) & (np.indices(shape)[0] > 12)] = 0
        references.append(Volume(ref[None], np.diag([1.0, 1.0, 2.0, 1.0]), kind="label"))
        predictions.append(Volume(pred[None], np.diag([1.0, 1.0, 2.0, 1.0]), kind="label"))
    return references, predictions


def test_rules_are_kept_only_where_they_improve_validation_dice():
    references, predictions = _cases()
    rules = determine_postprocessing(references, predictions, labels=LABELS)
    assert rules["rules"]["organ"]["keep_largest"] is True
    assert rules["validation"]["organ"]["dice"] > rules["validation"]["organ"]["baseline_dice"]
    # keeping the largest lesion would drop a true lesion: not chosen; removing small ones neither
    assert rules["rules"]["lesion"] == {"keep_largest": False, "min_size_mm3": None}
    assert rules["validation"]["lesion"]["dice"] == rules["validation"]["lesion"]["baseline_dice"] == 1.0


def test_thing_structures_never_keep_only_the_largest_but_may_lose_small_specks():
    references, predictions = _cases()
    for prediction in predictions:
        prediction.array[0][0, 0, 0] = 2  # a one-voxel speck of "lesion"
    rules = determine_postprocessing(references, predictions, labels=LABELS, things=("lesion",))
    assert rules["rules"]["lesion"]["keep_largest"] is False
    assert rules["rules"]["lesion"]["min_size_mm3"] is not None
    smallest_reference_mm3 = int(ball((24, 24, 24), (19, 19, 5), 2).sum()) * 2.0
    assert rules["rules"]["lesion"]["min_size_mm3"] < smallest_reference_mm3


def test_apply_postprocessing_uses_mm3_and_sets_removed_voxels_to_background():
    array = np.zeros((20, 20, 20), np.uint8)
    array[ball(array.shape, (6, 6, 6), 4)] = 1
    array[ball(array.shape, (16, 16, 16), 1)] = 1  # 7 voxels
    spacing = (1.0, 1.0, 2.0)  # 14 mm3
    kept = apply_postprocessing(array, {"rules": {"organ": {"min_size_mm3": 15.0}}}, labels=LABELS, spacing_mm=spacing)
    assert kept[16, 16, 16] == 0 and kept[6, 6, 6] == 1
    kept = apply_postprocessing(array, {"rules": {"organ": {"min_size_mm3": 13.0}}}, labels=LABELS, spacing_mm=spacing)
    assert kept[16, 16, 16] == 1
    assert array[16, 16, 16] == 1  # the input is not modified


def test_rules_round_trip_and_are_applied_by_the_segmenter(tmp_path):
    torch = pytest.importorskip("torch")
    from test_inference import IntensityNet, tiny_plans

    from medseg.inference import Segmenter

    path = save_postprocessing(
        {"format_version": 1, "rules": {"a": {"keep_largest": True, "min_size_mm3": None}}}, tmp_path
    )
    assert path.name == "postprocessing.json" and load_postprocessing(tmp_path)["rules"]["a"]["keep_largest"]
    array = np.full((1, 24, 24, 16), 1.0, np.float32)
    array[0][ball((24, 24, 16), (7, 7, 8), 5)] = 10.0
    array[0][ball((24, 24, 16), (18, 18, 8), 2)] = 10.0
    image = Volume(array, np.diag([1.0, 1.0, 1.5, 1.0]))
    labels = LabelSet.from_manifest({"0": "background", "1": "a", "2": "b"})
    plain = Segmenter([IntensityNet()], plans=tiny_plans(), config="3d", labels=labels, device="cpu", tta=False)
    cleaned = Segmenter(
        [IntensityNet()],
        plans=tiny_plans(),
        config="3d",
        labels=labels,
        device="cpu",
        tta=False,
        postprocessing=load_postprocessing(path),
    )
    before, after = plain.predict(image).array[0], cleaned.predict(image).array[0]
    assert before[18, 18, 8] == 1 and after[18, 18, 8] == 0 and after[7, 7, 8] == 1
    assert torch is not None


def test_newer_or_invalid_rules_are_refused(tmp_path):
    (tmp_path / "postprocessing.json").write_text(json.dumps({"format_version": 9, "rules": {}}))
    with pytest.raises(MedsegUserError, match="newer"):
        load_postprocessing(tmp_path)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(MedsegUserError, match="bad.json"):
        load_postprocessing(tmp_path / "bad.json")


def test_instance_and_panoptic_maps():
    shape = (30, 30, 30)
    array = np.zeros(shape, np.uint8)
    array[ball(shape, (8, 8, 8), 3)] = 2
    array[ball(shape, (22, 22, 22), 3)] = 2
    array[ball(shape, (8, 22, 8), 3)] = 1  # stuff
    instances, panoptic = instance_maps(array, labels=LABELS, things=("lesion",), spacing_mm=(1, 1, 1))
    assert sorted(np.unique(instances)) == [0, 1, 2]
    assert instances[8, 8, 8] != instances[22, 22, 22] and instances[8, 22, 8] == 0
    assert set(np.unique(panoptic)) == {0, 1 * PANOPTIC_DIVISOR, 2 * PANOPTIC_DIVISOR + 1, 2 * PANOPTIC_DIVISOR + 2}
    assert np.array_equal(panoptic // PANOPTIC_DIVISOR, array)


def test_more_instances_than_the_panoptic_encoding_numbers_keep_the_instance_map():
    """1200 one-voxel lesions (an untrained model's speckle): the instance map numbers them all, the panoptic
    map (label x 1000 + instance) cannot and is None instead of failing the case."""
    array = np.zeros((40, 40, 6), np.uint8)
    array[::2, ::2, ::2] = 2  # 20 x 20 x 3 = 1200 isolated voxels
    array[1, 1, 1] = 1
    instances, panoptic = instance_maps(array, labels=LABELS, things=("lesion",), spacing_mm=(1, 1, 1))
    assert panoptic is None
    assert instances.max() == 1200 and np.array_equal(instances > 0, array == 2)
    few = array.copy()
    few[10:, :, :] = 0
    instances, panoptic = instance_maps(few, labels=LABELS, things=("lesion",), spacing_mm=(1, 1, 1))
    assert panoptic is not None and np.array_equal(panoptic // PANOPTIC_DIVISOR, few)


def test_watershed_splits_touching_lesions():
    shape = (40, 30, 30)
    array = np.zeros(shape, np.uint8)
    array[ball(shape, (12, 15, 15), 7) | ball(shape, (25, 15, 15), 7)] = 2  # two overlapping balls, one component
    plain, _ = instance_maps(array, labels=LABELS, things=("lesion",), spacing_mm=(1, 1, 1))
    split, panoptic = instance_maps(
        array, labels=LABELS, things=("lesion",), spacing_mm=(1, 1, 1), watershed=True, min_distance_mm=5.0
    )
    assert plain.max() == 1
    assert split.max() == 2 and split[12, 15, 15] != split[25, 15, 15]
    assert np.array_equal(split > 0, array > 0)
    assert np.array_equal(panoptic // PANOPTIC_DIVISOR, array)


def test_rules_from_runs_predict_each_folds_validation_cases(tmp_path):
    torch = pytest.importorskip("torch")
    from conftest import make_dataset
    from test_inference import write_checkpoint

    from medseg.inference import determine_postprocessing_for_runs

    manifest = make_dataset(tmp_path / "data", num_cases=3)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = []
        for fold, cases in enumerate((["case_000"], ["case_001", "case_002"])):
            run = tmp_path / "model" / f"fold_{fold}"
            write_checkpoint(run, seed=fold, labels={"0": "background", "1": "front", "2": "back"})
            (run / "resolved_config.json").write_text(
                json.dumps(
                    {
                        "manifest": {"path": str(manifest), "data_root": str(tmp_path / "data"), "things": []},
                        "validation_cases": cases,
                    }
                )
            )
            runs.append(run)
        rules = determine_postprocessing_for_runs(runs, device="cpu", progress=False)
    finally:
        torch.set_num_threads(previous)
    assert set(rules["rules"]) == {"front", "back"} and rules["validation"]["front"]["num_cases"] == 3
    assert load_postprocessing(tmp_path / "model")["rules"] == rules["rules"]  # beside the fold folders
    from medseg.inference import Segmenter

    assert Segmenter.from_checkpoint(tmp_path / "model", device="cpu").postprocessing["rules"] == rules["rules"]
    assert Segmenter.from_checkpoint(tmp_path / "model", device="cpu", postprocessing=None).postprocessing is None
