"""Overlap metrics: confusion matrix, Dice/IoU/precision/recall/volumes with every status, mIoU."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from medseg.metrics import overlap as overlap_module
from medseg.metrics.overlap import (
    OVERLAP_KEYS,
    confusion_matrix,
    iou_per_class,
    miou_from_confusion,
    overlap_from_confusion,
    overlap_from_counts,
    overlap_metrics,
)


def _naive_confusion(ref: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (ref.ravel().astype(int), pred.ravel().astype(int)), 1)
    return cm


def _blob_labels(shape: tuple[int, ...], k: int, rng: np.random.Generator, background: float = 0.6) -> np.ndarray:
    smooth = ndimage.gaussian_filter(rng.random(shape), 2.0)
    edges = np.quantile(smooth, np.linspace(background, 1.0, k)[:-1])
    return np.digitize(smooth, edges).astype(np.uint8)


# --------------------------------------------------------------------------- confusion matrix
def test_confusion_matrix_hand_example_rows_are_reference():
    ref = np.array([[0, 0, 1], [1, 2, 2]])
    pred = np.array([[0, 1, 1], [2, 2, 0]])
    cm = confusion_matrix(ref, pred, num_classes=3)
    assert cm.dtype == np.int64
    assert cm.tolist() == [[1, 1, 0], [0, 1, 1], [1, 0, 1]]


@pytest.mark.parametrize("shape", [(37, 41), (13, 17, 19)])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int64, np.uint16])
def test_confusion_matrix_matches_naive_count(shape, dtype):
    rng = np.random.default_rng(0)
    ref = _blob_labels(shape, 5, rng).astype(dtype)
    pred = _blob_labels(shape, 5, rng).astype(dtype)
    cm = confusion_matrix(ref, pred, num_classes=5)
    np.testing.assert_array_equal(cm, _naive_confusion(ref, pred, 5))
    assert cm.sum() == ref.size


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_confusion_matrix_chunking_sparse_and_dense_paths(monkeypatch, chunk):
    rng = np.random.default_rng(1)
    sparse_ref = _blob_labels((9, 10, 11), 4, rng, background=0.9)
    sparse_pred = _blob_labels((9, 10, 11), 4, rng, background=0.9)
    dense_ref = rng.integers(0, 4, size=(9, 10, 11)).astype(np.uint8)
    dense_pred = rng.integers(0, 4, size=(9, 10, 11)).astype(np.uint8)
    empty = np.zeros((9, 10, 11), np.uint8)
    monkeypatch.setattr(overlap_module, "_CHUNK_VOXELS", chunk)
    for ref, pred in [(sparse_ref, sparse_pred), (dense_ref, dense_pred), (empty, empty), (empty, dense_pred)]:
        np.testing.assert_array_equal(confusion_matrix(ref, pred, num_classes=4), _naive_confusion(ref, pred, 4))


def test_confusion_matrix_non_contiguous_and_bool_inputs():
    rng = np.random.default_rng(2)
    ref = _blob_labels((20, 30, 12), 3, rng)
    pred = _blob_labels((20, 30, 12), 3, rng)
    ref_t, pred_t = ref.transpose(2, 0, 1), pred[:, ::-1].transpose(2, 0, 1)
    np.testing.assert_array_equal(confusion_matrix(ref_t, pred_t, num_classes=3), _naive_confusion(ref_t, pred_t, 3))
    a, b = ref > 0, pred > 0
    np.testing.assert_array_equal(confusion_matrix(a, b, num_classes=2), _naive_confusion(a, b, 2))


def test_confusion_matrix_names_offending_labels():
    ref = np.array([0, 1, 7, 9, 2])
    with pytest.raises(ValueError, match=r"reference has labels \[7, 9\] outside 0..2"):
        confusion_matrix(ref, np.zeros(5, int), num_classes=3)
    with pytest.raises(ValueError, match=r"prediction has labels \[-1\]"):
        confusion_matrix(np.zeros(5, int), np.array([0, -1, 0, 0, 0]), num_classes=3)


@pytest.mark.parametrize(
    "ref, pred, kwargs, message",
    [
        (np.zeros((2, 3), int), np.zeros((3, 2), int), {"num_classes": 2}, "shape"),
        (np.zeros(3, float), np.zeros(3, int), {"num_classes": 2}, "integer labels"),
        (np.zeros(3, int), np.zeros(3, int), {"num_classes": 0}, "num_classes"),
        (np.zeros(3, int), np.zeros(3, int), {"num_classes": 2.0}, "num_classes"),
    ],
)
def test_confusion_matrix_rejects_bad_input(ref, pred, kwargs, message):
    with pytest.raises(ValueError, match=message):
        confusion_matrix(ref, pred, **kwargs)


# --------------------------------------------------------------------------- counts -> metrics
def test_overlap_from_counts_ok_by_hand():
    out = overlap_from_counts(tp=6, fp=2, fn=4, voxel_volume_ml=0.5)
    assert out["status"] == "ok"
    assert out["dice"] == pytest.approx(12 / 18)
    assert out["iou"] == pytest.approx(6 / 12)
    assert out["precision"] == pytest.approx(6 / 8)
    assert out["recall"] == pytest.approx(6 / 10)
    assert out["ref_ml"] == pytest.approx(5.0)
    assert out["pred_ml"] == pytest.approx(4.0)
    assert out["volume_diff_ml"] == pytest.approx(-1.0)
    assert tuple(out) == OVERLAP_KEYS


@pytest.mark.parametrize(
    "counts, status, dice, precision, recall",
    [
        ({"tp": 0, "fp": 0, "fn": 0}, "both_empty", math.nan, math.nan, math.nan),
        ({"tp": 0, "fp": 5, "fn": 0}, "ref_empty", 0.0, 0.0, math.nan),
        ({"tp": 0, "fp": 0, "fn": 3}, "pred_empty", 0.0, math.nan, 0.0),
        ({"tp": 0, "fp": 2, "fn": 3}, "ok", 0.0, 0.0, 0.0),
    ],
)
def test_overlap_from_counts_every_status(counts, status, dice, precision, recall):
    out = overlap_from_counts(**counts, voxel_volume_ml=0.001)
    assert out["status"] == status
    for key, expected in (("dice", dice), ("iou", dice), ("precision", precision), ("recall", recall)):
        if math.isnan(expected):
            assert math.isnan(out[key]), key
        else:
            assert out[key] == expected, key
    assert out["ref_ml"] == pytest.approx((counts["tp"] + counts["fn"]) * 0.001)
    assert out["pred_ml"] == pytest.approx((counts["tp"] + counts["fp"]) * 0.001)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tp": -1, "fp": 0, "fn": 0, "voxel_volume_ml": 1.0},
        {"tp": 1.5, "fp": 0, "fn": 0, "voxel_volume_ml": 1.0},
        {"tp": 1, "fp": 0, "fn": 0, "voxel_volume_ml": 0.0},
        {"tp": 1, "fp": 0, "fn": 0, "voxel_volume_ml": float("nan")},
    ],
)
def test_overlap_from_counts_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        overlap_from_counts(**kwargs)


def test_overlap_metrics_2d_and_3d_by_hand():
    ref = np.zeros((6, 6), bool)
    ref[1:4, 1:4] = True  # 9 px
    pred = np.zeros((6, 6), bool)
    pred[2:5, 1:4] = True  # 9 px, 6 shared
    out = overlap_metrics(ref, pred, spacing_mm=(2.0, 0.5))
    assert out["dice"] == pytest.approx(12 / 18)
    assert out["iou"] == pytest.approx(6 / 12)
    assert out["ref_ml"] == pytest.approx(9 * 1.0 / 1000)
    cube = np.zeros((5, 5, 5), np.uint8)
    cube[1:3, 1:3, 1:3] = 1
    out3 = overlap_metrics(cube, cube, spacing_mm=(1.0, 2.0, 3.0))
    assert (out3["status"], out3["dice"], out3["iou"]) == ("ok", 1.0, 1.0)
    assert out3["ref_ml"] == pytest.approx(8 * 6 / 1000)


def test_overlap_metrics_single_voxel_and_statuses():
    one = np.zeros((4, 4, 4), bool)
    one[0, 0, 0] = True
    empty = np.zeros_like(one)
    assert overlap_metrics(one, one, spacing_mm=(1, 1, 1))["dice"] == 1.0
    assert overlap_metrics(empty, one, spacing_mm=(1, 1, 1))["status"] == "ref_empty"
    assert overlap_metrics(one, empty, spacing_mm=(1, 1, 1))["status"] == "pred_empty"
    assert overlap_metrics(empty, empty, spacing_mm=(1, 1, 1))["status"] == "both_empty"


def test_overlap_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="binary"):
        overlap_metrics(np.full((3, 3), 2), np.zeros((3, 3)), spacing_mm=(1, 1))
    with pytest.raises(ValueError, match="spacing_mm"):
        overlap_metrics(np.zeros((3, 3)), np.zeros((3, 3)), spacing_mm=(1, 1, 1))
    with pytest.raises(ValueError, match="shape"):
        overlap_metrics(np.zeros((3, 3)), np.zeros((3, 4)), spacing_mm=(1, 1))


def test_overlap_from_confusion_equals_mask_metrics():
    rng = np.random.default_rng(3)
    ref = _blob_labels((15, 16, 17), 4, rng)
    pred = _blob_labels((15, 16, 17), 4, rng)
    cm = confusion_matrix(ref, pred, num_classes=4)
    for label in range(1, 4):
        a = overlap_from_confusion(cm, label=label, spacing_mm=(0.5, 1.0, 2.0))
        b = overlap_metrics(ref == label, pred == label, spacing_mm=(0.5, 1.0, 2.0))
        assert a == pytest.approx(b)
    with pytest.raises(ValueError, match="label 4"):
        overlap_from_confusion(cm, label=4, spacing_mm=(1, 1, 1))


# --------------------------------------------------------------------------- mIoU
def test_iou_per_class_and_miou_by_hand():
    # rows reference, columns prediction
    cm = np.array([[10, 2, 0, 0], [1, 3, 0, 0], [4, 0, 4, 0], [0, 0, 0, 0]])
    ious = iou_per_class(cm)
    assert ious[1] == pytest.approx(3 / (4 + 5 - 3))
    assert ious[2] == pytest.approx(4 / (8 + 4 - 4))
    assert math.isnan(ious[3])  # absent from both -> excluded from the mean
    assert miou_from_confusion(cm) == pytest.approx((0.5 + 0.5) / 2)
    assert miou_from_confusion(cm, labels=[0, 1]) == pytest.approx((10 / 17 + 0.5) / 2)
    assert math.isnan(miou_from_confusion(cm, labels=[3]))


def test_dataset_miou_differs_from_mean_of_case_ious():
    # case 1: class 1 perfect (1 voxel); case 2: class 1 with IoU 1/3 on 3 voxels
    case1 = confusion_matrix(np.array([0, 1]), np.array([0, 1]), num_classes=2)
    case2 = confusion_matrix(np.array([1, 1, 0]), np.array([1, 0, 1]), num_classes=2)
    assert miou_from_confusion(case1) == 1.0
    assert miou_from_confusion(case2) == pytest.approx(1 / 3)
    assert miou_from_confusion(case1 + case2) == pytest.approx(2 / 4)


def test_miou_rejects_bad_matrix():
    with pytest.raises(ValueError, match="square"):
        miou_from_confusion(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="outside"):
        iou_per_class(np.eye(3), labels=[5])


# --------------------------------------------------------------------------- MONAI cross-check
def test_dice_iou_match_monai_on_random_blobs():
    import torch  # MONAI (and so torch) is a required dependency: this cross-check always runs
    from monai import metrics

    rng = np.random.default_rng(4)
    for shape in [(40, 50), (24, 20, 18)]:
        ref = _blob_labels(shape, 5, rng)
        pred = _blob_labels(shape, 5, rng)
        cm = confusion_matrix(ref, pred, num_classes=5)
        onehot_r = torch.from_numpy(np.stack([ref == k for k in range(1, 5)])[None].astype(np.float64))
        onehot_p = torch.from_numpy(np.stack([pred == k for k in range(1, 5)])[None].astype(np.float64))
        dice = metrics.compute_dice(onehot_p, onehot_r, include_background=True).numpy()[0]
        iou = metrics.compute_iou(onehot_p, onehot_r, include_background=True).numpy()[0]
        for k in range(1, 5):
            ours = overlap_from_confusion(cm, label=k, spacing_mm=(1.0,) * len(shape))
            assert ours["status"] == "ok"
            assert abs(ours["dice"] - dice[k - 1]) < 1e-9
            assert abs(ours["iou"] - iou[k - 1]) < 1e-9


@pytest.mark.slow
def test_confusion_matrix_large_volume_is_fast():
    import time

    rng = np.random.default_rng(5)
    ref = np.zeros((256, 256, 300), np.uint8)
    ref[40:200, 50:210, 30:250] = rng.integers(0, 10, size=(1, 1, 220), dtype=np.uint8)
    pred = np.roll(ref, 3, axis=0)
    start = time.perf_counter()
    cm = confusion_matrix(ref, pred, num_classes=10)
    elapsed = time.perf_counter() - start
    np.testing.assert_array_equal(cm.sum(axis=1), np.bincount(ref.ravel(), minlength=10))
    assert elapsed < 2.0, elapsed


def test_docstring_examples_run():
    import doctest

    from medseg.metrics import overlap as module

    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
