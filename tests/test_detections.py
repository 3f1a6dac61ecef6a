"""A detection model's instances: windows, linking across slices, the input grid, the table, and evaluate --scores."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from medseg.inference.detections import (
    SliceInstances,
    link_slices,
    panoptic_from_instances,
    renumber_by_score,
    window_starts,
    write_instance_table,
)
from medseg.inference.invert import ids_to_input_grid


def test_window_starts_cover_the_axis_half_a_patch_apart() -> None:
    assert window_starts(10, 32) == [0]
    assert window_starts(64, 32) == [0, 16, 32]
    assert window_starts(70, 32) == [0, 16, 32, 38]
    assert window_starts(32, 32) == [0]


def _disc(shape, centre, radius) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def test_slices_are_linked_by_class_and_overlap_with_area_weighted_scores() -> None:
    shape = (20, 20)
    slices = []
    for k in range(5):
        instance_map = np.zeros(shape, np.int32)
        scores, classes = [], []
        if k < 3:  # one lesion through slices 0-2, shrinking
            instance_map[_disc(shape, (5, 5), 4 - k)] = len(scores) + 1
            scores.append(0.9 - 0.1 * k)
            classes.append(1)
        if k in (1, 2):  # another class on the same spot in 1-2: never linked to the first
            spot = _disc(shape, (14, 14), 3)
            instance_map[spot] = len(scores) + 1
            scores.append(0.5)
            classes.append(2 if k == 1 else 1)  # slice 2's is class 1: no link to slice 1's class 2
        if k == 4:  # after an empty slice: a new instance
            instance_map[_disc(shape, (5, 5), 2)] = 1
            scores.append(0.7)
            classes.append(1)
        slices.append(SliceInstances(instance_map, scores, classes))
    linked, info = link_slices(slices)
    first = {int(linked[k][5, 5]) for k in range(3)}
    assert len(first) == 1 and first != {0}
    lesion = first.pop()
    areas = [int(_disc(shape, (5, 5), 4 - k).sum()) for k in range(3)]
    expected = sum(a * s for a, s in zip(areas, (0.9, 0.8, 0.7))) / sum(areas)
    assert info[lesion]["class"] == 1 and info[lesion]["score"] == pytest.approx(expected)
    assert linked[1][14, 14] != linked[2][14, 14]  # class 2 then class 1: two instances
    assert linked[4][5, 5] not in (0, lesion)
    assert len(info) == 4
    stacked = np.stack(linked, axis=-1)
    renumbered, rows = renumber_by_score(stacked, info)
    assert [r["instance_id"] for r in rows] == [1, 2, 3, 4]
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    assert int(renumbered[5, 5, 0]) == 1  # the best-scoring lesion is instance 1


def test_instance_ids_reach_the_input_grid_by_nearest_neighbour() -> None:
    ids = np.zeros((6, 8, 4), np.int32)
    ids[1:3, 2:5, 1] = 7
    same = ids_to_input_grid(ids, np.eye(4), np.eye(4), ids.shape)
    np.testing.assert_array_equal(same, ids)
    # the input grid at half the spacing: every input voxel takes the nearest coarse voxel
    fine = np.diag([0.5, 0.5, 0.5, 1.0])
    out = ids_to_input_grid(ids, np.eye(4), fine, (12, 16, 8))
    i, j, k = np.meshgrid(np.arange(12), np.arange(16), np.arange(8), indexing="ij")
    nearest = ids[
        np.clip(np.rint(i * 0.5).astype(int), 0, 5),
        np.clip(np.rint(j * 0.5).astype(int), 0, 7),
        np.clip(np.rint(k * 0.5).astype(int), 0, 3),
    ]
    inside = (np.rint(i * 0.5) <= 5) & (np.rint(j * 0.5) <= 7) & (np.rint(k * 0.5) <= 3)
    np.testing.assert_array_equal(out, np.where(inside, nearest, 0))
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0])
    flipped[0, 3] = 5.0  # the same voxels, the first axis reversed
    np.testing.assert_array_equal(ids_to_input_grid(ids, np.eye(4), flipped, ids.shape), ids[::-1])


def test_panoptic_map_and_table_file(tmp_path) -> None:
    labels = np.zeros((4, 4), np.int32)
    labels[:2, :2] = 2
    labels[2:, 2:] = 2
    labels[0, 3] = 1  # stuff: no instance
    instances = np.zeros((4, 4), np.int32)
    instances[:2, :2] = 1
    instances[2:, 2:] = 2
    table = [
        {"instance_id": 1, "label": 2, "structure": "lesion", "score": 0.9, "voxels": 4, "volume_ml": 0.004},
        {"instance_id": 2, "label": 2, "structure": "lesion", "score": 0.6, "voxels": 4, "volume_ml": 0.004},
    ]
    panoptic = panoptic_from_instances(labels, instances, table, divisor=1000)
    assert panoptic[0, 0] == 2001 and panoptic[3, 3] == 2002 and panoptic[0, 3] == 1000 and panoptic[1, 3] == 0
    assert panoptic_from_instances(labels, instances, table, divisor=2) is None  # 2 lesions: beyond a divisor of 2
    path = write_instance_table(table, tmp_path / "instances" / "case.csv")
    rows = list(csv.DictReader(open(path)))
    assert [r["instance_id"] for r in rows] == ["1", "2"] and rows[0]["score"] == "0.9"


def _lesion_case(root, *, with_row_for_every_id: bool = True):
    """A reference with two lesions; a prediction finding one exactly and a false positive, with scores."""
    shape = (24, 24, 6)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    reference = np.zeros(shape, np.uint8)
    reference[2:8, 2:8, 1:4] = 1
    reference[14:20, 14:20, 2:5] = 1
    prediction = np.zeros(shape, np.uint8)
    prediction[2:8, 2:8, 1:4] = 1  # a hit
    prediction[14:18, 2:6, 2:4] = 1  # a false positive
    instances = np.zeros(shape, np.int32)
    instances[2:8, 2:8, 1:4] = 1
    instances[14:18, 2:6, 2:4] = 2
    for folder, array in (("ref", reference), ("pred", prediction), ("inst", instances)):
        (root / folder).mkdir(parents=True)
        nib.save(nib.Nifti1Image(array, affine), root / folder / "case_1.nii.gz")
    rows = [{"instance_id": 1, "label": 1, "structure": "lesion", "score": 0.4, "voxels": 108, "volume_ml": 0.2}]
    if with_row_for_every_id:
        rows.append({"instance_id": 2, "label": 1, "structure": "lesion", "score": 0.9, "voxels": 32, "volume_ml": 0.1})
    write_instance_table(rows, root / "inst" / "case_1.csv")
    (root / "labels.json").write_text(
        json.dumps({"name": "l", "labels": {"0": "background", "1": "lesion"}, "training": []})
    )


def test_evaluate_scores_uses_the_detectors_instances_and_scores(tmp_path) -> None:
    from medseg.evaluation import evaluate

    _lesion_case(tmp_path)
    kwargs = dict(labels=tmp_path / "labels.json", things=["lesion"])
    scored = evaluate(tmp_path / "ref", tmp_path / "pred", scores=tmp_path / "inst", **kwargs)
    summary = scored.lesion_summary.iloc[0]
    assert (summary["tp"], summary["fp"], summary["fn"]) == (1, 1, 1) and bool(summary["ap_scored"])
    # the false positive outranks the hit: precision 1/2 up to recall 1/2, COCO's 101 recall points
    # (0, 0.01, ..., 1): 51 of them reached -> AP50 = 51 x 0.5 / 101
    assert summary["ap50"] == pytest.approx(51 * 0.5 / 101)
    lesions = scored.lesions[scored.lesions["source"] == "prediction"].set_index("lesion_id")
    assert lesions.loc[1, "score"] == pytest.approx(0.4) and lesions.loc[2, "score"] == pytest.approx(0.9)
    unscored = evaluate(tmp_path / "ref", tmp_path / "pred", **kwargs).lesion_summary.iloc[0]
    assert not bool(unscored["ap_scored"])
    with pytest.raises(Exception, match="not both"):
        evaluate(
            tmp_path / "ref", tmp_path / "pred", scores=tmp_path / "inst", probabilities=tmp_path / "pred", **kwargs
        )


def test_evaluate_scores_names_an_instance_without_a_row(tmp_path) -> None:
    from medseg.evaluation import evaluate

    _lesion_case(tmp_path, with_row_for_every_id=False)
    result = evaluate(
        tmp_path / "ref",
        tmp_path / "pred",
        scores=tmp_path / "inst",
        labels=tmp_path / "labels.json",
        things=["lesion"],
    )
    assert result.cases.iloc[0]["status"] == "error"
    assert "instance ids [2] have no row in the score table" in result.cases.iloc[0]["message"]
