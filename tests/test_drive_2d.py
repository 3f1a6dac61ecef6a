"""2D image datasets (DRIVE-style RGB TIFF + GIF labels 0/255 + a second observer): plan, train, predict, evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medseg.cli import main

SHAPE_XY = (44, 36)  # columns x rows of the synthetic photographs


def _write_gif(array_xy: np.ndarray, path: Path) -> None:
    """A palette GIF whose palette indices are the values (as DRIVE's manual GIFs)."""
    from PIL import Image

    rows = np.ascontiguousarray(array_xy.T.astype(np.uint8))
    image = Image.new("P", (rows.shape[1], rows.shape[0]))
    image.putdata(rows.ravel().tolist())
    image.putpalette([v for i in range(256) for v in (i, i, i)])
    image.save(path, optimize=False)


def make_drive_like(root: Path, *, num_training: int = 4, num_test: int = 2) -> Path:
    """A tiny DRIVE-like dataset: RGB TIFF photographs with dark 'vessels', observer 1 (0/255 GIF),
    observer 2 (0/1 GIF, shifted by one pixel), a circular field-of-view mask, and its manifest."""
    from PIL import Image

    rng = np.random.default_rng(3)
    x, y = np.meshgrid(np.arange(SHAPE_XY[0]), np.arange(SHAPE_XY[1]), indexing="ij")
    fov = (x - SHAPE_XY[0] / 2) ** 2 + (y - SHAPE_XY[1] / 2) ** 2 < (0.48 * min(SHAPE_XY)) ** 2
    entries: dict[str, list[dict[str, str]]] = {"training": [], "test_labelled": []}
    for index in range(num_training + num_test):
        subset = "training" if index < num_training else "test_labelled"
        folder = root / subset
        folder.mkdir(parents=True, exist_ok=True)
        vessel = np.zeros(SHAPE_XY, bool)
        for _ in range(3):
            column = int(rng.integers(6, SHAPE_XY[0] - 6))
            vessel[column : column + 2, :] = True
        row = int(rng.integers(6, SHAPE_XY[1] - 6))
        vessel[:, row : row + 2] = True
        vessel &= fov
        red = np.where(fov, 180 + rng.normal(0, 8, SHAPE_XY), 0)
        green = np.where(vessel, 40, np.where(fov, 120, 0)) + rng.normal(0, 6, SHAPE_XY) * fov
        blue = np.where(fov, 60 + rng.normal(0, 5, SHAPE_XY), 0)
        rgb = np.clip(np.stack([red, green, blue], axis=-1), 0, 255).astype(np.uint8)  # (x, y, 3)
        name = f"{index + 1:02d}_{subset}"
        Image.fromarray(np.ascontiguousarray(np.transpose(rgb, (1, 0, 2)))).save(folder / f"{name}.tif")
        _write_gif(vessel * 255, folder / f"{name}_manual1.gif")
        _write_gif(fov * 255, folder / f"{name}_mask.gif")
        entry = {
            "image": f"./{subset}/{name}.tif",
            "label": f"./{subset}/{name}_manual1.gif",
            "fov_mask": f"./{subset}/{name}_mask.gif",
        }
        if subset == "test_labelled":
            _write_gif(np.roll(vessel, 1, axis=0).astype(np.uint8), folder / f"{name}_manual2.gif")
            entry["label_observer2"] = f"./{subset}/{name}_manual2.gif"
        entries[subset].append(entry)
    manifest = {
        "name": "drive_like",
        "tensorImageSize": "2D",
        "modality": {"0": "RGB fundus photograph"},
        "labels": {"0": "background", "255": "vessel"},
        "case_lists": ["training", "test_labelled"],
        "raters": {"label_observer2": "observer2"},
        "label_value_map": {"label_observer2": {"1": 255}},
        **entries,
    }
    path = root / "drive_like.json"
    path.write_text(json.dumps(manifest, indent=2))
    return path


def _plan(manifest: Path, out: Path, architecture: str) -> dict:
    assert main(["plan", str(manifest), "--out", str(out), "--base-features", "4", "--architecture", architecture]) == 0
    plans = json.loads(out.read_text())
    assert list(plans["configurations"]) == ["2d"]  # 2D images: the 2D configuration only
    cfg = plans["configurations"]["2d"]
    assert cfg["slice_axis"] == 2 and cfg["spacing_mm"] == [1.0, 1.0, 1.0]
    assert [n["channel"] for n in plans["normalization"]] == [f"RGB fundus photograph {c}" for c in "RGB"]
    cfg["network"].update(
        {k: 8 for k in ("aspp_channels", "decoder_channels", "low_level_channels")}
        if architecture == "deeplabv3plus"
        else {}
    )
    plans["training"]["iterations_per_epoch"] = 4
    out.write_text(json.dumps(plans))
    return plans


@pytest.mark.parametrize("architecture", ["dynunet", "fcn"])
def test_plan_train_predict_evaluate_a_2d_image_dataset(tmp_path, architecture, capsys, one_torch_thread) -> None:
    if architecture != "dynunet":
        pytest.importorskip("torchvision")
    from medseg.io import read_volume

    manifest = make_drive_like(tmp_path / "data")
    plans_path = tmp_path / "plans.json"
    _plan(manifest, plans_path, architecture)
    run = tmp_path / "run"
    train_args = ["train", str(manifest), "--plans", str(plans_path), "--config", "2d", "--fold", "0"]
    assert main([*train_args, "--epochs", "1", "--out", str(run), "--threads", "1"]) == 0, capsys.readouterr()
    assert "validation Dice: vessel" in capsys.readouterr().out
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
                "test_labelled",
                "--output",
                str(predictions),
            ]
        )
        == 0
    )
    capsys.readouterr()
    for image_path in sorted((tmp_path / "data" / "test_labelled").glob("*_test_labelled.tif")):
        image, prediction = read_volume(image_path), read_volume(predictions / image_path.name, kind="label")
        assert prediction.spatial_shape == image.spatial_shape == SHAPE_XY  # exact 2D geometry
        assert np.array_equal(prediction.affine, image.affine)
        assert set(np.unique(prediction.array)) <= {0, 255}  # class 1 written as the label id 255
    # a folder of RGB photographs: one file per case holds the three channels
    folder = tmp_path / "photos"
    folder.mkdir()
    source = sorted((tmp_path / "data" / "test_labelled").glob("*_test_labelled.tif"))[0]
    (folder / source.name).write_bytes(source.read_bytes())
    assert (
        main(["predict", "--model", str(run), "--input", str(folder), "--output", str(tmp_path / "p2"), "--no-tta"])
        == 0
    )
    assert read_volume(tmp_path / "p2" / source.name, kind="label").spatial_shape == SHAPE_XY
    capsys.readouterr()
    evaluation = tmp_path / "eval"
    code = main(
        [
            "evaluate",
            "--reference",
            str(manifest),
            "--prediction",
            str(predictions),
            "--subset",
            "test_labelled",
            "--out",
            str(evaluation),
        ]
    )
    assert code == 0, capsys.readouterr()
    per_case = pd.read_csv(evaluation / "per_case.csv")
    # every case scored (a network after 4 iterations may still predict no vessel: pred_empty)
    assert len(per_case) == 2 and set(per_case["status"]) <= {"ok", "pred_empty"}
    inter = pd.read_csv(evaluation / "inter_rater.csv")  # the human baseline: observer 2 against observer 1
    assert len(inter) == 2 and inter["dice"].between(0.0, 0.999).all()  # shifted by a pixel: not identical
    per_rater = pd.read_csv(evaluation / "per_rater.csv")
    assert {"rater1", "observer2"} <= set(per_rater["rater"])
    report = (evaluation / "report.html").read_text()
    assert "human baseline" in report and "Prediction against each rater" in report


@pytest.mark.shared_data
def test_real_drive_is_planned_in_2d(shared_data, tmp_path) -> None:
    from medseg.planning import plan_dataset

    root = Path(__file__).resolve().parents[1]
    plans = plan_dataset(
        root / "data_manifests" / "drive_retina.json",
        data_root=shared_data / "drive_retina",
        out=tmp_path / "plans.json",
        architecture="deeplabv3plus",
    )
    cfg = plans["configurations"]["2d"]
    assert list(plans["configurations"]) == ["2d"] and cfg["architecture"] == "deeplabv3plus"
    assert cfg["slice_axis"] == 2 and len(plans["normalization"]) == 3
    assert all(p % 16 == 0 and p >= 560 for p in cfg["patch_size"])  # the whole 565 x 584 photograph
    assert (tmp_path / "fingerprint.json").is_file()
