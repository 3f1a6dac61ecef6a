"""Regression tests of the batch evaluation: stale caches, spawned workers, bugs vs ``error`` rows,
worst-case rankings of failed cases, and COCO's pooled (dataset-level) AP.

Each test fails on the behaviour it guards against (see the comment at its top).
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from medseg.core.labels import LabelSet
from medseg.core.volume import Volume
from medseg.errors import GeometryMismatchError, InvalidFileError, MedsegUserError
from medseg.evaluation import EvaluationSettings, evaluate, evaluate_pair, summarize, summary_json, write_outputs
from medseg.evaluation import batch as batch_module
from medseg.evaluation import cache as cache_module
from medseg.evaluation.cache import case_key
from medseg.evaluation.pairing import CaseJob
from medseg.io import write_volume
from medseg.metrics.detection import pooled_average_precision

REPO = Path(__file__).resolve().parents[1]
LABELS = LabelSet.from_manifest({"0": "background", "1": "a", "2": "b"}, regions={"ab": [1, 2]})
AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])  # spacing (1, 1, 2) mm
SHAPE = (20, 20, 10)
DIAGONAL = float(np.linalg.norm([20 * 1.0, 20 * 1.0, 10 * 2.0]))


def _label(array: np.ndarray) -> Volume:
    return Volume(array[None].astype(np.uint8), AFFINE, kind="label")


def _reference() -> np.ndarray:
    array = np.zeros(SHAPE, np.uint8)
    array[5:10, 5:10, 3:6] = 1  # "a": 5x5x3 = 75 voxels, 0.15 ml
    array[12:15, 12:15, 2:5] = 2  # "b": 27 voxels
    return array


def _write_batch(root: Path, *, corrupt: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """case0: prediction = reference; case1: moved by 1 voxel (1 mm) along x; ``corrupt`` predictions are garbage."""
    ref_dir, pred_dir = root / "ref", root / "pred"
    for index in range(2):
        write_volume(_label(_reference()), ref_dir / f"case{index}.nii.gz")
        write_volume(_label(np.roll(_reference(), index, axis=0)), pred_dir / f"case{index}.nii.gz")
    for case_id in corrupt:
        (pred_dir / f"{case_id}.nii.gz").write_bytes(b"not a volume")
    return ref_dir, pred_dir


def _count_pair_calls(monkeypatch: pytest.MonkeyPatch):
    """Count the pairs actually scored (workers=1: in this process); ``take()`` returns and resets the count."""
    calls: list[str] = []
    real = batch_module.evaluate_pair

    def counting(*args, **kwargs):
        calls.append(kwargs["case_id"])
        return real(*args, **kwargs)

    monkeypatch.setattr(batch_module, "evaluate_pair", counting)

    def take() -> int:
        count = len(calls)
        calls.clear()
        return count

    return take


# --------------------------------------------------------------------------- 1. stale caches
def test_settings_json_holds_every_field_and_changes_the_cache_key() -> None:
    # guards: a setting missing from EvaluationSettings.to_json (and so from the cache key) would let a
    # rerun with another value reuse stale results. Shown failing by dropping a field from to_json.
    base = EvaluationSettings(labels=LABELS)
    variants = {
        "labels": {"labels": LabelSet.from_manifest(LABELS.to_json()["labels"], regions={"ab": [1, 2], "bb": [2]})},
        "things": {"things": ("a",)},
        "nsd_tolerance_mm": {"nsd_tolerance_mm": {"b": 3.0}},
        "connectivity": {"connectivity": 1},
        "match": {"match": "overlap"},
        "resample_prediction": {"resample_prediction": True},
        "tolerance_mm": {"tolerance_mm": 0.01},
        "include_regions": {"include_regions": False},
    }
    assert set(variants) == {f.name for f in dataclasses.fields(EvaluationSettings)}, "a new field needs a variant"
    assert set(base.to_json()) == set(variants)
    job = CaseJob(case_id="c", reference="r.nii.gz", prediction="p.nii.gz")

    def key(settings: EvaluationSettings) -> str:  # as batch._run_jobs makes it
        return case_key(job, json.dumps(settings.to_json(), sort_keys=True, default=str))

    for name, change in variants.items():
        assert key(dataclasses.replace(base, **change)) != key(base), name
    # the NSD tolerance is keyed by what each structure gets: "*" changes every structure
    assert key(dataclasses.replace(base, nsd_tolerance_mm={"*": 2.0})) != key(base)
    assert key(dataclasses.replace(base, nsd_tolerance_mm={"*": 1.0})) == key(base)  # 1 mm is the default


def test_cache_is_not_reused_after_a_version_or_setting_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # guards: the cache key without medseg's version (5b3398c) reused results of an older medseg.
    # Shown failing by removing __version__ from cache.case_key: the version step scores 0 pairs instead of 2.
    ref_dir, pred_dir = _write_batch(tmp_path)
    scored = _count_pair_calls(monkeypatch)
    out = tmp_path / "out"

    def run(**options):
        return evaluate(ref_dir, pred_dir, labels=LABELS, out=out, **options)

    first = run()
    assert scored() == 2
    run()
    assert scored() == 0  # everything from the cache
    monkeypatch.setattr(cache_module, "__version__", "99.0.0")
    run()
    assert scored() == 2, "a result cached by another medseg version was reused"
    run()
    assert scored() == 0
    other_regions = LabelSet.from_manifest(LABELS.to_json()["labels"], regions={"ab": [1, 2], "bb": [2]})
    for options in (
        {"connectivity": 1},
        {"things": ["a"]},
        {"things": ["a"], "match": "overlap"},
        {"nsd_tolerance_mm": {"b": 3.0}},
        {"resample_prediction": True},
    ):
        run(**options)
        assert scored() == 2, options
        run(**options)
        assert scored() == 0, options
    evaluate(ref_dir, pred_dir, labels=other_regions, out=out)  # another region
    assert scored() == 2
    # and the values follow the setting: case1's "a" moved by 1 mm along x, so every boundary point lies
    # within 1 mm of the other boundary (NSD 1 at the default 1 mm); at 0 mm the moved faces no longer count
    strict = run(nsd_tolerance_mm=0.0)
    assert scored() == 2
    before = first.per_case.set_index(["case_id", "structure"])
    after = strict.per_case.set_index(["case_id", "structure"])
    assert before.loc[("case1", "a"), "nsd"] == pytest.approx(1.0)
    assert after.loc[("case1", "a"), "nsd"] < 1.0
    assert after.loc[("case1", "a"), "nsd_tolerance_mm"] == 0.0
    assert after.loc[("case0", "a"), "nsd"] == 1.0  # identical surfaces: NSD 1 at any tolerance


# --------------------------------------------------------------------------- 2. spawned workers
_SPAWN_SCRIPT = textwrap.dedent(
    """
    import sys


    def main(ref_dir, pred_dir, prob_dir):
        import torch

        torch.set_num_threads(2)
        torch.ones(8) @ torch.ones(8)  # this process now holds torch's (OpenMP) threads

        import pandas as pd

        from medseg.core.labels import LabelSet
        from medseg.evaluation import batch, evaluate

        labels = LabelSet.from_manifest({"0": "background", "1": "a", "2": "b"}, regions={"ab": [1, 2]})
        options = dict(labels=labels, things=["a"], probabilities=prob_dir)
        serial = evaluate(ref_dir, pred_dir, workers=1, **options)
        real = batch.evaluate_pair

        def marked(*args, **kwargs):  # reaches a worker only if the worker is a fork of this process
            result = real(*args, **kwargs)
            for row in result.rows:
                row["message"] = "forked"
            return result

        batch.evaluate_pair = marked
        parallel = evaluate(ref_dir, pred_dir, workers=2, **options)
        assert not (parallel.per_case["message"] == "forked").any(), "workers were forked from this process (they must come from a forkserver or spawn)"
        pd.testing.assert_frame_equal(serial.per_case, parallel.per_case)
        pd.testing.assert_frame_equal(serial.cases, parallel.cases)
        pd.testing.assert_frame_equal(serial.lesion_summary, parallel.lesion_summary)
        assert (serial.confusion == parallel.confusion).all()
        assert serial.detections == parallel.detections and len(serial.detections) == 3
        print("EQUAL", len(parallel.per_case))


    if __name__ == "__main__":
        main(*sys.argv[1:])
    """
)


def test_workers_are_not_forked_and_match_one_worker_after_torch(tmp_path: Path) -> None:
    # guards: forked workers of a process holding torch threads can deadlock (a timeout fails the test) and
    # inherit the parent's state. Shown failing with get_context("fork"): the parent's patch reaches the workers.
    ref_dir, pred_dir = _write_batch(tmp_path)
    write_volume(_label(np.roll(_reference(), 3, axis=1)), pred_dir / "case2.nii.gz")
    write_volume(_label(_reference()), ref_dir / "case2.nii.gz")
    prob_dir = tmp_path / "prob"
    for index in range(3):
        write_volume(
            Volume(np.full((1, *SHAPE), 0.25 + 0.25 * index, np.float32), AFFINE), prob_dir / f"case{index}.nii.gz"
        )
    script = tmp_path / "spawn_check.py"
    script.write_text(_SPAWN_SCRIPT)
    try:
        done = subprocess.run(
            [sys.executable, str(script), str(ref_dir), str(pred_dir), str(prob_dir)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"evaluate(workers=2) after importing torch did not finish in {error.timeout} s (deadlock?)")
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split() == ["EQUAL", str(3 * 3)]


def test_per_case_work_is_picklable_by_name() -> None:
    # spawn pickles the function and its arguments: they must be top-level and plain
    assert pickle.loads(pickle.dumps(batch_module._run_job)) is batch_module._run_job
    settings = EvaluationSettings(labels=LABELS, things=("a",), nsd_tolerance_mm={"a": 2.0}, connectivity=1)
    assert pickle.loads(pickle.dumps(settings)) == settings


# --------------------------------------------------------------------------- 3. bugs are not error rows
@pytest.mark.parametrize("error", [RuntimeError("a bug"), ValueError("a bug"), KeyError("a bug"), IndexError("a bug")])
def test_a_bug_while_scoring_propagates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    # guards: `except (MedsegUserError, ValueError)` in _run_job turned any ValueError (a bug in medseg or
    # numpy) into an "error" row. Shown failing with the old except clause: ValueError("a bug") is not raised.
    ref_dir, pred_dir = _write_batch(tmp_path)

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(batch_module, "evaluate_pair", broken)
    with pytest.raises(type(error), match="a bug"):
        evaluate(ref_dir, pred_dir, labels=LABELS)


def test_a_corrupt_prediction_is_still_an_error_row(tmp_path: Path) -> None:
    ref_dir, pred_dir = _write_batch(tmp_path, corrupt=("case1",))
    evaluation = evaluate(ref_dir, pred_dir, labels=LABELS)
    cases = evaluation.cases.set_index("case_id")
    assert cases["status"].to_dict() == {"case0": "ok", "case1": "error"}
    message = cases.loc["case1", "message"]
    assert "case1.nii.gz: cannot read" in message and "\n" not in message
    assert set(evaluation.per_case[evaluation.per_case.case_id == "case1"].status) == {"error"}


@pytest.mark.parametrize(
    "options, named",
    [
        ({"connectivity": 4}, "connectivity"),
        ({"connectivity": 0}, "connectivity"),
        ({"connectivity": True}, "connectivity"),
        ({"connectivity": 1.5}, "connectivity"),
        ({"match": "dice"}, "match"),
        ({"workers": 0}, "workers"),
        ({"workers": 2.5}, "workers"),
        ({"nsd_tolerance_mm": -1.0}, "nsd_tolerance_mm"),
        ({"nsd_tolerance_mm": float("nan")}, "nsd_tolerance_mm"),
        ({"nsd_tolerance_mm": {"a": -0.5}}, r"nsd_tolerance_mm\['a'\]"),
        ({"nsd_tolerance_mm": {"liver": 1.0}}, "nsd_tolerance_mm: unknown structure 'liver'"),
        ({"things": ["liver"]}, r"things: unknown structures \['liver'\]"),
    ],
)
def test_invalid_options_are_refused_before_any_case_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: dict, named: str
) -> None:
    # guards: connectivity=4 (and negative tolerances...) became one "error" row per case, after reading
    # every case. Shown failing with the old evaluate(): no MedsegUserError is raised for connectivity=4.
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    for folder in (ref_dir, pred_dir):
        folder.mkdir()
        for index in range(2):
            (folder / f"case{index}.nii.gz").write_bytes(b"reading this would fail")

    def read_volume(path, **kwargs):
        raise AssertionError(f"{path} was read before the invalid option was refused")

    monkeypatch.setattr(batch_module, "read_volume", read_volume)
    with pytest.raises(MedsegUserError, match=named):
        evaluate(ref_dir, pred_dir, labels=LABELS, **options)


def test_resampling_a_2d_prediction_onto_a_3d_reference_is_a_geometry_error() -> None:
    # guards: resample_to's ValueError (a bug type) for a user's 2D file. Shown failing before: ValueError.
    prediction = Volume(np.zeros((1, 20, 20), np.uint8), np.eye(4), kind="label", meta={"path": "flat.png"})
    settings = EvaluationSettings(labels=LABELS, resample_prediction=True)
    with pytest.raises(GeometryMismatchError, match=r"^flat\.png vs .*2D prediction onto a 3D reference$"):
        evaluate_pair(_label(_reference()), prediction, settings=settings)


def test_probability_maps_with_wrong_channels_or_nan_are_file_errors() -> None:
    # guards: ValueErrors of _thing_probability / lesion_metrics for a user's file. Shown failing before: ValueError.
    reference = _label(_reference())
    settings = EvaluationSettings(labels=LABELS, things=("a",))
    two = Volume(np.zeros((2, *SHAPE), np.float32), AFFINE, meta={"path": "probs.nii.gz"})
    with pytest.raises(InvalidFileError, match=r"^probs\.nii\.gz: expected 1 or 3 probability channels, got 2$"):
        evaluate_pair(reference, reference, settings=settings, probabilities=two)
    nan = np.zeros((1, *SHAPE), np.float32)
    nan[0, 6, 6, 4] = np.nan
    with pytest.raises(InvalidFileError, match=r"^probs\.nii\.gz: probabilities contain NaN"):
        evaluate_pair(reference, reference, settings=settings, probabilities=Volume(nan, AFFINE, meta=two.meta))


def test_connectivity_above_the_image_dimension_is_an_error_row(tmp_path: Path) -> None:
    # guards: connected_components' ValueError for connectivity 3 on a 2D image. Shown failing before: the
    # evaluate_pair call raised ValueError (not a MedsegUserError), so with the narrowed except it would crash.
    flat = np.zeros((12, 12), np.uint8)
    flat[2:5, 2:5] = 1
    volume = Volume(flat[None], np.eye(4), kind="label", meta={"path": "flat_ref.png"})
    settings = EvaluationSettings(labels=LABELS, things=("a",), connectivity=3)
    with pytest.raises(MedsegUserError, match=r"^flat_ref\.png: connectivity 3 needs a 3D image, this one is 2D"):
        evaluate_pair(volume, volume, settings=settings)
    write_volume(volume, tmp_path / "ref" / "flat.png")
    write_volume(volume, tmp_path / "pred" / "flat.png")
    evaluation = evaluate(tmp_path / "ref", tmp_path / "pred", labels=LABELS, things=["a"], connectivity=3)
    case = evaluation.cases.iloc[0]
    assert case.status == "error" and "flat.png: connectivity 3 needs a 3D image" in case.message
    two_d = evaluate(tmp_path / "ref", tmp_path / "pred", labels=LABELS, things=["a"], connectivity=2)
    assert two_d.cases.iloc[0].status == "ok" and two_d.lesion_summary.iloc[0].tp == 1


# --------------------------------------------------------------------------- 4. worst-case rankings
def test_worst_case_summary_scores_error_rows(tmp_path: Path) -> None:
    # guards: error rows had image_diagonal_mm NaN, so empty="worst" dropped their distances (n_scored 1).
    # Shown failing with the old empty_rows(...) call without the reference.
    ref_dir, pred_dir = _write_batch(tmp_path, corrupt=("case1",))
    evaluation = evaluate(ref_dir, pred_dir, labels=LABELS)
    rows = evaluation.per_case.set_index(["case_id", "structure"])
    assert rows.loc[("case1", "a"), "status"] == "error"
    assert rows.loc[("case1", "a"), "image_diagonal_mm"] == pytest.approx(DIAGONAL)
    assert rows.loc[("case1", "a"), "ref_ml"] == pytest.approx(75 * 2 / 1000)
    default = summarize(evaluation.per_case)
    assert default.loc[("a", "dice"), "n_scored"] == 1 and default.loc[("a", "dice"), "mean"] == 1.0
    worst = summarize(evaluation.per_case, empty="worst")
    for metric in ("dice", "iou", "nsd"):  # case0 perfect (1), case1 an error (0)
        assert worst.loc[("a", metric), "n_scored"] == 2, metric
        assert worst.loc[("a", metric), "mean"] == pytest.approx(0.5), metric
    for metric in ("hd_mm", "hd95_mm", "assd_mm"):  # case0: 0 mm; case1: the diagonal
        assert worst.loc[("a", metric), "n_scored"] == 2, metric
        assert worst.loc[("a", metric), "mean"] == pytest.approx(DIAGONAL / 2), metric
    assert worst.loc[("a", "dice"), "n_error"] == 1

    # an unreadable reference: Dice/IoU/NSD still 0, but no diagonal is known, so its distances stay NaN
    write_volume(_label(_reference()), pred_dir / "case2.nii.gz")
    (ref_dir / "case2.nii.gz").write_bytes(b"not a volume")
    again = summarize(evaluate(ref_dir, pred_dir, labels=LABELS).per_case, empty="worst")
    assert again.loc[("a", "dice"), "n_scored"] == 3 and again.loc[("a", "dice"), "mean"] == pytest.approx(1 / 3)
    assert again.loc[("a", "hd_mm"), "n_scored"] == 2
    assert again.loc[("a", "hd_mm"), "mean"] == pytest.approx(DIAGONAL / 2)


# --------------------------------------------------------------------------- 5. pooled AP
def _lesion_batch(root: Path) -> tuple[Path, Path, Path]:
    """Two cases of thing "a" with scored predictions (hand-worked AP in the test).

    x: two reference lesions, both predicted exactly (IoU 1), scores 0.9 and 0.3 -> AP 1.
    y: one reference lesion predicted exactly (score 0.7) and a false positive scored 0.8 -> AP 0.5
       (ranked FP, TP: precision 0, 1/2 at recall 0, 1; monotone 1/2, 1/2; every recall point reads 1/2).
    """
    ref_dir, pred_dir, prob_dir = root / "ref", root / "pred", root / "prob"
    first, second = (slice(2, 5), slice(2, 5), slice(2, 5)), (slice(10, 13), slice(10, 13), slice(2, 5))
    for case_id, ref_lesions, pred_lesions in (
        ("x", [first, second], [(first, 0.9), (second, 0.3)]),
        ("y", [first], [(first, 0.7), (second, 0.8)]),
    ):
        reference, prediction = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
        probabilities = np.zeros((1, *SHAPE), np.float32)
        for lesion in ref_lesions:
            reference[lesion] = 1
        for lesion, score in pred_lesions:
            prediction[lesion] = 1
            probabilities[(0, *lesion)] = score
        write_volume(_label(reference), ref_dir / f"{case_id}.nii.gz")
        write_volume(_label(prediction), pred_dir / f"{case_id}.nii.gz")
        write_volume(Volume(probabilities, AFFINE), prob_dir / f"{case_id}.nii.gz")
    return ref_dir, pred_dir, prob_dir


def test_pooled_ap_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # guards: only the mean of per-case APs was reported; COCO pools the detections of all images.
    # Shown failing before: Evaluation had no detections and summary.json no ap50_pooled (KeyError).
    ref_dir, pred_dir, prob_dir = _lesion_batch(tmp_path)
    out = tmp_path / "out"
    evaluation = evaluate(ref_dir, pred_dir, labels=LABELS, things=["a"], probabilities=prob_dir, out=out)
    per_case_ap = evaluation.lesion_summary.set_index("case_id")["ap50"].to_dict()
    assert per_case_ap == {"x": pytest.approx(1.0), "y": pytest.approx(0.5)}
    # pooled: ranked 0.9 TP(x), 0.8 FP(y), 0.7 TP(y), 0.3 TP(x) with 3 reference lesions:
    # precision 1, 1/2, 2/3, 3/4 at recall 1/3, 1/3, 2/3, 1; monotone 1, 3/4, 3/4, 3/4. Recall points
    # 0.00..0.33 (34 points) read 1, the 67 points 0.34..1.00 read 3/4.
    pooled = (34 * 1.0 + 67 * 0.75) / 101
    lesions = summary_json(evaluation)["lesions"]["a"]
    assert lesions["ap50_mean"] == pytest.approx(0.75)
    assert lesions["ap50_pooled"] == pytest.approx(pooled)
    assert lesions["ap75_pooled"] == pytest.approx(pooled)  # every IoU is 1
    assert lesions["ap_pooled_cases"] == 2
    assert lesions["ap50_pooled"] == pooled_average_precision(evaluation.detections, iou_threshold=0.5)
    assert [(d["case_id"], d["structure"], d["n_ref"]) for d in evaluation.detections] == [("x", "a", 2), ("y", "a", 1)]

    written = write_outputs(evaluation, out)
    columns = set(pd.read_csv(written["lesion_summary"]).columns)
    assert not columns & {"scores", "pairs", "detections"}
    assert columns == set(evaluation.lesion_summary.columns)
    content = json.loads(written["summary"].read_text())
    assert content["lesions"]["a"]["ap50_pooled"] == pytest.approx(pooled)
    assert "mean over cases" in content["definitions"]["ap50_mean"]
    assert "dataset-level" in content["definitions"]["ap50_pooled"]
    assert "IoU >= 0.75" in content["definitions"]["ap75_pooled"]
    html = written["report"].read_text()
    assert "ap50_pooled" in html and "mean of the per-case APs" in html and "COCO's dataset-level AP" in html

    # the detections are part of the cached result: a rerun scores nothing and pools the same AP
    scored = _count_pair_calls(monkeypatch)
    again = evaluate(ref_dir, pred_dir, labels=LABELS, things=["a"], probabilities=prob_dir, out=out)
    assert scored() == 0
    assert again.detections == evaluation.detections
    assert summary_json(again)["lesions"]["a"]["ap50_pooled"] == pytest.approx(pooled)

    # without scores there is nothing to pool; a case without a probability map is left out of the pool
    unscored = evaluate(ref_dir, pred_dir, labels=LABELS, things=["a"])
    assert unscored.detections == [] and summary_json(unscored)["lesions"]["a"]["ap50_pooled"] is None
    (prob_dir / "y.nii.gz").unlink()
    only_x = evaluate(ref_dir, pred_dir, labels=LABELS, things=["a"], probabilities=prob_dir)
    assert summary_json(only_x)["lesions"]["a"]["ap50_pooled"] == pytest.approx(1.0)
    assert summary_json(only_x)["lesions"]["a"]["ap_pooled_cases"] == 1


def test_one_case_pooled_equals_its_own_ap() -> None:
    # the detections record of evaluate_pair holds every pair with IoU >= 0.5 and the same scores as the
    # per-case AP: pooled over one case it must give that case's AP50 and AP75
    rng = np.random.default_rng(3)
    smooth = ndimage.gaussian_filter(rng.random((40, 40, 12)), 1.5)
    reference = (smooth > np.quantile(smooth, 0.85)).astype(np.uint8)
    prediction = np.roll(reference, 1, axis=0) | (rng.random(reference.shape) < 0.01)  # shifted + small FPs
    probabilities = rng.random((1, *reference.shape)).astype(np.float32)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    settings = EvaluationSettings(labels=LABELS, things=("a",))
    result = evaluate_pair(
        Volume(reference[None], affine, kind="label"),
        Volume(prediction[None].astype(np.uint8), affine, kind="label"),
        settings=settings,
        probabilities=Volume(probabilities, affine),
    )
    (summary,) = result.lesion_summary
    (record,) = result.detections
    assert summary["n_pred"] > 20 and summary["tp"] > 0 and 0 < summary["ap50"] < 1  # a non-trivial case
    assert record["n_ref"] == summary["n_ref"] and len(record["scores"]) == summary["n_pred"]
    assert pooled_average_precision([record], iou_threshold=0.5) == pytest.approx(summary["ap50"])
    assert pooled_average_precision([record], iou_threshold=0.75) == pytest.approx(summary["ap75"])
