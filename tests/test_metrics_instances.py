"""Instance metrics: components, matching rules, lesion-wise counts / Dice, PQ, AP, per-lesion table, real lesions."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medseg.metrics.detection import detections_record, pooled_average_precision
from medseg.metrics.instances import (
    LESION_COLUMNS,
    average_precision,
    connected_components,
    lesion_metrics,
    match_instances,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _one_matched_one_missed_one_fp() -> tuple[np.ndarray, np.ndarray]:
    ref = np.zeros((10, 10), bool)
    ref[1:3, 1:4] = True  # reference lesion 1: 6 px
    ref[6:8, 6:8] = True  # reference lesion 2: 4 px, missed
    pred = np.zeros((10, 10), bool)
    pred[1:3, 1:5] = True  # predicted lesion 1: 8 px, IoU 6/8 with reference 1
    pred[8:10, 0:2] = True  # predicted lesion 2: 4 px, false positive
    return ref, pred


# --------------------------------------------------------------------------- components
def test_connected_components_connectivity_2d_and_3d():
    touching = np.zeros((6, 6), bool)
    touching[1:3, 1:3] = True
    touching[3:5, 3:5] = True  # touches the first square at one corner only
    assert connected_components(touching)[1] == 1  # 8-connectivity by default
    assert connected_components(touching, connectivity=1)[1] == 2
    cubes = np.zeros((6, 6, 6), bool)
    cubes[2:4, 2:4, 2:4] = True
    cubes[4:6, 4:6, 4:6] = True  # touches the first cube at a corner voxel only
    cubes[0:2, 2:4, 2:4] = True  # touches the first cube at a face
    assert connected_components(cubes)[1] == 1
    assert connected_components(cubes, connectivity=2)[1] == 2
    instances, n = connected_components(cubes, connectivity=1)
    assert n == 2 and instances.dtype == np.int32 and set(np.unique(instances)) == {0, 1, 2}


@pytest.mark.parametrize("connectivity", [0, 3, 1.5, True])
def test_connected_components_rejects_bad_connectivity(connectivity):
    with pytest.raises(ValueError, match="connectivity"):
        connected_components(np.zeros((4, 4), bool), connectivity=connectivity)


def test_connected_components_rejects_non_binary():
    with pytest.raises(ValueError, match="binary"):
        connected_components(np.array([[0, 2], [1, 0]]))


# --------------------------------------------------------------------------- lesion-wise metrics by hand
def test_one_matched_one_missed_one_false_positive():
    ref, pred = _one_matched_one_missed_one_fp()
    summary, table = lesion_metrics(ref, pred, spacing_mm=(0.5, 2.0))
    assert summary["status"] == "ok"
    assert (summary["n_ref"], summary["n_pred"], summary["tp"], summary["fp"], summary["fn"]) == (2, 2, 1, 1, 1)
    assert summary["lesion_precision"] == 0.5 and summary["lesion_recall"] == 0.5
    assert summary["lesion_f1"] == pytest.approx(0.5)
    assert summary["lesion_dice"] == pytest.approx(12 / 14)  # only the matched pair is averaged
    assert summary["sq"] == pytest.approx(0.75)
    assert summary["rq"] == pytest.approx(1 / (1 + 0.5 + 0.5))
    assert summary["pq"] == pytest.approx(0.75 / 2)
    assert math.isnan(summary["ap50"]) and summary["ap_scored"] is False

    assert list(table.columns) == list(LESION_COLUMNS) and len(table) == 4
    ref_rows = table[table["source"] == "reference"].set_index("lesion_id")
    pred_rows = table[table["source"] == "prediction"].set_index("lesion_id")
    assert list(ref_rows["matched"]) == [True, False] and list(pred_rows["matched"]) == [True, False]
    assert ref_rows.loc[1, "matched_id"] == 1 and ref_rows.loc[2, "matched_id"] == 0
    assert ref_rows.loc[1, "volume_ml"] == pytest.approx(6 * 1.0 / 1000)
    assert ref_rows.loc[1, "centroid_vox"] == (1.5, 2.0)
    assert ref_rows.loc[1, "best_iou"] == pytest.approx(0.75) and ref_rows.loc[2, "best_iou"] == 0.0
    assert ref_rows.loc[1, "dice"] == pytest.approx(12 / 14) and math.isnan(ref_rows.loc[2, "dice"])
    assert pred_rows.loc[2, "n_voxels"] == 4 and pred_rows.loc[2, "centroid_vox"] == (8.5, 0.5)


def test_iou_exactly_one_half_is_not_a_match():
    ref = np.zeros((4, 8), bool)
    ref[0:2, 0:3] = True
    pred = np.zeros((4, 8), bool)
    pred[0:2, 1:4] = True  # IoU = 4 / 8
    summary, _ = lesion_metrics(ref, pred, spacing_mm=(1, 1))
    assert (summary["tp"], summary["fp"], summary["fn"]) == (0, 1, 1)
    assert summary["pq"] == 0.0 and summary["rq"] == 0.0 and math.isnan(summary["sq"])


def test_split_prediction_iou_vs_overlap_criterion():
    ref = np.zeros((6, 10), bool)
    ref[0:4, 0:8] = True  # 32 px
    pred = np.zeros((6, 10), bool)
    pred[0:4, 0:3] = True  # 12 px, IoU 12/32
    pred[0:4, 5:8] = True  # 12 px, IoU 12/32
    by_iou, _ = lesion_metrics(ref, pred, spacing_mm=(1, 1), criterion="iou")
    assert (by_iou["tp"], by_iou["fp"], by_iou["fn"]) == (0, 2, 1)
    assert by_iou["lesion_f1"] == 0.0 and math.isnan(by_iou["lesion_dice"])
    by_overlap, table = lesion_metrics(ref, pred, spacing_mm=(1, 1), criterion="overlap")
    assert (by_overlap["tp"], by_overlap["fp"], by_overlap["fn"]) == (1, 0, 0)
    assert by_overlap["lesion_precision"] == 1.0 and by_overlap["lesion_f1"] == 1.0
    ref_row = table[table["source"] == "reference"].iloc[0]
    assert ref_row["matched_id"] == 1  # tie on intersection: lowest id
    assert by_overlap["lesion_dice"] == pytest.approx(24 / 44)
    assert by_overlap["pq"] == 0.0  # PQ always uses IoU > 0.5
    greedy, _ = lesion_metrics(ref, pred, spacing_mm=(1, 1), criterion="iou", iou_threshold=0.3)
    assert (greedy["tp"], greedy["fp"], greedy["fn"]) == (1, 1, 0)  # one-to-one below 0.5


def test_merged_prediction_overlap_criterion_detects_both():
    ref = np.zeros((4, 8), bool)
    ref[0:2, 0:2] = True
    ref[0:2, 4:6] = True
    pred = np.zeros((4, 8), bool)
    pred[0:2, 0:6] = True
    summary, table = lesion_metrics(ref, pred, spacing_mm=(1, 1), criterion="overlap")
    assert (summary["tp"], summary["fp"], summary["fn"]) == (2, 0, 0)
    assert summary["lesion_recall"] == 1.0 and summary["lesion_precision"] == 1.0
    assert list(table.loc[table["source"] == "reference", "matched_id"]) == [1, 1]
    strict, _ = lesion_metrics(ref, pred, spacing_mm=(1, 1))
    assert (strict["tp"], strict["fp"], strict["fn"]) == (0, 1, 2)


def test_touching_lesions_depend_on_connectivity():
    ref = np.zeros((6, 6), bool)
    ref[1:3, 1:3] = True
    ref[3:5, 3:5] = True
    full, _ = lesion_metrics(ref, ref, spacing_mm=(1, 1))
    face, _ = lesion_metrics(ref, ref, spacing_mm=(1, 1), connectivity=1)
    assert full["n_ref"] == 1 and face["n_ref"] == 2
    assert face["lesion_f1"] == 1.0 and face["pq"] == 1.0


def test_instance_maps_are_used_as_given():
    ref = np.zeros((4, 6), np.int32)
    ref[0:2, 0:2] = 5
    ref[0:2, 2:4] = 9  # touches lesion 5 but is a separate instance
    pred = ref.copy()
    summary, table = lesion_metrics(ref, pred, spacing_mm=(1, 1))
    assert summary["n_ref"] == 2 and summary["tp"] == 2
    assert sorted(table["lesion_id"].unique()) == [5, 9]
    with pytest.raises(ValueError, match="given as a mask"):
        lesion_metrics(ref, pred, spacing_mm=(1, 1), input_kind="mask")


@pytest.mark.parametrize(
    "ref_on, pred_on, status",
    [(False, False, "both_empty"), (False, True, "ref_empty"), (True, False, "pred_empty")],
)
def test_lesion_statuses(ref_on, pred_on, status):
    ref = np.zeros((5, 5, 5), bool)
    pred = np.zeros((5, 5, 5), bool)
    ref[1:3, 1:3, 1:3] = ref_on
    pred[2:4, 2:4, 2:4] = pred_on
    scores = {1: 0.7} if pred_on else {}
    summary, table = lesion_metrics(ref, pred, spacing_mm=(1, 1, 1), prediction_scores=scores)
    assert summary["status"] == status
    assert len(table) == int(ref_on) + int(pred_on)
    if status == "both_empty":
        for key in ("lesion_precision", "lesion_recall", "lesion_f1", "pq", "sq", "rq", "ap50"):
            assert math.isnan(summary[key]), key
    elif status == "ref_empty":
        assert summary["lesion_precision"] == 0.0 and math.isnan(summary["lesion_recall"])
        assert summary["lesion_f1"] == 0.0 and summary["pq"] == 0.0 and math.isnan(summary["ap50"])
    else:
        assert summary["lesion_recall"] == 0.0 and math.isnan(summary["lesion_precision"])
        assert summary["lesion_f1"] == 0.0 and summary["pq"] == 0.0 and summary["ap50"] == 0.0


def test_single_voxel_lesions_3d():
    ref = np.zeros((5, 5, 5), bool)
    ref[0, 0, 0] = ref[4, 4, 4] = True
    pred = ref.copy()
    pred[4, 4, 4] = False
    summary, _ = lesion_metrics(ref, pred, spacing_mm=(1, 1, 1))
    assert (summary["tp"], summary["fn"], summary["fp"]) == (1, 1, 0)
    assert summary["lesion_dice"] == 1.0 and summary["sq"] == 1.0


# --------------------------------------------------------------------------- AP
def test_ap_hand_computed_three_predictions():
    # p0 (0.9) hits r0, p1 (0.8) is a false positive, p2 (0.7) hits r1: precision after monotone envelope
    # [1, 2/3, 2/3] at recall [0.5, 0.5, 1]: 51 recall points <= 0.5 read 1, the other 50 read 2/3.
    ap = average_precision(
        scores=np.array([0.9, 0.8, 0.7]),
        pair_pred_index=np.array([0, 2]),
        pair_ref_index=np.array([0, 1]),
        pair_iou=np.array([0.8, 0.6]),
        n_ref=2,
        iou_threshold=0.5,
    )
    assert ap == pytest.approx((51 + 50 * 2 / 3) / 101)
    ap75 = average_precision(
        scores=np.array([0.9, 0.8, 0.7]),
        pair_pred_index=np.array([0, 2]),
        pair_ref_index=np.array([0, 1]),
        pair_iou=np.array([0.8, 0.6]),
        n_ref=2,
        iou_threshold=0.75,
    )
    assert ap75 == pytest.approx(51 / 101)  # only p0 is a hit at IoU >= 0.75


def test_ap_each_reference_matched_once():
    # two predictions on the same reference: the higher score takes it, the other is a false positive
    ap = average_precision(
        scores=np.array([0.2, 0.9]),
        pair_pred_index=np.array([0, 1]),
        pair_ref_index=np.array([0, 0]),
        pair_iou=np.array([0.9, 0.6]),
        n_ref=1,
        iou_threshold=0.5,
    )
    assert ap == pytest.approx(1.0)
    assert math.isnan(
        average_precision(
            scores=np.array([0.5]),
            pair_pred_index=np.array([], int),
            pair_ref_index=np.array([], int),
            pair_iou=np.array([]),
            n_ref=0,
            iou_threshold=0.5,
        )
    )


def test_ap_from_scores_and_from_probabilities():
    ref, pred = _one_matched_one_missed_one_fp()
    good, _ = lesion_metrics(ref, pred, spacing_mm=(1, 1), prediction_scores={1: 0.9, 2: 0.3})
    assert good["ap_scored"] is True
    assert good["ap50"] == pytest.approx(51 / 101) and good["ap75"] == pytest.approx(51 / 101)
    bad, _ = lesion_metrics(ref, pred, spacing_mm=(1, 1), prediction_scores={1: 0.3, 2: 0.9})
    assert bad["ap50"] == pytest.approx(51 * 0.5 / 101)
    probabilities = np.zeros((10, 10))
    probabilities[1:3, 1:5] = [[0.7, 0.9, 0.9, 0.7], [0.9, 0.9, 0.9, 0.9]]  # mean 0.85
    probabilities[8:10, 0:2] = 0.4
    from_probs, table = lesion_metrics(ref, pred, spacing_mm=(1, 1), probabilities=probabilities)
    assert from_probs["ap50"] == pytest.approx(51 / 101)
    scores = table.loc[table["source"] == "prediction", "score"].tolist()
    assert scores == pytest.approx([0.85, 0.4])
    assert table.loc[table["source"] == "reference", "score"].isna().all()


def test_lesion_metrics_validation():
    ref, pred = _one_matched_one_missed_one_fp()
    with pytest.raises(ValueError, match="not both"):
        lesion_metrics(
            ref, pred, spacing_mm=(1, 1), prediction_scores={1: 1.0, 2: 1.0}, probabilities=np.zeros((10, 10))
        )
    with pytest.raises(ValueError, match=r"no score for predicted instances \[2\]"):
        lesion_metrics(ref, pred, spacing_mm=(1, 1), prediction_scores={1: 1.0})
    with pytest.raises(ValueError, match="criterion"):
        lesion_metrics(ref, pred, spacing_mm=(1, 1), criterion="dice")
    with pytest.raises(ValueError, match="iou_threshold"):
        lesion_metrics(ref, pred, spacing_mm=(1, 1), iou_threshold=1.0)
    with pytest.raises(ValueError, match="spacing_mm"):
        lesion_metrics(ref, pred, spacing_mm=(1, 1, 1))
    with pytest.raises(ValueError, match="probabilities shape"):
        lesion_metrics(ref, pred, spacing_mm=(1, 1), probabilities=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="shape"):
        match_instances(np.zeros((3, 3), int), np.zeros((3, 4), int))
    with pytest.raises(ValueError, match="negative"):
        match_instances(np.full((3, 3), -1), np.zeros((3, 3), int))


def test_match_instances_tables():
    ref = np.array([[1, 1, 0, 2, 2, 0, 0], [1, 1, 0, 2, 2, 0, 3]])
    pred = np.array([[4, 4, 4, 0, 2, 0, 0], [4, 4, 0, 0, 0, 0, 0]])
    m = match_instances(ref, pred)
    assert m.ref_ids.tolist() == [1, 2, 3] and m.pred_ids.tolist() == [2, 4]
    assert m.ref_voxels.tolist() == [4, 4, 1] and m.pred_voxels.tolist() == [1, 5]
    assert list(zip(m.pair_ref.tolist(), m.pair_pred.tolist(), m.pair_intersection.tolist())) == [(1, 4, 4), (2, 2, 1)]
    np.testing.assert_allclose(m.pair_iou, [4 / 5, 1 / 4])
    assert m.ref_matched_id.tolist() == [4, 0, 0] and m.pred_matched_id.tolist() == [0, 1]
    overlap = match_instances(ref, pred, criterion="overlap")
    assert overlap.ref_matched_id.tolist() == [4, 2, 0] and overlap.pred_matched_id.tolist() == [2, 1]


# --------------------------------------------------------------------------- pooled (dataset-level) AP
# Case X: two reference lesions, both hit (IoU 1) by predictions scored 0.9 and 0.3: AP 1.
# Case Y: one reference lesion; a false positive scored 0.8 ranks above the hit scored 0.7: precision 0, 1/2
#         at recall 0, 1 -> monotone 1/2, 1/2 -> AP 1/2.
# Case Z: no reference lesion, one false positive scored 0.95: AP NaN (COCO's -1), left out of the mean.
CASE_X = {"scores": [0.9, 0.3], "pairs": [[0, 0, 1.0], [1, 1, 1.0]], "n_ref": 2}
CASE_Y = {"scores": [0.8, 0.7], "pairs": [[1, 0, 0.9]], "n_ref": 1}
CASE_Z = {"scores": [0.95], "pairs": [], "n_ref": 0}


def _case_ap(record, iou_threshold=0.5):
    pairs = np.asarray(record["pairs"], dtype=np.float64).reshape(-1, 3)
    return average_precision(
        scores=np.asarray(record["scores"]),
        pair_pred_index=pairs[:, 0].astype(int),
        pair_ref_index=pairs[:, 1].astype(int),
        pair_iou=pairs[:, 2],
        n_ref=record["n_ref"],
        iou_threshold=iou_threshold,
    )


def test_pooled_ap_hand_worked_differs_from_the_mean_of_cases():
    assert _case_ap(CASE_X) == 1.0 and _case_ap(CASE_Y) == 0.5 and math.isnan(_case_ap(CASE_Z))
    # mean of cases: (1 + 1/2) / 2 = 3/4 (Z excluded).
    # pooled X+Y, ranked 0.9 TP(X), 0.8 FP(Y), 0.7 TP(Y), 0.3 TP(X), 3 reference lesions:
    #   precision 1, 1/2, 2/3, 3/4 at recall 1/3, 1/3, 2/3, 1 -> monotone 1, 3/4, 3/4, 3/4;
    #   recall points 0.00..0.33 (34) read 1, 0.34..1.00 (67) read 3/4 -> (34 + 67 * 3/4) / 101 = 0.8342
    assert pooled_average_precision([CASE_X, CASE_Y], iou_threshold=0.5) == pytest.approx((34 + 67 * 0.75) / 101)
    # pooled X+Y+Z: Z's false positive (0.95) now ranks first: TP 0,1,1,2,3 / FP 1,1,2,2,2 -> precision
    #   0, 1/2, 1/3, 1/2, 3/5 -> monotone 3/5 everywhere -> AP 3/5, while the mean of cases stays 3/4
    assert pooled_average_precision([CASE_X, CASE_Y, CASE_Z], iou_threshold=0.5) == pytest.approx(0.6)
    # at IoU 0.75 Y's hit (IoU 0.9) still counts; the order of the cases does not matter
    assert pooled_average_precision([CASE_Z, CASE_Y, CASE_X], iou_threshold=0.75) == pytest.approx(0.6)
    # one case pooled alone is its own AP; no reference anywhere is NaN; thresholds below 0.5 are refused
    assert pooled_average_precision([CASE_Y], iou_threshold=0.5) == 0.5
    assert math.isnan(pooled_average_precision([CASE_Z], iou_threshold=0.5))
    with pytest.raises(ValueError, match="iou_threshold"):
        pooled_average_precision([CASE_X], iou_threshold=0.3)


def test_detections_record_keeps_pairs_from_iou_one_half():
    record = detections_record(
        scores=np.array([0.5, 0.25]),
        pair_pred_index=np.array([0, 1, 1]),
        pair_ref_index=np.array([0, 0, 1]),
        pair_iou=np.array([0.5, 0.49, 0.8]),
        n_ref=3,
    )
    assert record == {"scores": [0.5, 0.25], "pairs": [[0, 0, 0.5], [1, 1, 0.8]], "n_ref": 3}


def _box_instances(shape, boxes):
    """Instance map of boxes ``(row, column, height, width)``, ids 1.. in order (a later box covers an earlier)."""
    instances = np.zeros(shape, np.int32)
    for index, (r, c, h, w) in enumerate(boxes, start=1):
        instances[r : r + h, c : c + w] = index
    return instances


def _coco_images(rng):
    """Six random images of boxes (hits moved / resized by 1-2 pixels, misses, small false positives), and one
    made by hand with IoUs exactly on the thresholds: 16/32 = 0.5 and 12/16 = 0.75."""
    for _ in range(6):
        cells = [(4 + 14 * i, 4 + 14 * j) for i in range(3) for j in range(3)]
        ref_boxes = [(r, c, int(rng.integers(6, 11)), int(rng.integers(6, 11))) for r, c in cells]
        ref_boxes = [ref_boxes[k] for k in rng.permutation(len(ref_boxes))[: int(rng.integers(0, 6))]]
        pred_boxes = [
            (r + int(rng.integers(-1, 2)), c + int(rng.integers(-1, 2)), h + int(rng.integers(-2, 3)), w)
            for r, c, h, w in ref_boxes
            if rng.random() < 0.85
        ]
        pred_boxes += [(int(rng.integers(0, 44)), int(rng.integers(0, 44)), 3, 3) for _ in range(rng.integers(0, 3))]
        yield ref_boxes, pred_boxes
    yield [(2, 2, 4, 4), (30, 30, 4, 4)], [(2, 2, 4, 8), (30, 30, 4, 3)]


def test_pooled_ap_matches_pycocotools_segm():
    """Optional cross-check against COCO's own evaluation (mask IoU, ``iouType="segm"``)."""
    coco_module = pytest.importorskip("pycocotools.coco")
    cocoeval = pytest.importorskip("pycocotools.cocoeval")
    mask_utils = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(11)
    shape = (48, 48)
    records, images, gts, dts, ious = [], [], [], [], []
    for image_id, (ref_boxes, pred_boxes) in enumerate(_coco_images(rng), start=1):
        ref, pred = _box_instances(shape, ref_boxes), _box_instances(shape, pred_boxes)
        match = match_instances(ref, pred)
        scores = rng.permutation(100)[: len(match.pred_ids)] / 100 + 0.005  # distinct: no ties to order
        # COCO breaks a tie between two references for one prediction the other way: none here
        candidates = match.pair_pred[match.pair_iou >= 0.5]
        assert len(candidates) == len(set(candidates.tolist()))
        ious += match.pair_iou.tolist()
        records.append(
            detections_record(
                scores=scores,
                pair_pred_index=np.searchsorted(match.pred_ids, match.pair_pred),
                pair_ref_index=np.searchsorted(match.ref_ids, match.pair_ref),
                pair_iou=match.pair_iou,
                n_ref=len(match.ref_ids),
            )
        )
        images.append({"id": image_id, "height": shape[0], "width": shape[1]})
        for ref_id in match.ref_ids:
            rle = mask_utils.encode(np.asfortranarray((ref == ref_id).astype(np.uint8)))
            box = [float(v) for v in mask_utils.toBbox(rle)]
            gts.append(
                {"id": len(gts) + 1, "image_id": image_id, "category_id": 1, "segmentation": rle, "bbox": box}
                | {"area": float(mask_utils.area(rle)), "iscrowd": 0}
            )
        for pred_id, score in zip(match.pred_ids, scores):
            rle = mask_utils.encode(np.asfortranarray((pred == pred_id).astype(np.uint8)))
            dts.append({"image_id": image_id, "category_id": 1, "segmentation": rle, "score": float(score)})
    assert 0.5 in ious and 0.75 in ious  # pycocotools' thresholds are exactly 0.5 and 0.75: IoU >= counts
    ground_truth = coco_module.COCO()
    ground_truth.dataset = {"images": images, "annotations": gts, "categories": [{"id": 1, "name": "lesion"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth.createIndex()
        evaluator = cocoeval.COCOeval(ground_truth, ground_truth.loadRes(dts), iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    ap50, ap75 = evaluator.stats[1], evaluator.stats[2]  # AP at IoU 0.5 / 0.75, all areas, 100 detections
    assert 0.1 < ap75 < ap50 < 0.99  # a non-trivial example
    assert pooled_average_precision(records, iou_threshold=0.5) == pytest.approx(ap50, abs=1e-9)
    assert pooled_average_precision(records, iou_threshold=0.75) == pytest.approx(ap75, abs=1e-9)


# --------------------------------------------------------------------------- MONAI PQ cross-check
def test_pq_counts_match_monai_on_random_instances():
    import torch  # MONAI (and so torch) is a required dependency: this cross-check always runs
    from monai.metrics import panoptic_quality

    rng = np.random.default_rng(7)
    matched = 0
    for trial in range(5):
        smooth = ndimage.gaussian_filter(rng.random((64, 64)), 2.0)
        ref_mask = smooth > np.quantile(smooth, 0.75)
        pred_mask = [
            np.roll(ref_mask, 1, axis=0),
            ndimage.binary_dilation(ref_mask),
            ndimage.binary_erosion(ref_mask),
            ref_mask ^ (rng.random((64, 64)) < 0.1),
            np.roll(ref_mask, 3, axis=1),
        ][trial]
        ref_inst, _ = connected_components(ref_mask)
        pred_inst, _ = connected_components(pred_mask)
        summary, _ = lesion_metrics(ref_inst, pred_inst, spacing_mm=(1, 1), input_kind="instances")
        tp, fp, fn, iou_sum = panoptic_quality.compute_panoptic_quality(
            torch.from_numpy(pred_inst), torch.from_numpy(ref_inst), output_confusion_matrix=True
        ).tolist()
        # the default criterion is the same IoU > 0.5 matching as PQ's
        assert (summary["tp"], summary["fp"], summary["fn"]) == (tp, fp, fn)
        assert summary["pq"] == pytest.approx(iou_sum / (tp + 0.5 * fp + 0.5 * fn), abs=1e-6)
        assert summary["rq"] == pytest.approx(tp / (tp + 0.5 * fp + 0.5 * fn))
        if tp:
            assert summary["sq"] == pytest.approx(iou_sum / tp, abs=1e-6)
        matched += tp
    assert matched > 0  # the comparison covered true positives, not only empty matchings


# --------------------------------------------------------------------------- real lesions
@pytest.mark.shared_data
@pytest.mark.parametrize("case, n26, n6", [("patient07", 37, 49), ("patient19", 98, 140), ("patient26", 19, 27)])
def test_ms_lesions_lesjak_counts_and_self_match(case, n26, n6):
    folder = SHARED_DATA / "ms_lesions_lesjak" / case
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    path = next(folder.glob("GOLD_STANDARD*.nii.gz"))
    image = nib.load(str(path))
    label = np.asarray(image.dataobj).astype(np.uint8)
    spacing = tuple(float(s) for s in image.header.get_zooms()[:3])
    summary, table = lesion_metrics(label, label, spacing_mm=spacing)
    assert summary["n_ref"] == n26 and summary["n_pred"] == n26
    assert summary["lesion_f1"] == 1.0 and summary["pq"] == 1.0 and summary["lesion_dice"] == 1.0
    face, _ = lesion_metrics(label, label, spacing_mm=spacing, connectivity=1)
    assert face["n_ref"] == n6
    ref_rows = table[table["source"] == "reference"]
    assert ref_rows["n_voxels"].sum() == int(label.sum())
    assert ref_rows["volume_ml"].sum() == pytest.approx(label.sum() * np.prod(spacing) / 1000)
    # a prediction that drops every lesion under 10 voxels and dilates the rest
    instances, _ = connected_components(label.astype(bool))
    sizes = np.bincount(instances.ravel())
    kept = (sizes >= 10)[instances] & (instances > 0)
    pred = ndimage.binary_dilation(kept)
    dropped = int(np.count_nonzero(sizes[1:] < 10))
    shifted, _ = lesion_metrics(label, pred, spacing_mm=spacing, criterion="overlap")
    assert shifted["fn"] == dropped and shifted["fp"] == 0
    assert shifted["lesion_recall"] == pytest.approx((n26 - dropped) / n26)


def test_docstring_examples_run():
    import doctest

    from medseg.metrics import instances as module

    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
