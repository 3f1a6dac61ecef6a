"""The architecture field of the plans and the FCN / DeepLabV3+ builders (2D: torchvision, 3D: MONAI)."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
from conftest import make_dataset

from medseg.errors import CheckpointError, MedsegUserError
from medseg.planning import fingerprint_dataset, make_plans, validate_plans
from medseg.planning.architectures import apply_architecture, patch_multiple

RESNET_ARCHITECTURES = ("fcn", "deeplabv3plus")


def _needs(spatial_dims: int) -> None:
    pytest.importorskip("torch")
    if spatial_dims == 2:
        pytest.importorskip("torchvision")


def _small(cfg: dict) -> dict:
    """A ResNet configuration made tiny for CPU tests (narrow 3D stages, narrow heads)."""
    cfg = json.loads(json.dumps(cfg))
    network = cfg["network"]
    if cfg["spatial_dims"] == 3:
        network["widths"] = [4, 8, 8, 16]
    for key in ("aspp_channels", "decoder_channels", "low_level_channels"):
        if key in network:
            network[key] = 8
    return cfg


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from medseg.data.manifest import load_manifest

    root = tmp_path_factory.mktemp("data")
    manifest = load_manifest(make_dataset(root, num_cases=4, shape=(20, 22, 12)))
    return manifest, make_plans(fingerprint_dataset(manifest, workers=1), base_features=4)


# ---------------------------------------------------------------------------------------------
# plans
# ---------------------------------------------------------------------------------------------
def test_architecture_field_is_planned_validated_and_defaults_to_dynunet(dataset, tmp_path) -> None:
    _, plans = dataset
    for cfg in plans["configurations"].values():
        assert "architecture" not in cfg  # make_plans is unchanged; plan_dataset adds the field
    assert validate_plans(plans)  # older plans without the field mean dynunet
    for name in RESNET_ARCHITECTURES:
        for cfg in plans["configurations"].values():
            planned = apply_architecture(cfg, name)
            multiple = patch_multiple(name, planned["network"], planned["spatial_dims"])
            assert multiple > 1 and all(p % multiple == 0 for p in planned["patch_size"])
            assert all(p >= q for p, q in zip(planned["patch_size"], cfg["patch_size"]))
            assert planned["spacing_mm"] == cfg["spacing_mm"] and planned["batch_size"] == cfg["batch_size"]
        edited = {
            **plans,
            "configurations": {k: apply_architecture(c, name) for k, c in plans["configurations"].items()},
        }
        validate_plans(edited)
    bad = {**plans, "configurations": {"3d": {**plans["configurations"]["3d"], "architecture": "vgg"}}}
    with pytest.raises(MedsegUserError, match=r"my_plans.json: plans key 'configurations.3d.architecture'"):
        validate_plans(bad, source="my_plans.json")
    fcn = apply_architecture(plans["configurations"]["3d"], "fcn")
    with pytest.raises(MedsegUserError, match=r"configurations.3d.patch_size' must be a multiple of 16"):
        validate_plans({**plans, "configurations": {"3d": {**fcn, "patch_size": [20, 32, 16]}}})
    with pytest.raises(MedsegUserError, match=r"network.backbone"):
        validate_plans({**plans, "configurations": {"3d": {**fcn, "network": {**fcn["network"], "backbone": "vit"}}}})
    with pytest.raises(MedsegUserError, match="unknown architecture 'unet3'"):
        apply_architecture(fcn, "unet3")


def test_plan_cli_writes_the_architecture(dataset, tmp_path, capsys) -> None:
    from medseg.cli import main

    manifest, _ = dataset
    out = tmp_path / "plans.json"
    assert main(["plan", str(manifest.path), "--out", str(out), "--architecture", "deeplabv3plus"]) == 0
    assert "architecture deeplabv3plus" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert {c["architecture"] for c in written["configurations"].values()} == {"deeplabv3plus"}
    assert main(["plan", str(manifest.path), "--out", str(out), "--architecture", "segformer"]) == 2
    assert "unknown architecture 'segformer'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial_dims", [3, 2])
@pytest.mark.parametrize("name", RESNET_ARCHITECTURES)
def test_builders_give_logits_at_input_size_without_network_access(
    name, spatial_dims, monkeypatch, one_torch_thread
) -> None:
    _needs(spatial_dims)
    import torch

    from medseg.model.networks import build_network

    def no_network(*args, **kwargs):
        raise AssertionError("a builder tried to open a network connection")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    base = {"spatial_dims": spatial_dims, "spacing_mm": [1.0, 1.0, 1.0], "batch_size": 2, "network": {}}
    base["patch_size"] = [24, 40, 24] if spatial_dims == 3 else [56, 40]
    cfg = _small(apply_architecture(base, name))
    torch.manual_seed(0)
    net = build_network(cfg, in_channels=2, out_channels=3)
    x = torch.randn(2, 2, *cfg["patch_size"])
    out = net(x)
    assert out.shape == (2, 3, *cfg["patch_size"])
    # one optimizer step changes the weights and the output
    before = [p.detach().clone() for p in net.parameters()]
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    target = torch.randint(0, 3, (2, *cfg["patch_size"]))
    torch.nn.functional.cross_entropy(out, target).backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    net.eval()
    odd = torch.randn(1, 2, *[p - 8 for p in cfg["patch_size"]])  # a size that is no multiple of the stride
    assert net(odd).shape == (1, 3, *odd.shape[2:])


@pytest.mark.parametrize("spatial_dims", [3, 2])
def test_deeplab_encoder_is_atrous_and_has_image_pooling(spatial_dims) -> None:
    _needs(spatial_dims)
    import torch

    from medseg.model.networks import build_network

    base = {"spatial_dims": spatial_dims, "spacing_mm": [1.0] * 3, "batch_size": 2, "network": {}}
    base["patch_size"] = [32] * spatial_dims
    cfg = _small(apply_architecture(base, "deeplabv3plus"))
    net = build_network(cfg, in_channels=1, out_channels=2).eval()
    stride = cfg["network"]["output_stride"]
    features = net.encoder(torch.zeros(1, 1, *cfg["patch_size"]))
    assert features[0].shape[2] == 8  # stride 4: the low-level skip
    assert features[-1].shape[2] == 32 // stride  # the output stride, not 32
    assert features[-1].shape[2:] == features[-2].shape[2:]  # the last stage is dilated, not strided
    assert (
        hasattr(net.aspp, "image_pooling")
        and net.aspp.atrous.convs[1].dilation[0] == cfg["network"]["aspp_dilations"][1]
    )


def test_local_backbone_checkpoint_is_loaded_weights_only(tmp_path) -> None:
    pytest.importorskip("torch")
    import torch

    from medseg.model.architectures.encoders import load_backbone_checkpoint, resnet_encoder
    from medseg.model.networks import build_network

    donor = resnet_encoder(spatial_dims=3, in_channels=1, widths=[4, 8, 8, 16])
    path = tmp_path / "resnet18_3d.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in donor.state_dict().items()}}, path)
    base = {"spatial_dims": 3, "spacing_mm": [1.0] * 3, "batch_size": 2, "patch_size": [32] * 3, "network": {}}
    cfg = _small(apply_architecture(base, "fcn"))
    cfg["network"]["backbone_checkpoint"] = str(path)
    loaded = build_network(cfg, in_channels=1, out_channels=2, backbone_weights=True)
    fresh = build_network(cfg, in_channels=1, out_channels=2)  # prediction: the model checkpoint has the weights
    assert torch.equal(loaded.encoder.layer1[0].conv1.weight, donor.layer1[0].conv1.weight)
    assert not torch.equal(fresh.encoder.layer1[0].conv1.weight, donor.layer1[0].conv1.weight)
    # a 3-channel first convolution does not fit a 1-channel encoder: skipped and reported
    rgb = resnet_encoder(spatial_dims=3, in_channels=3, widths=[4, 8, 8, 16])
    torch.save(rgb.state_dict(), tmp_path / "rgb.pt")
    report = load_backbone_checkpoint(
        resnet_encoder(spatial_dims=3, in_channels=1, widths=[4, 8, 8, 16]), tmp_path / "rgb.pt"
    )
    assert "conv1.weight" in report["skipped"] and "layer1.0.conv1.weight" in report["loaded"]
    with pytest.raises(CheckpointError, match="not found"):
        load_backbone_checkpoint(donor, tmp_path / "missing.pt")
    torch.save({"weights": np.dtype("float32")}, tmp_path / "pickled.pt")  # needs unpickling a numpy object
    with pytest.raises(CheckpointError, match="pickled.pt"):
        load_backbone_checkpoint(donor, tmp_path / "pickled.pt")


# ---------------------------------------------------------------------------------------------
# through the real training loop, checkpoints and prediction
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", ["3d", "2d"])
@pytest.mark.parametrize("name", RESNET_ARCHITECTURES)
def test_train_checkpoint_predict(dataset, name, config, tmp_path, one_torch_thread) -> None:
    _needs(2 if config == "2d" else 3)
    import torch

    from medseg.inference import Segmenter
    from medseg.io import read_volume
    from medseg.model.checkpoint import load_checkpoint
    from medseg.model.networks import build_network
    from medseg.training import train

    manifest, plans = dataset
    plans = {
        **plans,
        "configurations": {config: _small(apply_architecture(plans["configurations"][config], name))},
    }
    validate_plans(plans)
    run = tmp_path / "run"
    result = train(
        manifest,
        plans=plans,
        config=config,
        fold=0,
        out_dir=run,
        epochs=1,
        iterations_per_epoch=3,
        validate_every=1,
        batch_size=2,
        progress=False,
        device="cpu",
    )
    assert result["iterations"] == 3 and not np.isnan(result["best_dice"])
    content = load_checkpoint(run / "checkpoint_best.pt")
    assert content["plans"]["configurations"][config]["architecture"] == name
    rebuilt = build_network(content["plans"]["configurations"][config], in_channels=1, out_channels=3)
    rebuilt.load_state_dict(content["model"])  # strict: every weight of the trained network
    # predict: labels in the input's exact grid
    segmenter = Segmenter.from_checkpoint(run, device="cpu", tta=True)
    case = manifest.cases[0]
    image = read_volume(case.images[0])
    prediction = segmenter.predict(image)
    assert prediction.spatial_shape == image.spatial_shape
    assert np.array_equal(prediction.affine, image.affine)
    assert set(np.unique(prediction.array)) <= {0, 1, 2}
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("name", RESNET_ARCHITECTURES)
def test_onnx_export_of_3d_architectures(name) -> None:
    pytest.importorskip("onnxruntime")
    import torch

    from medseg.model.networks import build_network
    from medseg.model.onnx_export import OnnxNetwork, export_network

    base = {"spatial_dims": 3, "spacing_mm": [1.0] * 3, "batch_size": 2, "patch_size": [32] * 3, "network": {}}
    cfg = _small(apply_architecture(base, name))
    net = build_network(cfg, in_channels=1, out_channels=3).eval()
    onnx_bytes, verification = export_network(net, plans_config=cfg, in_channels=1)
    assert verification.max_abs_diff <= verification.tolerance
    x = torch.randn(1, 1, 48, 32, 40)  # another window size: the spatial axes are dynamic
    with torch.no_grad():
        assert torch.allclose(OnnxNetwork(onnx_bytes, threads=1)(x), net(x), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Mask R-CNN building blocks (not yet an architecture of the plans)
# ---------------------------------------------------------------------------------------------
def test_maskrcnn_targets_from_an_instance_map_and_back() -> None:
    pytest.importorskip("torch")
    import torch

    from medseg.model.architectures.maskrcnn import instance_targets, instances_from_detections

    instance_map = np.zeros((12, 10), np.int32)
    instance_map[2:5, 3:7] = 4  # rows 2-4, columns 3-6
    instance_map[9, 8] = 7  # a one-pixel object
    targets = instance_targets(instance_map, class_of={4: 1, 7: 2})
    assert targets["boxes"].tolist() == [[3.0, 2.0, 7.0, 5.0], [8.0, 9.0, 9.0, 10.0]]
    assert targets["labels"].tolist() == [1, 2] and targets["masks"].shape == (2, 12, 10)
    assert targets["masks"][1].sum() == 1 and targets["masks"][0].sum() == 12
    empty = instance_targets(np.zeros((12, 10), np.int32))
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and empty["masks"].shape == (0, 12, 10)
    # back: masks as probabilities, the higher score wins an overlap, the low score is dropped
    masks = targets["masks"][:, None].float()
    overlapping = masks[0].clone()
    overlapping[0, 2, 3] = 1.0
    detections = {
        "scores": torch.tensor([0.6, 0.9, 0.3]),
        "labels": torch.tensor([1, 2, 1]),
        "masks": torch.stack([masks[0], masks[1], overlapping]),
    }
    back, scores, classes = instances_from_detections(detections, shape=(12, 10))
    assert scores == pytest.approx([0.9, 0.6]) and classes == [2, 1]
    assert np.array_equal(back == 2, instance_map == 4) and np.array_equal(back == 1, instance_map == 7)


def test_maskrcnn_builds_offline_with_trainable_norm_and_its_loss_falls_on_discs(monkeypatch, one_torch_thread):
    pytest.importorskip("torchvision")
    import torch

    from medseg.model.architectures.maskrcnn import build_maskrcnn, instance_targets

    monkeypatch.setattr(socket, "socket", lambda *a, **k: (_ for _ in ()).throw(AssertionError("network access")))
    torch.manual_seed(0)
    net = build_maskrcnn(in_channels=1, num_classes=2, patch_size=[64, 64], proposals_per_image=64, rois_per_image=32)
    norms = [m for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.weight.requires_grad for m in norms)  # not torchvision's frozen default
    assert all(p.requires_grad for p in net.backbone.body.parameters())
    assert net.transform.min_size == (64,) and net.transform.max_size == 64
    rng = np.random.default_rng(0)

    def sample():
        y, x = np.mgrid[:64, :64]
        instance_map = np.zeros((64, 64), np.int32)
        for index in range(1, 3):
            cy, cx, r = rng.integers(12, 52), rng.integers(12, 52), rng.integers(4, 8)
            instance_map[((y - cy) ** 2 + (x - cx) ** 2 <= r * r) & (instance_map == 0)] = index
        image = (instance_map > 0).astype(np.float32) * 2.0 - 0.5 + rng.normal(0, 0.2, (64, 64)).astype(np.float32)
        return torch.from_numpy(image)[None], instance_targets(instance_map)

    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net.train()
    losses = []
    for _ in range(20):
        images, targets = zip(*[sample() for _ in range(2)])
        loss = sum(net(list(images), list(targets)).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
    net.eval()
    with torch.no_grad():
        out = net([sample()[0]])[0]
    assert set(out) >= {"boxes", "labels", "scores", "masks"} and out["masks"].shape[-2:] == (64, 64)


# ---------------------------------------------------------------------------------------------
# Mask R-CNN in the pipeline
# ---------------------------------------------------------------------------------------------
def test_maskrcnn_patch_targets_are_the_components_of_each_class() -> None:
    """Each 8-connected component of each foreground class is one instance of that class."""
    pytest.importorskip("torch")
    from medseg.model.architectures.maskrcnn import patch_targets

    labels = np.zeros((12, 14), np.int64)
    labels[1:3, 1:3] = 1  # one square of class 1
    labels[5, 5] = 1  # a one-pixel object
    labels[6, 6] = 1  # touching diagonally: the same component
    labels[8:11, 9:12] = 2
    targets = patch_targets(labels)
    assert sorted(targets["labels"].tolist()) == [1, 1, 2]
    boxes = {tuple(b) for b in targets["boxes"].tolist()}
    assert boxes == {(1.0, 1.0, 3.0, 3.0), (5.0, 5.0, 7.0, 7.0), (9.0, 8.0, 12.0, 11.0)}
    assert int(targets["masks"].sum()) == int((labels > 0).sum())
    empty = patch_targets(np.zeros((4, 4), np.int64))
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 4, 4)


def test_maskrcnn_dense_scores_from_detections() -> None:
    """score(c) = max over class-c detections of score x mask; background = 1 - max foreground."""
    torch = pytest.importorskip("torch")
    from medseg.model.architectures.maskrcnn import dense_log_scores

    masks = torch.zeros((3, 1, 4, 4))
    masks[0, 0, :2, :2] = 1.0
    masks[1, 0, :2, :2] = 0.5
    masks[2, 0, 2:, 2:] = 1.0
    detections = [
        {"scores": torch.tensor([0.9, 0.8, 0.6]), "labels": torch.tensor([1, 2, 1]), "masks": masks},
        {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros((0, 1, 4, 4))},
    ]
    scores = dense_log_scores(detections, num_classes=3, shape=(4, 4)).exp()
    assert scores.shape == (2, 3, 4, 4)
    assert torch.isclose(scores[0, 1, 0, 0], torch.tensor(0.9)) and torch.isclose(scores[0, 2, 0, 0], torch.tensor(0.4))
    assert torch.isclose(scores[0, 0, 0, 0], torch.tensor(0.1)) and torch.isclose(scores[0, 1, 3, 3], torch.tensor(0.6))
    assert torch.isclose(scores[0, 0, 0, 3], torch.tensor(1.0))  # nothing detected there
    assert torch.allclose(scores[1, 0], torch.ones(4, 4))  # no detection at all: background
    assert scores[0].argmax(0)[0, 0] == 1 and scores[0].argmax(0)[3, 3] == 1 and scores[0].argmax(0)[0, 3] == 0


def test_maskrcnn_is_planned_for_2d_configurations_only(dataset, tmp_path) -> None:
    from medseg.planning import plan_dataset

    manifest, plans = dataset
    with pytest.raises(MedsegUserError, match="2D only"):
        apply_architecture(plans["configurations"]["3d"], "maskrcnn")
    cfg = apply_architecture(plans["configurations"]["2d"], "maskrcnn")
    assert cfg["architecture"] == "maskrcnn" and all(p % 32 == 0 for p in cfg["patch_size"])
    assert cfg["network"]["anchor_sizes"] == [8, 16, 32, 64, 128]
    validate_plans({**plans, "configurations": {"2d": cfg}})
    bad = {**cfg, "spatial_dims": 3, "patch_size": [32, 32, 32]}
    with pytest.raises(MedsegUserError, match="2D only"):
        validate_plans({**plans, "configurations": {"3d": bad}})
    wrong = {**cfg, "network": {**cfg["network"], "anchor_sizes": [8, 16]}}
    with pytest.raises(MedsegUserError, match="anchor_sizes"):
        validate_plans({**plans, "configurations": {"2d": wrong}})
    path = make_dataset(tmp_path / "data", num_cases=4, shape=(20, 22, 12))
    written = plan_dataset(path, out=tmp_path / "plans.json", architecture="maskrcnn", workers=1)
    assert list(written["configurations"]) == ["2d"]
    # a detector from random weights diverges at the U-Nets' AdamW 3e-3: its plans train at 3e-4
    assert written["training"]["learning_rate"] == 3e-4
    default = plan_dataset(path, out=tmp_path / "unet.json", workers=1)
    assert default["training"]["learning_rate"] == 3e-3


def test_maskrcnn_train_checkpoint_predict(dataset, tmp_path, one_torch_thread) -> None:
    """plan -> train -> checkpoint -> predict (slice by slice, TTA) in the input's exact grid."""
    _needs(2)
    import torch

    from medseg.inference import Segmenter
    from medseg.io import read_volume
    from medseg.model.checkpoint import load_checkpoint
    from medseg.model.networks import build_network
    from medseg.training import train

    manifest, plans = dataset
    cfg = apply_architecture(plans["configurations"]["2d"], "maskrcnn")
    cfg["network"].update(proposals_per_image=64, rois_per_image=32, detections_per_image=20)
    plans = {**plans, "configurations": {"2d": cfg}}
    validate_plans(plans)
    run = tmp_path / "run"
    result = train(
        manifest,
        plans=plans,
        config="2d",
        fold=0,
        out_dir=run,
        epochs=1,
        iterations_per_epoch=3,
        validate_every=1,
        batch_size=2,
        progress=False,
        device="cpu",
    )
    assert result["iterations"] == 3 and set(result["final_dice"]) >= {"mean"}
    content = load_checkpoint(run / "checkpoint_best.pt")
    rebuilt = build_network(content["plans"]["configurations"]["2d"], in_channels=1, out_channels=3)
    rebuilt.load_state_dict(content["model"])
    segmenter = Segmenter.from_checkpoint(run, device="cpu", tta=True)
    image = read_volume(manifest.cases[0].images[0])
    prediction = segmenter.predict(image)
    assert prediction.spatial_shape == image.spatial_shape
    assert np.array_equal(prediction.affine, image.affine)
    assert set(np.unique(prediction.array)) <= {0, 1, 2}
    with pytest.raises(MedsegUserError, match="does not export to ONNX"):
        Segmenter.from_checkpoint(run, device="cpu", runtime="onnx")
    # the detector's own instances, in the input's exact grid, with a table row per instance
    assert segmenter.predicts_instances
    instances, table = segmenter.predict_instances(image)
    assert instances.spatial_shape == image.spatial_shape and np.array_equal(instances.affine, image.affine)
    present = sorted(int(i) for i in np.unique(instances.array) if i)
    assert present == [row["instance_id"] for row in table] == list(range(1, len(table) + 1))
    assert all(row["label"] in (1, 2) and 0.0 <= row["score"] <= 1.0 for row in table)
    assert [row["score"] for row in table] == sorted((row["score"] for row in table), reverse=True)
    # the CLI: predict writes the instance map, the table and the panoptic map; evaluate --scores reads them
    from medseg.cli import main

    out = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                "--model",
                str(run),
                "--input",
                str(manifest.cases[0].images[0]),
                "--output",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    case_id = manifest.cases[0].case_id
    assert (out / "instances" / f"{case_id}.nii.gz").is_file() and (out / "instances" / f"{case_id}.csv").is_file()
    assert (out / "panoptic" / f"{case_id}.nii.gz").is_file()
    assert torch.get_num_threads() == 1
