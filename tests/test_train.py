"""Training: checkpoints, resume equivalence, time limit, cross-validation, user errors, GPU."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import make_dataset

from medseg.data.manifest import load_manifest
from medseg.errors import CheckpointError, LabelValueError, ManifestError, MedsegUserError
from medseg.metrics.overlap import dice_per_structure
from medseg.model.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from medseg.planning import fingerprint_dataset, make_plans
from medseg.training import train

SMALL = dict(iterations_per_epoch=2, validate_every=1, batch_size=2, progress=False, device="cpu")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    manifest = load_manifest(make_dataset(root, num_cases=5, shape=(16, 18, 10)))
    plans = make_plans(fingerprint_dataset(manifest, workers=1), base_features=4)
    return manifest, plans


def _weights(run):
    return load_checkpoint(run / "checkpoint_last.pt")["model"]


def test_checkpoint_round_trip_with_weights_only(tmp_path) -> None:
    net = torch.nn.Conv3d(1, 2, 3)
    content = {
        "model": net.state_dict(),
        "plans": {"a": [1, 2]},
        "config": "3d",
        "labels": {"labels": {"0": "bg"}},
        "training": {"rng": {"torch": torch.get_rng_state()}},
    }
    path = save_checkpoint(content, tmp_path / "c.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT
    loaded = load_checkpoint(path)
    assert all(torch.equal(loaded["model"][k], v) for k, v in net.state_dict().items())
    assert loaded["plans"] == {"a": [1, 2]}
    assert not list(tmp_path.glob(".*partial*"))


def test_bad_checkpoints_raise_checkpoint_error(tmp_path) -> None:
    (tmp_path / "text.pt").write_text("hello, not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "text.pt")
    good = save_checkpoint(
        {"model": {"w": torch.randn(100, 100)}, "plans": {}, "config": "3d", "labels": {}}, tmp_path / "good.pt"
    )
    data = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a medseg checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    torch.save(
        {"format": CHECKPOINT_FORMAT, "format_version": 99, "model": {}, "plans": {}, "config": "3d", "labels": {}},
        tmp_path / "future.pt",
    )
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="no checkpoint_best"):
        load_checkpoint(tmp_path)


def test_resume_continues_exactly(dataset, tmp_path) -> None:
    manifest, plans = dataset
    train(manifest, plans=plans, out_dir=tmp_path / "straight", epochs=4, seed=5, **SMALL)
    train(manifest, plans=plans, out_dir=tmp_path / "split", epochs=4, seed=5, max_epochs_this_run=2, **SMALL)
    halfway = _weights(tmp_path / "split")
    with pytest.raises(MedsegUserError, match="seed 5"):
        train(manifest, plans=plans, out_dir=tmp_path / "split", epochs=4, seed=6, resume=True, **SMALL)
    result = train(manifest, plans=plans, out_dir=tmp_path / "split", epochs=4, seed=5, resume=True, **SMALL)
    assert result["epochs"] == 4 and result["iterations"] == 8
    straight, split = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert all(torch.equal(straight[k], split[k]) for k in straight)
    assert any(not torch.equal(halfway[k], split[k]) for k in straight)  # the resumed run did train
    other_seed = train(manifest, plans=plans, out_dir=tmp_path / "seed6", epochs=1, seed=6, **SMALL)
    assert other_seed["epochs"] == 1
    rows = list(csv.DictReader(open(tmp_path / "split" / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    straight_rows = list(csv.DictReader(open(tmp_path / "straight" / "history.csv")))
    for key in ("train_loss", "learning_rate", "val_dice_mean"):
        assert [r[key] for r in rows] == [r[key] for r in straight_rows]
    assert {"val_dice_front", "val_dice_back", "val_dice_mean"} <= set(rows[0])
    resolved = json.loads((tmp_path / "split" / "resolved_config.json").read_text())
    assert resolved["resume"] is True and resolved["fold"] == 0 and resolved["epochs"] == 4
    assert (tmp_path / "split" / "checkpoint_best.pt").is_file()
    torch.load(tmp_path / "split" / "checkpoint_best.pt", weights_only=True)


def test_time_limit_ends_training_cleanly(dataset, tmp_path) -> None:
    manifest, plans = dataset
    result = train(
        manifest,
        plans=plans,
        out_dir=tmp_path / "timed",
        time_limit_min=0.1,
        seed=0,
        **{**SMALL, "iterations_per_epoch": 1},
    )
    assert result["epochs"] >= 1
    assert result["elapsed_s"] < 0.1 * 60 + 5
    assert 0.0 < result["validation_reserve_s"] < 0.1 * 60  # the final validation's share of the budget
    rows = list(csv.DictReader(open(tmp_path / "timed" / "history.csv")))
    rates = [float(r["learning_rate"]) for r in rows]
    # poly schedule compressed into the budget
    assert rates == sorted(rates, reverse=True) and rates[-1] < plans["training"]["learning_rate"]


def test_a_time_limit_shorter_than_the_final_validation_is_a_clear_error(dataset, tmp_path) -> None:
    """A budget the final validation alone would use up trains nothing: say so instead of a silent 0 epochs."""
    manifest, plans = dataset
    with pytest.raises(MedsegUserError, match="leaves no time to train: the final validation of"):
        train(manifest, plans=plans, out_dir=tmp_path / "short", time_limit_min=1e-5, seed=0, **SMALL)
    assert not (tmp_path / "short" / "checkpoint_last.pt").exists()


def test_ema_is_what_validation_checkpoints_and_resume_use(dataset, tmp_path) -> None:
    """With ema_decay the checkpoint's model is the average, the trained weights resume exactly."""
    manifest, plans = dataset
    options = dict(epochs=3, seed=2, ema_decay=0.9, **SMALL)
    train(manifest, plans=plans, out_dir=tmp_path / "straight", **options)
    train(manifest, plans=plans, out_dir=tmp_path / "split", max_epochs_this_run=1, **options)
    with pytest.raises(MedsegUserError, match="with an EMA"):
        train(manifest, plans=plans, out_dir=tmp_path / "split", resume=True, **{**options, "ema_decay": 0.0})
    train(manifest, plans=plans, out_dir=tmp_path / "split", resume=True, **options)
    straight = load_checkpoint(tmp_path / "straight" / "checkpoint_last.pt")
    split = load_checkpoint(tmp_path / "split" / "checkpoint_last.pt")
    assert straight["training"]["ema"] == {"decay": 0.9, "updates": 6} == split["training"]["ema"]
    for key in ("model", "network"):
        first = straight["model"] if key == "model" else straight["training"]["network"]
        second = split["model"] if key == "model" else split["training"]["network"]
        assert all(torch.equal(first[k], second[k]) for k in first)
    # the average differs from the trained weights, and the trained weights are those of a run without EMA
    assert any(not torch.equal(straight["model"][k], straight["training"]["network"][k]) for k in straight["model"])
    plain = train(manifest, plans=plans, out_dir=tmp_path / "plain", epochs=3, seed=2, **SMALL)
    plain_weights = _weights(tmp_path / "plain")
    assert all(torch.equal(plain_weights[k], straight["training"]["network"][k]) for k in plain_weights)
    assert "ema" not in load_checkpoint(tmp_path / "plain" / "checkpoint_last.pt")["training"]
    assert plain["final_dice"] != {} and json.loads((tmp_path / "straight" / "resolved_config.json").read_text())[
        "ema_decay"
    ] == pytest.approx(0.9)


