"""Errors caught at the boundary: one line naming the file or option, a non-zero exit, no traceback.

Covers a read-only or full output folder, a hand-edited plans.json with a missing or mistyped key,
an invalid option value, CUDA out-of-memory, and that a bug (an unexpected exception) still keeps
its traceback. Also: torch's thread count is restored after training, and ``medseg predict``
defaults to the last checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import make_dataset

from medseg.cli import main
from medseg.data.manifest import load_manifest
from medseg.errors import MedsegUserError, OutputError
from medseg.planning import fingerprint_dataset, load_plans, make_plans

SMALL = dict(iterations_per_epoch=1, validate_every=1, batch_size=2, progress=False, device="cpu")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    manifest_path = make_dataset(root, num_cases=5, shape=(16, 18, 10))
    manifest = load_manifest(manifest_path)
    plans = make_plans(fingerprint_dataset(manifest, workers=1), base_features=4)
    plans_path = root / "plans.json"
    plans_path.write_text(json.dumps(plans))
    return manifest_path, plans_path, root


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("medseg: error: "), err
    assert "Traceback" not in err
    return lines[0]


# -- plans.json edited by hand -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda p: p["configurations"]["3d"].pop("patch_size"), "configurations.3d.patch_size"),
        (lambda p: p["configurations"]["3d"].update(batch_size="two"), "configurations.3d.batch_size"),
        (lambda p: p["configurations"]["2d"].update(spatial_dims=4), "configurations.2d.spatial_dims"),
        (lambda p: p["training"].update(optimizer="adam"), "training.optimizer"),
        (lambda p: p["training"].update(learning_rate="fast"), "training.learning_rate"),
        (lambda p: p["normalization"][0].update(scheme="minmax"), "normalization[0].scheme"),
        (lambda p: p.pop("normalization"), "normalization"),
        (lambda p: p["augmentation"].update(mirorr=0.5), "augmentation"),
    ],
)
def test_hand_edited_plans_name_the_file_and_key(dataset, tmp_path, capsys, edit, key):
    manifest_path, plans_path, _ = dataset
    plans = json.loads(plans_path.read_text())
    edit(plans)
    edited = tmp_path / "plans.json"
    edited.write_text(json.dumps(plans))
    with pytest.raises(MedsegUserError) as caught:
        load_plans(edited)
    assert str(edited) in str(caught.value) and key.split(".")[0].split("[")[0] in str(caught.value)
    code = main(["train", str(manifest_path), "--plans", str(edited), "--out", str(tmp_path / "run"), "--epochs", "1"])
    assert code == 2
    line = _one_error_line(capsys)
    assert str(edited) in line and key.split("[")[0].split(".")[0] in line
    assert not (tmp_path / "run" / "checkpoint_last.pt").exists()  # refused before any training


# -- output folders that cannot be written -------------------------------------------------------
def test_full_disk_while_writing_evaluation_outputs(dataset, tmp_path, capsys, monkeypatch):
    manifest_path, _, root = dataset
    out = tmp_path / "eval"

    real_replace = os.replace

    def disk_full(src, dst, *args, **kwargs):
        if str(dst).endswith("per_case.csv"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", disk_full)
    code = main(
        [
            "evaluate",
            "--reference",
            str(manifest_path),
            "--prediction",
            str(root / "labelsTr"),
            "--out",
            str(out),
            "--no-report",
        ]
    )
    assert code == 2
    line = _one_error_line(capsys)
    assert "per_case.csv: cannot write (No space left on device)" in line
    assert not list(out.glob("*partial*")) and not list(out.glob(".*partial*"))


def test_permission_denied_on_the_output_folder(dataset, tmp_path, capsys, monkeypatch):
    manifest_path, _, root = dataset
    out = tmp_path / "locked" / "eval"
    real_mkdir = Path.mkdir

    def denied(self, *args, **kwargs):
        if "locked" in str(self):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", denied)
    code = main(
        [
            "evaluate",
            "--reference",
            str(manifest_path),
            "--prediction",
            str(root / "labelsTr"),
            "--out",
            str(out),
            "--no-report",
        ]
    )
    assert code == 2
    line = _one_error_line(capsys)
    assert "locked" in line and "Permission denied" in line


def test_atomic_writes_turn_os_errors_into_output_errors(tmp_path, monkeypatch):
    from medseg.io.files import write_json

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(OutputError, match=r"summary\.json: cannot write \(Permission denied\)"):
        write_json({"a": 1}, tmp_path / "summary.json")
    assert os.listdir(tmp_path) == []


# -- invalid options -----------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["4", "0"])
def test_invalid_connectivity_is_refused_before_any_case(dataset, tmp_path, capsys, value):
    manifest_path, _, root = dataset
    code = main(
        [
            "evaluate",
            "--reference",
            str(manifest_path),
            "--prediction",
            str(root / "labelsTr"),
            "--out",
            str(tmp_path / "eval"),
            "--connectivity",
            value,
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "connectivity" in err and "Traceback" not in err
    assert not (tmp_path / "eval").exists()  # nothing was processed or written


def test_invalid_time_limit_is_refused(dataset, tmp_path, capsys):
    manifest_path, plans_path, _ = dataset
    code = main(
        ["train", str(manifest_path), "--plans", str(plans_path), "--out", str(tmp_path / "r"), "--time-limit-min", "0"]
    )
    assert code == 2
    assert "time limit must be > 0" in _one_error_line(capsys)


# -- out of memory, and bugs ----------------------------------------------------------------------
def test_cuda_out_of_memory_is_one_line(dataset, tmp_path, capsys, monkeypatch):
    manifest_path, plans_path, _ = dataset
    import medseg.training.loop as loop

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loop, "train", oom)
    code = main(["train", str(manifest_path), "--plans", str(plans_path), "--out", str(tmp_path / "r")])
    assert code == 2
    line = _one_error_line(capsys)
    assert "out of memory" in line and "--device cpu" in line


def test_a_bug_keeps_its_traceback(dataset, tmp_path, monkeypatch):
    manifest_path, plans_path, _ = dataset
    import medseg.training.loop as loop

    def bug(*args, **kwargs):
        raise KeyError("a bug in medseg")

    monkeypatch.setattr(loop, "train", bug)
    with pytest.raises(KeyError, match="a bug in medseg"):
        main(["train", str(manifest_path), "--plans", str(plans_path), "--out", str(tmp_path / "r")])


# -- process state --------------------------------------------------------------------------------
def test_training_restores_torch_threads(dataset, tmp_path):
    from medseg.training import train

    manifest_path, plans_path, _ = dataset
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    train(manifest_path, plans=plans_path, out_dir=tmp_path / "run", epochs=1, num_threads=wanted, **SMALL)
    assert torch.get_num_threads() == before


def test_predict_defaults_to_the_last_checkpoint(dataset, tmp_path):
    """``best`` is chosen on the run's own validation cases: prediction uses ``last`` unless asked."""
    from medseg.inference import Segmenter, predict_batch
    from medseg.model.checkpoint import load_checkpoint, save_checkpoint
    from medseg.training import train

    manifest_path, plans_path, root = dataset
    run = tmp_path / "run"
    train(manifest_path, plans=plans_path, out_dir=run, epochs=1, **SMALL)
    # make best and last differ: best's weights are zeroed
    best = load_checkpoint(run / "checkpoint_best.pt")
    best["model"] = {k: torch.zeros_like(v) for k, v in best["model"].items()}
    save_checkpoint(best, run / "checkpoint_best.pt")
    default = Segmenter.from_checkpoint(run, device="cpu", postprocessing=None)
    assert default.checkpoints[0][0].endswith("checkpoint_last.pt")
    chosen = Segmenter.from_checkpoint(run, which="best", device="cpu", postprocessing=None)
    assert chosen.checkpoints[0][0].endswith("checkpoint_best.pt")
    result = predict_batch(run, root / "imagesTr", tmp_path / "pred", progress=False, postprocessing=None)
    record = json.loads((tmp_path / "pred" / "medseg_predict.json").read_text())
    assert result.ok and record["options"]["which"] == "last"
    assert record["model"]["checkpoints"][0]["path"].endswith("checkpoint_last.pt")
    assert len(result.predicted) == len(list((root / "imagesTr").iterdir()))
