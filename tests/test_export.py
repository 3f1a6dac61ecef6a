"""`medseg export`: model bundles (zip) round trip, hashes checked, tampering and zip slip refused."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import oblique_affine  # noqa: E402
from test_inference import write_checkpoint  # noqa: E402

from medseg.cli import main  # noqa: E402
from medseg.core.volume import Volume  # noqa: E402
from medseg.errors import CheckpointError  # noqa: E402
from medseg.inference.batch import predict_batch  # noqa: E402
from medseg.inference.export import export_model  # noqa: E402
from medseg.io import read_volume, write_volume  # noqa: E402
from medseg.model import bundle  # noqa: E402
from medseg.model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HISTORY = [
    {"epoch": 1, "val_dice_a": None, "val_dice_mean": None},
    {"epoch": 2, "val_dice_a": 0.5, "val_dice_b": 0.25, "val_dice_mean": 0.375},
    {"epoch": 3, "val_dice_a": float("nan"), "val_dice_mean": float("nan")},
]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Bundles extract under the test's folder, not the user's ~/.cache."""
    root = tmp_path / "bundle_cache"
    monkeypatch.setattr(bundle, "default_cache_root", lambda: root)
    return root


def _run(folder: Path, *, seed: int) -> Path:
    """A run folder as training leaves it: checkpoints with optimizer state and history, resolved_config.json."""
    write_checkpoint(folder, seed=seed)
    for name in ("checkpoint_last.pt", "checkpoint_best.pt"):
        content = load_checkpoint(folder / name)
        content["fold"] = seed
        content["training"] = {
            "optimizer": {"state": {0: {"exp_avg": torch.ones(10)}}, "param_groups": []},
            "rng": {"torch": torch.zeros(4, dtype=torch.uint8)},
            "epoch": 3,
            "history": HISTORY,
        }
        save_checkpoint(content, folder / name)
    resolved = {
        "manifest": {"name": "tiny", "path": str(folder.parent / "dataset.json"), "data_root": "/secret", "things": []},
        "fold": seed,
        "out_dir": str(folder),
        "validation_cases": ["case_000", "case_001"],
    }
    (folder / "resolved_config.json").write_text(json.dumps(resolved))
    return folder


@pytest.fixture
def cv(tmp_path) -> Path:
    """Two fold runs with postprocessing and refinement rules in the folder holding them."""
    root = tmp_path / "cv"
    root.mkdir()
    (root / "dataset.json").write_text('{"name": "tiny"}')
    _run(root / "fold_0", seed=0)
    _run(root / "fold_1", seed=1)
    rules = {"format_version": 1, "rules": {"a": {"keep_largest": True, "min_size_mm3": None}}}
    (root / "postprocessing.json").write_text(json.dumps(rules))
    (root / "refinement.json").write_text('{"structures": {}}')
    return root