def test_ema_update_rule() -> None:
    """ema <- d_t ema + (1 - d_t) w with d_t = min(decay, (1 + t) / (10 + t)); integer entries copied."""
    from medseg.training.ema import WeightAverage

    net = torch.nn.BatchNorm1d(2)
    average = WeightAverage(net, decay=0.5)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.fill_(3.0)
    net.num_batches_tracked.fill_(7)
    average.update(net)  # t = 0: d = min(0.5, 0.1) = 0.1
    assert torch.allclose(average.weights["weight"], 0.1 * start + 0.9 * 3.0)
    assert int(average.weights["num_batches_tracked"]) == 7
    for _ in range(20):
        average.update(net)
    with average.applied(net):
        assert torch.allclose(net.weight, average.weights["weight"])
    assert torch.equal(net.weight, torch.full((2,), 3.0))
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(net, decay=1.0)


def test_precision_is_recorded_and_float32_never_autocasts(dataset, tmp_path) -> None:
    from medseg.model.device import autocast_dtype

    manifest, plans = dataset
    train(manifest, plans=plans, out_dir=tmp_path / "f32", epochs=1, **SMALL)  # the CPU default
    train(manifest, plans=plans, out_dir=tmp_path / "auto", epochs=1, precision="auto", **SMALL)
    f32 = json.loads((tmp_path / "f32" / "resolved_config.json").read_text())
    auto = json.loads((tmp_path / "auto" / "resolved_config.json").read_text())
    assert f32["autocast_dtype"] == "float32" and f32["options"]["precision"] is None
    assert auto["options"]["precision"] == "auto"
    expected = autocast_dtype(torch.device("cpu"), "auto")
    assert auto["autocast_dtype"] == (str(expected).replace("torch.", "") if expected is not None else "float32")
    with pytest.raises(MedsegUserError, match="precision must be"):
        train(manifest, plans=plans, out_dir=tmp_path / "x", epochs=1, precision="half", **SMALL)


