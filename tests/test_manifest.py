"""Manifest reading: MSD dataset.json as is, the superset, data-root safety, folds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_dataset

from medseg.data import kfold_split, load_manifest
from medseg.errors import ManifestError


def test_plain_msd_dataset_json(tmp_path: Path) -> None:
    path = make_dataset(tmp_path, num_cases=6)
    manifest = load_manifest(path)  # data root defaults to the manifest's folder
    assert manifest.case_ids == tuple(f"case_{i:03d}" for i in range(6))
    assert manifest.channels == ("MRI",)
    case = manifest.cases[0]
    assert case.images[0] == (tmp_path / "imagesTr" / "case_000.nii.gz").resolve()
    image, label = manifest.read_image(case), manifest.read_label(case)
    assert image.same_geometry(label) and set(np.unique(label.array)) == {0, 1, 2}
    assert len(manifest.folds) == 5 and sum(len(f) for f in manifest.folds) == 6
    train, val = manifest.fold(0)
    assert {c.case_id for c in train}.isdisjoint({c.case_id for c in val})
    assert len(train) + len(val) == 6
    with pytest.raises(ManifestError, match="fold 5 does not exist"):
        manifest.fold(5)


def test_kfold_matches_sklearn_kfold() -> None:
    ids = [f"c{i:03d}" for i in range(23)]
    folds = kfold_split(ids)
    # scikit-learn KFold(5, shuffle=True, random_state=12345) on sorted ids, reimplemented by hand
    rng = np.random.RandomState(12345)
    order = np.arange(23)
    rng.shuffle(order)
    expected, start = [], 0
    for size in (5, 5, 5, 4, 4):
        expected.append(sorted(ids[i] for i in order[start : start + size]))
        start += size
    assert folds == expected
    assert kfold_split(list(reversed(ids))) == folds  # order of the manifest does not matter


def test_superset_keys(tmp_path: Path) -> None:
    path = make_dataset(tmp_path, num_cases=2)
    content = json.loads(path.read_text())
    content.update(
        regions={"both": ["front", "back"]},
        things=["front"],
        nsd_tolerance_mm={"front": 2.0},
        folds=[["case_000"], ["case_001"]],
    )
    content["training"][0]["id"] = "first"
    content["folds"] = [["first"], ["case_001"]]
    (tmp_path / "m.json").write_text(json.dumps(content))
    manifest = load_manifest(tmp_path / "m.json", data_root=tmp_path)
    assert manifest.labels.regions == {"both": (1, 2)}
    assert manifest.things == ("front",)
    assert manifest.nsd_tolerance_for("front") == 2.0 and manifest.nsd_tolerance_for("back") == 1.0
    assert manifest.case_ids == ("first", "case_001")
    assert [c.case_id for c in manifest.fold(1)[1]] == ["case_001"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda m: m.pop("labels"), "no 'labels'"),
        (lambda m: m.update(training=[], test=[]), "no cases"),
        (lambda m: m["training"][0].update(image="../outside.nii.gz"), "escapes the data root"),
        (lambda m: m["training"][0].update(label="/etc/passwd"), "is absolute"),
        (lambda m: m["training"][0].pop("image"), "has no 'image'"),
        (lambda m: m.update(things=["nonexistent"]), "unknown structures"),
        (lambda m: m.update(folds=[["nope"]]), "unknown training cases"),
        (lambda m: m["training"][1].update(id="case_000"), "duplicate case ids"),
    ],
)
def test_invalid_manifests(tmp_path: Path, mutate, message) -> None:
    path = make_dataset(tmp_path, num_cases=2)
    content = json.loads(path.read_text())
    mutate(content)
    path.write_text(json.dumps(content))
    with pytest.raises(ManifestError, match=message):
        load_manifest(path)


def test_invalid_json_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"labels": {"0": "bg"},\n  "training": [,]}')
    with pytest.raises(ManifestError, match=r"bad\.json: invalid JSON \(line 2"):
        load_manifest(path)


def test_symlink_out_of_root_is_rejected(tmp_path: Path) -> None:
    root = tmp_path / "root"
    path = make_dataset(root, num_cases=1)
    outside = tmp_path / "outside.nii.gz"
    outside.write_bytes((root / "imagesTr" / "case_000.nii.gz").read_bytes())
    (root / "imagesTr" / "link.nii.gz").symlink_to(outside)
    content = json.loads(path.read_text())
    content["training"][0]["image"] = "./imagesTr/link.nii.gz"
    path.write_text(json.dumps(content))
    with pytest.raises(ManifestError, match="escapes the data root"):
        load_manifest(path)


@pytest.mark.parametrize("case_id", ["../../escape", "a/b", ".hidden", "x\\y"])
def test_case_ids_must_be_plain_file_names(tmp_path: Path, case_id: str) -> None:
    path = make_dataset(tmp_path, num_cases=2)
    content = json.loads(path.read_text())
    content["training"][0]["id"] = case_id
    path.write_text(json.dumps(content))
    with pytest.raises(ManifestError, match="not a plain file name"):
        load_manifest(path)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("raters", ["x"], "'raters' must be a JSON object"),
        ("label_value_map", {"label": {"one": 2}}, "must map stored values to label ids"),
    ],
)
def test_mistyped_superset_keys(tmp_path: Path, key: str, value, message: str) -> None:
    path = make_dataset(tmp_path, num_cases=2)
    content = json.loads(path.read_text())
    content[key] = value
    path.write_text(json.dumps(content))
    with pytest.raises(ManifestError, match=message):
        load_manifest(path)


def test_few_cases_give_leave_one_out_folds() -> None:
    assert kfold_split(["a", "b", "c"]) == [["a"], ["b"], ["c"]]
    assert kfold_split(["a"]) == []


def test_test_internal_cases_are_never_planned_trained_or_validated_on(tmp_path: Path) -> None:
    """An internal test split in the manifest (``case_lists`` with ``test_internal``) is kept out of the
    folds, fold ``all`` and the planning fingerprint, and is what ``--subset test_internal`` selects."""
    from medseg.planning import fingerprint_dataset

    path = make_dataset(tmp_path, num_cases=7)
    content = json.loads(path.read_text())
    content["case_lists"] = ["training", "test_internal"]
    content["test_internal"] = content["training"][5:]
    content["training"] = content["training"][:5]
    path.write_text(json.dumps(content))
    manifest = load_manifest(path)
    held_out = {"case_005", "case_006"}
    assert {c.case_id for c in manifest.cases if c.subset == "test_internal"} == held_out
    assert held_out.isdisjoint(i for fold in manifest.folds for i in fold)
    assert held_out.isdisjoint(c.case_id for c in manifest.fold("all")[0])
    for fold in range(len(manifest.folds)):
        train, validation = manifest.fold(fold)
        assert held_out.isdisjoint(c.case_id for c in (*train, *validation))
    assert fingerprint_dataset(manifest)["num_cases"] == 5


def test_hippocampus_manifest_fixes_fold_4_as_test_internal() -> None:
    """The shipped hippocampus manifest: 41 test_internal cases = fold 4 of nnU-Net's split of all 208; its
    4 folds are folds 0-3 of that split, so fold 0 is unchanged."""
    path = Path(__file__).resolve().parents[1] / "data_manifests" / "msd_hippocampus.json"
    content = json.loads(path.read_text())
    every_id = sorted(Path(e["image"]).name.split(".")[0] for e in content["training"] + content["test_internal"])
    nnunet_folds = kfold_split(every_id)
    assert len(every_id) == 208
    assert sorted(Path(e["image"]).name.split(".")[0] for e in content["test_internal"]) == sorted(nnunet_folds[4])
    assert [sorted(f) for f in content["folds"]] == [sorted(f) for f in nnunet_folds[:4]]