def _inputs(folder: Path, count: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    for index in range(count):
        image = Volume(rng.normal(size=(1, 18, 15, 9)).astype(np.float32) + 2, oblique_affine())
        write_volume(image, folder / f"case_{index}.nii.gz")
    return folder


def _rewrite(source: Path, target: Path, *, replace=None, drop=(), add=None) -> Path:
    """Copy a zip, replacing, dropping or adding entries (the card is kept as it is)."""
    replace, add = replace or {}, add or {}
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            if info.filename in drop:
                continue
            new.writestr(info.filename, replace.get(info.filename, old.read(info)))
        for name, data in add.items():
            new.writestr(name, data)
    return target


def test_export_round_trip_card_hashes_and_identical_predictions(cv, tmp_path, private_cache):
    export = export_model(cv, out=tmp_path / "model.zip")
    assert export.sha256 == hashlib.sha256((tmp_path / "model.zip").read_bytes()).hexdigest()
    with zipfile.ZipFile(export.path) as archive:
        names = set(archive.namelist())
        card = json.loads(archive.read("model_card.json"))
        for name, entry in card["files"].items():  # every file's hash, as written
            data = archive.read(name)
            assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
        markdown = archive.read("MODEL_CARD.md").decode()
        resolved = json.loads(archive.read("fold_0/resolved_config.json"))
    assert names == set(card["files"]) | {"model_card.json"}
    assert {"fold_0/checkpoint_last.pt", "fold_1/checkpoint_last.pt", "fold_0/plans.json", "labels.json"} <= names
    assert {"postprocessing.json", "refinement.json", "MODEL_CARD.md"} <= names
    assert card["checkpoint"] == "last" and [f["fold"] for f in card["folds"]] == [0, 1]
    # the last validated epoch of `last` (epoch 3 is NaN), to the card and the markdown
    assert card["folds"][0]["validation"] == {"epoch": 2, "val_dice_a": 0.5, "val_dice_b": 0.25, "val_dice_mean": 0.375}
    assert "val_dice_a 0.5000" in markdown and card["files"]["fold_1/checkpoint_last.pt"]["sha256"] in markdown
    source_hash = hashlib.sha256((cv / "dataset.json").read_bytes()).hexdigest()
    assert card["training_data"] == [
        {"manifest": "tiny", "manifest_file": "dataset.json", "manifest_sha256": source_hash, "num_cases": None}
    ]
    assert {"medseg", "torch", "monai"} <= set(card["versions"])
    assert "data_root" not in resolved["manifest"] and "out_dir" not in resolved  # no local paths
    # the shared checkpoints are the runs' own, byte for byte (their hashes bind refinement.json)
    folder = bundle.open_bundle(export.path)
    for index in (0, 1):
        original = (cv / f"fold_{index}" / "checkpoint_last.pt").read_bytes()
        assert (folder / f"fold_{index}" / "checkpoint_last.pt").read_bytes() == original
        assert card["folds"][index]["source_checkpoint_sha256"] == hashlib.sha256(original).hexdigest()
    # predicting with the zip equals predicting with the runs (ensemble + postprocessing)
    inputs = _inputs(tmp_path / "in")
    from_runs = predict_batch(cv, inputs, tmp_path / "runs_out", device="cpu", tta=False, progress=False)
    from_zip = predict_batch(export.path, inputs, tmp_path / "zip_out", device="cpu", tta=False, progress=False)
    assert sorted(from_zip.predicted) == sorted(from_runs.predicted) == ["case_0", "case_1"]
    for case in ("case_0", "case_1"):
        a = read_volume(tmp_path / "runs_out" / f"{case}.nii.gz", kind="label")
        b = read_volume(tmp_path / "zip_out" / f"{case}.nii.gz", kind="label")
        assert np.array_equal(a.array, b.array) and b.same_geometry(a)
    record = json.loads((tmp_path / "zip_out" / "medseg_predict.json").read_text())
    assert record["model"]["postprocessing"]["rules"] == {"a": {"keep_largest": True, "min_size_mm3": None}}
    runs_record = json.loads((tmp_path / "runs_out" / "medseg_predict.json").read_text())
    hashes = [c["sha256"] for c in record["model"]["checkpoints"]]
    assert len(hashes) == 2 and hashes == [c["sha256"] for c in runs_record["model"]["checkpoints"]]
    # the extraction is cached by the zip's hash, and reused
    assert (private_cache / export.sha256).is_dir() and bundle.open_bundle(export.path) == folder


def test_best_checkpoint_and_one_run(cv, tmp_path):
    export = export_model(cv / "fold_1", out=tmp_path / "one.zip", which="best", name="tiny model")
    assert export.card["name"] == "tiny model" and export.card["checkpoints"] == ["fold_0/checkpoint_best.pt"]
    assert export.card["folds"][0]["validation"]["val_dice_mean"] == 0.375  # from checkpoint_last.pt
    assert export.card["postprocessing"] is True  # found where the Segmenter finds it: in the parent folder
    paths = bundle.bundle_checkpoints(export.path)
    assert [p.name for p in paths] == ["checkpoint_best.pt"] and paths[0].is_file()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("flip", "fold_0/checkpoint_last.pt does not match the SHA-256"),
        ("truncate", "fold_0/checkpoint_last.pt is"),
        ("drop", "labels.json is listed in model_card.json but missing"),
        ("extra", "evil.py is in the bundle but not listed"),
        ("plans", "fold_1/plans.json does not match"),
    ],
)
def test_tampered_missing_or_extra_file_is_refused(cv, tmp_path, capsys, change, message):
    export = export_model(cv, out=tmp_path / "model.zip")
    with zipfile.ZipFile(export.path) as archive:
        weights = bytearray(archive.read("fold_0/checkpoint_last.pt"))
        plans = archive.read("fold_1/plans.json")
    weights[len(weights) // 2] ^= 0xFF
    edits = {
        "flip": {"replace": {"fold_0/checkpoint_last.pt": bytes(weights)}},
        "truncate": {"replace": {"fold_0/checkpoint_last.pt": bytes(weights[:-100])}},
        "drop": {"drop": ("labels.json",)},
        "extra": {"add": {"evil.py": b"import os"}},
        "plans": {"replace": {"fold_1/plans.json": plans.replace(b'"3d"', b'"3D"')}},
    }[change]
    tampered = _rewrite(export.path, tmp_path / "tampered.zip", **edits)
    with pytest.raises(CheckpointError, match=message):
        bundle.open_bundle(tampered)
    inputs = _inputs(tmp_path / "in", count=1)
    code = main(["predict", "--model", str(tampered), "--input", str(inputs), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("medseg: error: ") and message in err[0]
    assert not (tmp_path / "o" / "case_0.nii.gz").exists()


@pytest.mark.parametrize("name", ["../escaped.txt", "/tmp/medseg_absolute.txt", "fold_0/../../escaped.txt"])
def test_zip_slip_is_refused_before_anything_is_written(cv, tmp_path, private_cache, name):
    export = export_model(cv, out=tmp_path / "model.zip")
    card = json.loads(zipfile.ZipFile(export.path).read("model_card.json"))
    card["files"][name] = {"sha256": hashlib.sha256(b"x").hexdigest(), "bytes": 1}  # even listed in the card
    evil = _rewrite(export.path, tmp_path / "evil.zip", replace={"model_card.json": json.dumps(card)}, add={name: b"x"})
    with pytest.raises(CheckpointError, match="unsafe path"):
        bundle.open_bundle(evil)
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/medseg_absolute.txt").exists()
    assert not private_cache.exists() or not any(private_cache.iterdir())


def test_pickled_objects_in_a_bundle_are_not_loaded(cv, tmp_path):
    """Even with a card rewritten to match, a checkpoint holding arbitrary objects is refused (weights_only)."""
    export = export_model(cv / "fold_0", out=tmp_path / "model.zip")
    content = load_checkpoint(cv / "fold_0" / "checkpoint_last.pt")
    content["payload"] = Path("/etc/passwd")  # an arbitrary class: needs full unpickling
    torch.save(content, tmp_path / "evil.pt")
    data = (tmp_path / "evil.pt").read_bytes()
    card = json.loads(zipfile.ZipFile(export.path).read("model_card.json"))
    card["files"]["fold_0/checkpoint_last.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    evil = _rewrite(
        export.path,
        tmp_path / "evil.zip",
        replace={"model_card.json": json.dumps(card), "fold_0/checkpoint_last.pt": data},
    )
    from medseg.inference import Segmenter

    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        Segmenter.from_checkpoint(evil, device="cpu")
    with pytest.raises(CheckpointError, match="SHA-256 .* is not the expected"):
        bundle.open_bundle(evil, expected_sha256=export.sha256)


def test_damaged_cache_is_extracted_again(cv, tmp_path, private_cache):
    export = export_model(cv / "fold_0", out=tmp_path / "model.zip")
    folder = bundle.open_bundle(export.path)
    (folder / "postprocessing.json").write_text("{}")  # someone edits the extracted copy
    (folder / "fold_0" / "checkpoint_last.onnx").write_bytes(b"cache")  # the ONNX cache may live there
    again = bundle.open_bundle(export.path)
    assert again == folder and bundle._cached_copy_ok(again, (again / "model_card.json").read_bytes())
    card = json.loads((again / "model_card.json").read_text())
    card["files"]["postprocessing.json"]["sha256"] = hashlib.sha256(b"{}").hexdigest()
    (again / "model_card.json").write_text(json.dumps(card))  # file and card edited together
    (again / "postprocessing.json").write_text("{}")
    assert json.loads((bundle.open_bundle(export.path) / "postprocessing.json").read_text())["rules"]
    assert json.loads((again / "postprocessing.json").read_text())["rules"]


def test_missing_run_and_bad_output_are_one_line_errors(cv, tmp_path, capsys):
    with pytest.raises(CheckpointError, match="nothing"):
        export_model([cv / "fold_0", tmp_path / "nothing"], out=tmp_path / "m.zip")
    code = main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "m.zip")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(tmp_path / "nothing") in err[0]
    assert main(["export", str(cv / "fold_0"), "--out", str(tmp_path / "m.tar")]) == 2
    assert "a model bundle is a .zip file" in capsys.readouterr().err
    assert not (tmp_path / "m.zip").exists() and not (tmp_path / "m.tar").exists()
    code = main(["export", str(cv), "--out", str(tmp_path / "m.zip")])
    assert code == 0 and "2 fold(s)" in capsys.readouterr().out and zipfile.is_zipfile(tmp_path / "m.zip")
    assert main(["predict", "--model", str(tmp_path / "nothing.zip"), "--input", str(tmp_path), "--output", "o"]) == 2
    assert "nothing.zip" in capsys.readouterr().err
