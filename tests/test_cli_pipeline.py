"""The command line end to end, as a user types it: plan -> train -> predict -> evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from medseg.apps.demo import make_synthetic_dataset
from medseg.cli import main


def test_plan_train_predict_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = make_synthetic_dataset(tmp_path / "data", num_training=5, num_test=2, shape=(24, 28, 24))
    plans = tmp_path / "plans.json"
    assert main(["plan", str(manifest), "--out", str(plans), "--base-features", "4"]) == 0
    assert "3d: spacing_mm" in capsys.readouterr().out
    assert (tmp_path / "fingerprint.json").is_file()
    run = tmp_path / "run"
    code = main(
        [
            "train",
            str(manifest),
            "--plans",
            str(plans),
            "--fold",
            "0",
            "--epochs",
            "1",
            "--out",
            str(run),
            "--threads",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "fold 0: 1 epochs" in out and "validation Dice" in out
    assert (run / "checkpoint_best.pt").is_file() and (run / "history.csv").is_file()
    assert "postprocessing chosen on the validation cases" in out
    rules = json.loads((run / "postprocessing.json").read_text(encoding="utf-8"))
    assert set(rules["rules"]) <= {"anterior", "posterior"}
    # the same run folder again without --resume is refused with one line
    assert main(["train", str(manifest), "--plans", str(plans), "--fold", "0", "--epochs", "1", "--out", str(run)]) == 2
    assert capsys.readouterr().err.startswith("medseg: error:")
    assert (
        main(
            [
                "train",
                str(manifest),
                "--plans",
                str(plans),
                "--fold",
                "9",
                "--epochs",
                "1",
                "--out",
                str(tmp_path / "run9"),
            ]
        )
        == 2
    )
    assert "fold 9" in capsys.readouterr().err
    predictions = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                "--model",
                str(run),
                "--input",
                str(manifest),
                "--subset",
                "test",
                "--output",
                str(predictions),
                "--no-tta",
            ]
        )
        == 0
    )
    assert "predicted 2, reused 0, failed 0" in capsys.readouterr().out
    record = json.loads((predictions / "medseg_predict.json").read_text())
    assert len(record["cases"]) == 2
    assert (
        main(
            [
                "predict",
                "--model",
                str(run),
                "--input",
                str(manifest),
                "--subset",
                "test",
                "--output",
                str(predictions),
                "--no-tta",
            ]
        )
        == 0
    )
    assert "predicted 0, reused 2" in capsys.readouterr().out
    out_dir = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--reference",
                str(manifest),
                "--prediction",
                str(predictions),
                "--subset",
                "test",
                "--out",
                str(out_dir),
                "--no-report",
            ]
        )
        == 0
    )
    table = pd.read_csv(out_dir / "per_case.csv")
    assert len(table) == 2 * 2 and set(table.status) <= {"ok", "pred_empty", "ref_empty"}
