"""Manifest.select: part of a dataset, for evaluating or training on a few cases."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_dataset

from medseg.data import load_manifest
from medseg.errors import ManifestError
from medseg.evaluation.batch import evaluate
from medseg.io import write_volume


def test_select_keeps_manifest_order_and_restricts_folds(tmp_path: Path) -> None:
    manifest = load_manifest(make_dataset(tmp_path, num_cases=10))
    chosen = manifest.select(["case_007", "case_002", "case_005", "case_000"])
    assert chosen.case_ids == ("case_000", "case_002", "case_005", "case_007")
    assert chosen.labels == manifest.labels and chosen.data_root == manifest.data_root
    for k in range(len(manifest.folds)):
        full_train, full_val = manifest.fold(k)
        train, val = chosen.fold(k)
        assert [c.case_id for c in val] == [c.case_id for c in full_val if c.case_id in chosen.case_ids]
        assert [c.case_id for c in train] == [c.case_id for c in full_train if c.case_id in chosen.case_ids]
    assert manifest.case_ids == tuple(f"case_{i:03d}" for i in range(10))  # the original is unchanged


def test_select_refuses_unknown_or_no_ids(tmp_path: Path) -> None:
    manifest = load_manifest(make_dataset(tmp_path, num_cases=3))
    with pytest.raises(ManifestError, match="no case 'case_999' to select"):
        manifest.select(["case_000", "case_999"])
    with pytest.raises(ManifestError, match="at least one case id"):
        manifest.select([])
    assert manifest.select("case_001").case_ids == ("case_001",)  # one id as a plain string


def test_evaluate_a_selection_scores_only_its_cases(tmp_path: Path) -> None:
    manifest = load_manifest(make_dataset(tmp_path / "data", num_cases=5))
    predictions = tmp_path / "predictions"
    for case in manifest.cases[:2]:
        write_volume(manifest.read_label(case), predictions / f"{case.case_id}.nii.gz")
    whole = evaluate(manifest, predictions)
    assert (whole.cases["status"] == "missing_prediction").sum() == 3
    part = evaluate(manifest.select(["case_000", "case_001"]), predictions)
    assert part.cases["case_id"].tolist() == ["case_000", "case_001"]
    assert (part.cases["status"] == "ok").all() and (part.per_case["dice"] == 1.0).all()