def test_fold_all_trains_on_every_case_without_validation(dataset, tmp_path) -> None:
    manifest, plans = dataset
    result = train(manifest, plans=plans, fold="all", out_dir=tmp_path / "all", epochs=1, **SMALL)
    resolved = json.loads((tmp_path / "all" / "resolved_config.json").read_text())
    assert resolved["fold"] == "all" and resolved["validation_cases"] == []
    assert sorted(resolved["train_cases"]) == sorted(c.case_id for c in manifest.labelled_cases)
    assert result["final_dice"] == {} and (tmp_path / "all" / "checkpoint_best.pt").is_file()
    with pytest.raises(ManifestError, match="'all' or 'all-cv'"):
        train(manifest, plans=plans, fold="every", out_dir=tmp_path / "x", epochs=1, **SMALL)


def test_two_d_configuration_and_all_folds(dataset, tmp_path) -> None:
    manifest, plans = dataset
    sgd = {**plans, "training": {**plans["training"], "optimizer": "sgd", "learning_rate": 0.01}}
    results = train(manifest, plans=sgd, config="2d", fold="all-cv", out_dir=tmp_path / "cv", epochs=1, **SMALL)
    assert [r["fold"] for r in results] == [0, 1, 2, 3, 4]
    assert all((tmp_path / "cv" / f"fold_{k}" / "checkpoint_best.pt").is_file() for k in range(5))
    state = load_checkpoint(tmp_path / "cv" / "fold_0", which="last")["training"]["optimizer"]
    assert state["param_groups"][0]["nesterov"] is True and state["param_groups"][0]["momentum"] == 0.99
    bad = {**plans, "training": {**plans["training"], "optimizer": "lion"}}
    with pytest.raises(MedsegUserError, match="optimizer"):
        train(manifest, plans=bad, out_dir=tmp_path / "bad", epochs=1, **SMALL)


def test_user_errors(dataset, tmp_path) -> None:
    manifest, plans = dataset
    with pytest.raises(ManifestError, match="fold 7 does not exist"):
        train(manifest, plans=plans, out_dir=tmp_path / "a", fold=7, epochs=1, **SMALL)
    other = make_plans(fingerprint_dataset(manifest, workers=1))
    other["dataset"] = {**other["dataset"], "name": "liver", "labels": {"0": "background", "1": "liver"}}
    with pytest.raises(MedsegUserError, match="plans were made for dataset 'liver'"):
        train(manifest, plans=other, out_dir=tmp_path / "b", epochs=1, **SMALL)
    train(manifest, plans=plans, out_dir=tmp_path / "c", epochs=1, **SMALL)
    with pytest.raises(MedsegUserError, match="already holds a checkpoint"):
        train(manifest, plans=plans, out_dir=tmp_path / "c", epochs=1, **SMALL)
    with pytest.raises(CheckpointError):
        train(manifest, plans=plans, out_dir=tmp_path / "d", epochs=1, resume=True, **SMALL)
    with pytest.raises(MedsegUserError, match="augmentation.mirror must be a probability"):
        train(manifest, plans={**plans, "augmentation": {"mirror": 2}}, out_dir=tmp_path / "e", epochs=1, **SMALL)
    assert not (tmp_path / "e").exists()


def test_labels_disagreeing_with_the_manifest(tmp_path) -> None:
    manifest = load_manifest(make_dataset(tmp_path / "data", num_cases=5, labels={"0": "background", "1": "front"}))
    plans = {
        "format_version": 1,
        "dataset": {"name": "tiny", "labels": {"0": "background", "1": "front"}, "channels": ["MRI"]},
        "normalization": [{"channel": "MRI", "scheme": "zscore"}],
        "configurations": {
            "3d": {
                "spatial_dims": 3,
                "spacing_mm": [0.7, 1.1, 3.0],
                "patch_size": [8, 8, 8],
                "batch_size": 2,
                "network": {"architecture": "UNet", "filters": [4, 8]},
            }
        },
    }
    with pytest.raises(LabelValueError, match=r"label values \[2\]"):
        train(manifest, plans=plans, out_dir=tmp_path / "run", epochs=1, **SMALL)


def test_empty_manifest(tmp_path) -> None:
    (tmp_path / "imagesTs").mkdir()
    (tmp_path / "dataset.json").write_text(
        json.dumps(
            {
                "name": "unlabelled",
                "modality": {"0": "MRI"},
                "labels": {"0": "background", "1": "x"},
                "training": [],
                "test": ["./imagesTs/a.nii.gz"],
            }
        )
    )
    manifest = load_manifest(tmp_path / "dataset.json")
    with pytest.raises(ManifestError, match="no labelled training cases"):
        train(manifest, plans={"configurations": {}}, out_dir=tmp_path / "run", epochs=1, **SMALL)


