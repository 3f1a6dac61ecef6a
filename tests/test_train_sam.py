"""``medseg train-sam``: a tiny SAM fine-tuned for a few steps learns (the loss falls) and loads everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from medseg.cli import main  # noqa: E402
from medseg.core.volume import Volume  # noqa: E402
from medseg.io import write_volume  # noqa: E402
from medseg.refine.protocol import SlicePrompt  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def bright_disc_dataset(root: Path, *, num_cases: int = 5) -> Path:
    """Cases of one bright ellipsoid (label 1) on noise, of varying size and place; dataset.json."""
    rng = np.random.default_rng(3)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir(parents=True)
    shape = (32, 32, 5)
    grid = np.indices(shape).astype(np.float64)
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    training = []
    for index in range(num_cases):
        centre = rng.uniform(11, 21, size=2)
        radius = rng.uniform(5, 8)
        label = ((grid[0] - centre[0]) ** 2 + (grid[1] - centre[1]) ** 2) / radius**2 + ((grid[2] - 2) / 2.6) ** 2 < 1
        image = label * 2.0 + rng.normal(0, 0.3, shape) + 1.0
        name = f"case_{index}.nii.gz"
        write_volume(Volume(image[None].astype(np.float32), affine), root / "imagesTr" / name)
        write_volume(Volume(label[None].astype(np.uint8), affine, kind="label"), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    manifest = {
        "name": "discs",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "disc"},
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(manifest))
    return root / "dataset.json"


def test_train_sam_tiny_loss_falls_and_writes_a_loadable_checkpoint(tmp_path):
    from medseg.refine.loading import load_sam
    from medseg.refine.train_sam import TrainSamOptions, train_sam

    manifest = bright_disc_dataset(tmp_path / "data")
    options = TrainSamOptions(
        steps=40, batch_size=4, lr=3e-3, validate_every=20, max_train_slices=20, max_val_slices=5, device="cpu"
    )
    record = train_sam("tiny", manifest=manifest, fold=0, out=tmp_path / "sam", options=options, progress=False)
    losses = np.array(record["losses"])
    assert len(losses) == 40 and np.all(np.isfinite(losses))
    assert losses[-10:].mean() < 0.9 * losses[:10].mean()  # it learns
    assert record["val_dice_after"] > record["val_dice_before"] + 0.2  # on the fold's validation slices too
    assert record["val_cases"] and not set(record["val_cases"]) & set(record["train_cases"])
    assert {p.name for p in (tmp_path / "sam").iterdir()} >= {"config.json", "model.safetensors", "train_sam.json"}
    assert not list((tmp_path / "sam").glob(".partial*"))
    # a second run replaces the folder as a whole: no file of the first run and no staging folder remain
    (tmp_path / "sam" / "stale.txt").write_text("from before")
    short = TrainSamOptions(steps=2, batch_size=2, validate_every=2, max_train_slices=4, max_val_slices=2, device="cpu")
    again = train_sam("tiny", manifest=manifest, fold=0, out=tmp_path / "sam", options=short, progress=False)
    assert again["steps_done"] == 2 and not (tmp_path / "sam" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert (tmp_path / "sam" / "model.safetensors").is_file()
    backend = load_sam(tmp_path / "sam", device="cpu")  # the loader every --sam command uses
    from medseg.refine.train_sam import new_tiny_sam

    assert backend.transform == new_tiny_sam(seed=0).transform  # saved with the pixels it was trained on
    trained = dict(backend.model.named_parameters())
    assert all(torch.isfinite(p).all() for p in trained.values())
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[10:20, 8:18] = 255
    candidates = backend.decode(backend.embed(rgb), SlicePrompt(box_rc=(10, 8, 19, 17)))
    assert len(candidates) == 3 and candidates[0].mask.shape == (32, 32)


def test_train_sam_cli_one_line_errors(tmp_path, capsys):
    manifest = bright_disc_dataset(tmp_path / "data", num_cases=3)
    code = main(
        ["train-sam", "--sam", str(tmp_path / "missing"), "--manifest", str(manifest), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("medseg: error:") and "missing" in err and len(err.splitlines()) == 1
    code = main(
        [
            "train-sam",
            "--sam",
            "tiny",
            "--manifest",
            str(manifest),
            "--out",
            str(tmp_path / "o"),
            "--structure",
            "liver",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "unknown structure 'liver'" in err and len(err.splitlines()) == 1
