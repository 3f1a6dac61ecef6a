"""Batch evaluation: pairing, statuses, geometry errors, caching, regions, outputs, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medseg.cli import main
from medseg.core.labels import LabelSet
from medseg.core.volume import Volume
from medseg.errors import GeometryMismatchError, LabelValueError
from medseg.evaluation import PER_CASE_COLUMNS, EvaluationSettings, evaluate, evaluate_pair, summarize, write_outputs
from medseg.io import write_volume

LABELS = LabelSet.from_manifest({"0": "background", "1": "a", "2": "b"}, regions={"ab": [1, 2]})


def _volume(array: np.ndarray, spacing=(1.0, 1.0, 2.0)) -> Volume:
    return Volume(array[None].astype(np.uint8), np.diag([*spacing, 1.0]), kind="label")


def _cube(shape=(20, 20, 10), low=(5, 5, 3), high=(10, 10, 6), value=1, into=None) -> np.ndarray:
    array = np.zeros(shape, np.uint8) if into is None else into
    array[low[0] : high[0], low[1] : high[1], low[2] : high[2]] = value
    return array


def test_pair_hand_worked_values() -> None:
    reference = _cube()  # 5x5x3 = 75 voxels of label 1
    prediction = _cube(low=(6, 5, 3), high=(11, 10, 6))  # shifted by 1 voxel along x (1 mm)
    settings = EvaluationSettings(labels=LABELS)
    result = evaluate_pair(_volume(reference), _volume(prediction), settings=settings, case_id="c1")
    rows = {r["structure"]: r for r in result.rows}
    a = rows["a"]
    assert a["status"] == "ok"
    assert a["dice"] == pytest.approx(2 * 60 / 150)
    assert a["iou"] == pytest.approx(60 / 90)
    assert a["ref_ml"] == pytest.approx(75 * 2 / 1000) and a["volume_diff_ml"] == pytest.approx(0)
    assert a["hd_mm"] == pytest.approx(1.0)
    assert rows["b"]["status"] == "both_empty" and np.isnan(rows["b"]["dice"])
    assert rows["ab"]["status"] == "ok" and rows["ab"]["dice"] == pytest.approx(a["dice"])
    assert rows["ab"]["label"] == "1+2"
    assert result.confusion.tolist()[1][1] == 60


def test_pair_empty_statuses() -> None:
    reference = _cube(value=1)
    prediction = _cube(value=2)
    rows = {
        r["structure"]: r
        for r in evaluate_pair(_volume(reference), _volume(prediction), settings=EvaluationSettings(labels=LABELS)).rows
    }
    assert rows["a"]["status"] == "pred_empty" and rows["a"]["dice"] == 0 and np.isnan(rows["a"]["hd95_mm"])
    assert rows["b"]["status"] == "ref_empty" and rows["b"]["dice"] == 0 and np.isnan(rows["b"]["nsd"])
    assert rows["ab"]["status"] == "ok" and rows["ab"]["dice"] == 1.0 and rows["ab"]["hd_mm"] == 0.0


def test_pair_geometry_and_label_errors() -> None:
    reference = _volume(_cube())
    moved = Volume(reference.array, np.diag([1.0, 1.0, 2.5, 1.0]), kind="label", meta={"path": "pred.nii.gz"})
    with pytest.raises(GeometryMismatchError, match=r"pred\.nii\.gz vs .*spacing_mm"):
        evaluate_pair(reference, moved, settings=EvaluationSettings(labels=LABELS))
    # with resampling the same prediction is scored on the reference grid
    result = evaluate_pair(reference, moved, settings=EvaluationSettings(labels=LABELS, resample_prediction=True))
    assert result.rows[0]["status"] == "ok"
    bad = _cube(value=7)
    with pytest.raises(LabelValueError, match=r"label values \[7\]"):
        evaluate_pair(reference, _volume(bad), settings=EvaluationSettings(labels=LABELS))


def test_non_contiguous_label_ids() -> None:
    labels = LabelSet.from_manifest({"0": "background", "255": "vessel"})
    reference = _cube(value=255)
    result = evaluate_pair(_volume(reference), _volume(reference), settings=EvaluationSettings(labels=labels))
    assert result.rows[0]["dice"] == 1.0 and result.rows[0]["label"] == "255"


def _write_batch(root: Path) -> tuple[Path, Path]:
    ref_dir, pred_dir = root / "ref", root / "pred"
    for index in range(4):
        reference = _cube(value=1)
        _cube(low=(12, 12, 2), high=(15, 15, 5), value=2, into=reference)
        write_volume(_volume(reference), ref_dir / f"case{index}.nii.gz")
        if index == 3:
            continue  # missing prediction
        prediction = reference.copy()
        if index == 1:
            prediction = np.roll(prediction, 1, axis=0)
        write_volume(_volume(prediction), pred_dir / f"case{index}.nii.gz")
    return ref_dir, pred_dir


def test_batch_statuses_errors_and_cache(tmp_path: Path) -> None:
    ref_dir, pred_dir = _write_batch(tmp_path)
    # a broken prediction and a prediction on another grid
    (pred_dir / "case2.nii.gz").write_bytes(b"broken")
    write_volume(_volume(_cube(shape=(20, 20, 10)), spacing=(1.0, 1.0, 3.0)), ref_dir / "case4.nii.gz")
    write_volume(_volume(_cube(shape=(20, 20, 11))), pred_dir / "case4.nii.gz")
    write_volume(_volume(_cube()), pred_dir / "orphan.nii.gz")
    out = tmp_path / "out"
    evaluation = evaluate(ref_dir, pred_dir, labels=LABELS, out=out, workers=2)
    statuses = evaluation.cases.set_index("case_id")["status"].to_dict()
    assert statuses == {
        "case0": "ok",
        "case1": "ok",
        "case2": "error",
        "case3": "missing_prediction",
        "case4": "error",
        "orphan": "no_reference",
    }
    messages = evaluation.cases.set_index("case_id")["message"]
    assert "case2.nii.gz: cannot read" in messages["case2"]
    assert "case4.nii.gz vs" in messages["case4"] and "shape" in messages["case4"]
    per_case = evaluation.per_case
    assert list(per_case.columns[: len(PER_CASE_COLUMNS)]) == PER_CASE_COLUMNS
    assert len(per_case) == 5 * 3
    missing = per_case[per_case.case_id == "case3"]
    assert set(missing.status) == {"missing_prediction"} and missing["dice"].isna().all()
    assert missing.set_index("structure").loc["a", "ref_ml"] == pytest.approx(0.15)
    assert per_case.set_index(["case_id", "structure"]).loc[("case0", "a"), "dice"] == 1.0

    written = write_outputs(evaluation, out)
    assert {"per_case", "cases", "summary", "report"} <= set(written)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["structures"]["a"]["status_counts"] == {
        "ok": 2,
        "both_empty": 0,
        "ref_empty": 0,
        "pred_empty": 0,
        "missing_prediction": 1,
        "error": 2,
    }
    assert summary["structures"]["a"]["dice"]["n_scored"] == 2
    assert [f["case_id"] for f in summary["failed_cases"]] == ["case2", "case4"]
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "Failed cases" in html

    # a rerun reuses the cache for unchanged cases and recomputes the changed one
    cache_files = {p.name: p.stat().st_mtime_ns for p in (out / ".cache").iterdir()}
    assert len(cache_files) == 3  # ok, ok, missing (errors are not cached: they are retried)
    write_volume(_volume(np.roll(_cube(), 2, axis=1)), pred_dir / "case0.nii.gz")
    again = evaluate(ref_dir, pred_dir, labels=LABELS, out=out)
    new_files = {p.name: p.stat().st_mtime_ns for p in (out / ".cache").iterdir()}
    changed = [name for name in cache_files if new_files[name] != cache_files[name]]
    assert len(changed) == 1
    # the new case0 prediction: the 5x5x3 cube of "a" moved by 2 voxels along y (overlap 5x3x3 = 45), no "b"
    again_rows = again.per_case.set_index(["case_id", "structure"])
    assert again_rows.loc[("case0", "a"), "dice"] == pytest.approx(2 * 45 / (75 + 75))
    assert again_rows.loc[("case0", "b"), "status"] == "pred_empty"


def test_summarize_worst_case_policy(tmp_path: Path) -> None:
    ref_dir, pred_dir = _write_batch(tmp_path)
    evaluation = evaluate(ref_dir, pred_dir, labels=LABELS)
    default = summarize(evaluation.per_case)
    worst = summarize(evaluation.per_case, empty="worst")
    # "a": case0 and case2 identical (Dice 1), case1 moved by 1 voxel along x (Dice 2*60/150 = 0.8),
    # case3 without a prediction (excluded by default, Dice 0 and HD = image diagonal as the worst case)
    assert default.loc[("a", "dice"), "n_scored"] == 3
    assert default.loc[("a", "dice"), "mean"] == pytest.approx((1 + 0.8 + 1) / 3)
    assert worst.loc[("a", "dice"), "n_scored"] == 4
    assert worst.loc[("a", "dice"), "mean"] == pytest.approx((1 + 0.8 + 1 + 0) / 4)
    assert worst.loc[("a", "dice"), "median"] == pytest.approx(0.9)
    diagonal = float(np.linalg.norm([20 * 1.0, 20 * 1.0, 10 * 2.0]))  # shape (20, 20, 10), spacing (1, 1, 2) mm
    assert worst.loc[("a", "hd_mm"), "n_scored"] == 4
    assert worst.loc[("a", "hd_mm"), "mean"] == pytest.approx((0 + 1 + 0 + diagonal) / 4)
    assert worst.loc[("a", "hd_mm"), "q75"] == pytest.approx(np.percentile([0, 1, 0, diagonal], 75))


def test_cli_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref_dir, pred_dir = _write_batch(tmp_path)
    manifest = tmp_path / "labels.json"
    manifest.write_text(json.dumps({"labels": {"0": "background", "1": "a", "2": "b"}}))
    out = tmp_path / "out"
    code = main(
        [
            "evaluate",
            "--reference",
            str(ref_dir),
            "--prediction",
            str(pred_dir),
            "--labels",
            str(manifest),
            "--out",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "evaluated 4 cases (3 ok, 1 missing_prediction)" in captured.out
    table = pd.read_csv(out / "per_case.csv")
    assert list(table.columns[: len(PER_CASE_COLUMNS)]) == PER_CASE_COLUMNS
    assert (
        main(
            [
                "evaluate",
                "--reference",
                str(tmp_path / "nope"),
                "--prediction",
                str(pred_dir),
                "--labels",
                str(manifest),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "nope: not a folder" in capsys.readouterr().err
    assert not list(out.glob(".*.partial*"))
    assert os.path.exists(out / "report.html")


def test_user_errors_of_one_case_become_error_rows(tmp_path: Path) -> None:
    ref_dir, pred_dir = _write_batch(tmp_path)
    # probabilities on another grid: that case is an error row, the others are scored
    prob_dir = tmp_path / "prob"
    write_volume(Volume(np.zeros((1, 20, 20, 11), np.float32), np.eye(4)), prob_dir / "case0.nii.gz")
    evaluation = evaluate(ref_dir, pred_dir, labels=LABELS, probabilities=prob_dir, things=["a"])
    statuses = evaluation.cases.set_index("case_id")["status"].to_dict()
    assert statuses["case0"] == "error" and statuses["case1"] == "ok"
    assert "geometry differs" in evaluation.cases.set_index("case_id").loc["case0", "message"]
    # connectivity 3 is full connectivity in 3D: every case with a prediction is scored
    full = evaluate(ref_dir, pred_dir, labels=LABELS, things=["a"], connectivity=3)
    assert full.cases.set_index("case_id")["status"].to_dict() == {
        "case0": "ok",
        "case1": "ok",
        "case2": "ok",
        "case3": "missing_prediction",
    }
    assert full.lesion_summary["tp"].tolist() == [1, 1, 1]  # one cube of "a" per case, IoU 1, 60/90, 1


def test_written_tables_are_what_pandas_writes_and_summaries_what_pandas_computes(tmp_path: Path) -> None:
    """medseg evaluate writes and summarises its rows without pandas: every CSV is byte for byte what
    ``DataFrame.to_csv(index=False)`` writes for the same table, and the summary agrees with pandas' groupby."""
    ref_dir, pred_dir = _write_batch(tmp_path)
    (pred_dir / "case2.nii.gz").write_bytes(b"broken")  # an error row: NaNs, a message, a diagonal
    write_volume(_volume(_cube()), pred_dir / "orphan.nii.gz")  # a case without a reference: None fields
    evaluation = evaluate(ref_dir, pred_dir, labels=LABELS, things=["a", "b"])
    assert len(evaluation.tables["lesions"]) and len(evaluation.tables["lesion_summary"])
    written = write_outputs(evaluation, tmp_path / "out", report=False)
    for name in ("per_case", "cases", "lesions", "lesion_summary"):
        frame = getattr(evaluation, name)
        assert written[name].read_text() == frame.to_csv(index=False), name
    per_case = evaluation.per_case
    summary = summarize(per_case)
    for (structure, metric), row in summary.iterrows():
        values = per_case.loc[per_case.structure == structure, metric].dropna()
        assert row["n_scored"] == len(values)
        assert row["mean"] == pytest.approx(values.mean(), nan_ok=True)
        assert row["sd"] == pytest.approx(values.std(ddof=1), nan_ok=True)
        assert row["median"] == pytest.approx(values.median(), nan_ok=True)
        assert row["q25"] == pytest.approx(values.quantile(0.25), nan_ok=True)
        counts = per_case.loc[per_case.structure == structure, "status"].value_counts()
        assert row["n_error"] == counts.get("error", 0) and row["n_ok"] == counts.get("ok", 0)
    assert list(dict.fromkeys(summary.index.get_level_values("structure"))) == list(dict.fromkeys(per_case.structure))