def test_dice_per_structure_edge_cases() -> None:
    import numpy as np

    reference = np.array([0, 1, 1, 2, 2, 0])
    prediction = np.array([0, 1, 0, 2, 2, 2])
    scores = dice_per_structure(
        reference, prediction, structures=[("a", (1,)), ("b", (2,)), ("ab", (1, 2)), ("none", (3,))]
    )
    assert scores["a"] == pytest.approx(2 / 3) and scores["b"] == pytest.approx(0.8)
    assert scores["ab"] == pytest.approx(2 * 3 / (4 + 4)) and np.isnan(scores["none"])


@pytest.mark.gpu
def test_cuda_amp_training_reduces_the_loss(tmp_path) -> None:
    from monai.losses import DiceCELoss

    from medseg.model.networks import build_network

    config = {
        "spatial_dims": 3,
        "network": {
            "architecture": "DynUNet",
            "filters": [8, 16, 32],
            "kernel_size": [[3, 3, 3]] * 3,
            "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
            "deep_supervision": False,
        },
    }
    torch.manual_seed(0)
    net = build_network(config, in_channels=1, out_channels=2).cuda().to(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 1, 32, 32, 32, device="cuda")
    y = (x > 0.5).long()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    scaler = torch.amp.GradScaler("cuda")
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(net(x.contiguous(memory_format=torch.channels_last_3d)).float(), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.parametrize(
    "dataset_name, manifest_name, config",
    [
        ("msd_hippocampus", "msd_hippocampus.json", "3d"),
        ("brats2013_deepmedic", "brats2013.json", "2d"),
    ],
)
def test_training_runs_on_shared_data(tmp_path, dataset_name, manifest_name, config) -> None:
    from pathlib import Path

    from conftest import SHARED_DATA

    root = SHARED_DATA / dataset_name
    manifest_path = Path(__file__).resolve().parents[1] / "data_manifests" / manifest_name
    if not root.is_dir() or not manifest_path.is_file():
        pytest.skip(f"{root} or {manifest_path} not found")
    manifest = load_manifest(manifest_path, data_root=root)
    plans = make_plans(fingerprint_dataset(manifest, cases=manifest.labelled_cases[:12], workers=2), base_features=4)
    cfg = plans["configurations"][config]
    if config == "3d":
        cfg["patch_size"] = [min(p, 64) for p in cfg["patch_size"]]
    result = train(
        manifest, plans=plans, config=config, out_dir=tmp_path / "run", epochs=1, **{**SMALL, "iterations_per_epoch": 1}
    )
    structures = {s.name for s in manifest.labels.structures()}
    assert structures <= set(result["final_dice"])  # labels and regions (BraTS tumour regions) scored
    checkpoint = load_checkpoint(tmp_path / "run")
    assert checkpoint["channels"] == list(manifest.channels)


def test_background_loader_gives_the_same_run(dataset, tmp_path) -> None:
    """Batches made in a background worker process are the batches the training thread would make."""
    manifest, plans = dataset
    options = {**SMALL, "iterations_per_epoch": 3, "validate_every": 2}
    train(manifest, plans=plans, out_dir=tmp_path / "serial", epochs=2, seed=3, loader_workers=0, **options)
    train(manifest, plans=plans, out_dir=tmp_path / "worker", epochs=2, seed=3, loader_workers=1, **options)
    serial, worker = _weights(tmp_path / "serial"), _weights(tmp_path / "worker")
    assert all(torch.equal(serial[k], worker[k]) for k in serial)
    resolved = json.loads((tmp_path / "worker" / "resolved_config.json").read_text())
    assert resolved["loader_workers"] == 1


def test_cache_budget_caches_what_fits_and_preprocesses_the_rest(dataset) -> None:
    from medseg.model.transforms import training_cache_transforms
    from medseg.training.data import CaseCache

    manifest, plans = dataset
    cases = manifest.labelled_cases
    chain = training_cache_transforms(plans, "3d")
    full = CaseCache(cases, chain, label_ids=manifest.labels.ids, budget_bytes=1e12, workers=1)
    one = CaseCache(
        cases, chain, label_ids=manifest.labels.ids, budget_bytes=full.cached_bytes / len(cases) * 1.5, workers=1
    )
    assert full.cached_cases == len(cases) and one.cached_cases == 1
    for index in range(len(cases)):
        assert torch.equal(full[index]["image"], one[index]["image"])  # uncached cases are preprocessed on use
        assert full[index]["label"].dtype == torch.uint8
