"""ONNX: export verified against PyTorch, onnxruntime predictions equal PyTorch's, the cache keyed by hash."""

from __future__ import annotations

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from conftest import oblique_affine  # noqa: E402
from test_inference import tiny_plans, write_checkpoint  # noqa: E402

from medseg.cli import main  # noqa: E402
from medseg.core.volume import Volume  # noqa: E402
from medseg.errors import MedsegUserError  # noqa: E402
from medseg.inference import Segmenter  # noqa: E402
from medseg.inference.export import export_onnx  # noqa: E402
from medseg.io import write_volume  # noqa: E402
from medseg.model import onnx_export  # noqa: E402
from medseg.model.onnx_export import OnnxNetwork, choose_runtime, onnx_cache_path  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _image(shape=(26, 21, 13)) -> Volume:
    rng = np.random.default_rng(7)
    return Volume(rng.normal(size=(1, *shape)).astype(np.float32) + 2, oblique_affine())


def test_export_is_verified_and_has_dynamic_axes(tmp_path, capsys):
    write_checkpoint(tmp_path / "run")
    result = export_onnx(tmp_path / "run", out=tmp_path / "net.onnx", threads=1)
    check = result.verification
    assert check.max_abs_diff <= check.tolerance == pytest.approx(1e-4 * max(1.0, check.max_abs_logit))
    assert check.input_shape == (2, 1, 16, 16, 16) and result.path.is_file()
    # one file serves other batch sizes and window sizes, as PyTorch does
    from medseg.model.checkpoint import load_checkpoint
    from medseg.model.networks import build_network

    content = load_checkpoint(tmp_path / "run")
    net = build_network(tiny_plans()["configurations"]["3d"], in_channels=1, out_channels=3).eval()
    net.load_state_dict(content["model"])
    x = torch.randn(3, 1, 24, 16, 32)
    with torch.no_grad():
        assert (OnnxNetwork(result.path.read_bytes(), threads=1)(x) - net(x)).abs().max() < 1e-4
    assert main(["export", str(tmp_path / "run"), "--onnx", "--out", str(tmp_path / "cli.onnx")]) == 0
    out = capsys.readouterr().out
    assert "verified against PyTorch" in out and "max |logit difference|" in out and (tmp_path / "cli.onnx").is_file()


@pytest.mark.parametrize("config", ["3d", "2d"])
def test_onnx_predictions_equal_torch(tmp_path, config):
    write_checkpoint(tmp_path / "run", config=config)
    image = _image()
    by_torch = Segmenter.from_checkpoint(tmp_path / "run", device="cpu", tta=True, runtime="torch", precision="float32")
    by_onnx = Segmenter.from_checkpoint(tmp_path / "run", device="cpu", tta=True, runtime="onnx", threads=1)
    assert by_onnx.runtime == "onnx" and isinstance(by_onnx.networks[0], OnnxNetwork)
    assert by_onnx.describe()["runtime"] == "onnx" and by_torch.describe()["runtime"] == "torch"
    a = by_torch.predict_full(image, probabilities=True)
    b = by_onnx.predict_full(image, probabilities=True)
    assert np.abs(a.probabilities.array - b.probabilities.array).max() < 1e-4
    margin = np.sort(a.probabilities.array, axis=0)
    decided = (margin[-1] - margin[-2]) > 1e-3  # voxels whose top two classes are not a tie
    assert np.array_equal(a.labels.array[0][decided], b.labels.array[0][decided])
    assert (a.labels.array == b.labels.array).mean() > 0.999
    assert b.labels.same_geometry(image)


def test_cache_beside_checkpoint_is_keyed_by_its_hash(tmp_path, monkeypatch):
    run = write_checkpoint(tmp_path / "run").parent
    cache = onnx_cache_path(run / "checkpoint_last.pt")
    Segmenter.from_checkpoint(run, device="cpu", tta=False, runtime="onnx", threads=1)
    assert cache == run / "checkpoint_last.onnx" and cache.is_file()
    first = cache.read_bytes()
    from medseg.io.files import sha256_file

    key = onnx_export.CHECKPOINT_SHA256_KEY
    assert onnx_export._cached_metadata(first)[key] == sha256_file(run / "checkpoint_last.pt")
    calls = []
    real_export = onnx_export.export_network
    monkeypatch.setattr(onnx_export, "export_network", lambda *a, **k: calls.append(1) or real_export(*a, **k))
    Segmenter.from_checkpoint(run, device="cpu", tta=False, runtime="onnx", threads=1)
    assert calls == []  # same checkpoint: the cache is used
    write_checkpoint(run, seed=9)  # another checkpoint under the same name: the stale cache is not used
    seg = Segmenter.from_checkpoint(run, device="cpu", tta=False, runtime="onnx", threads=1)
    assert calls == [1] and cache.read_bytes() != first
    assert seg.networks[0].metadata[key] == sha256_file(run / "checkpoint_last.pt")
    assert not list(run.glob(".*partial*"))  # written atomically


def test_a_cache_with_matching_metadata_but_another_network_is_exported_again(tmp_path, monkeypatch):
    """The metadata hash alone is not trusted: a file that computes something else is replaced."""
    from medseg.io.files import sha256_file

    run = write_checkpoint(tmp_path / "run").parent
    other = write_checkpoint(tmp_path / "other", seed=9).parent
    Segmenter.from_checkpoint(other, device="cpu", tta=False, runtime="onnx", threads=1)
    forged = onnx_export._with_metadata(
        (other / "checkpoint_last.onnx").read_bytes(),
        {onnx_export.CHECKPOINT_SHA256_KEY: sha256_file(run / "checkpoint_last.pt")},
    )
    cache = onnx_cache_path(run / "checkpoint_last.pt")
    cache.write_bytes(forged)
    calls = []
    real_export = onnx_export.export_network
    monkeypatch.setattr(onnx_export, "export_network", lambda *a, **k: calls.append(1) or real_export(*a, **k))
    Segmenter.from_checkpoint(run, device="cpu", tta=False, runtime="onnx", threads=1)
    assert calls == [1] and cache.read_bytes() != forged
    cache.write_bytes(b"not an onnx file")  # damaged: a miss, not an error
    Segmenter.from_checkpoint(run, device="cpu", tta=False, runtime="onnx", threads=1)
    assert calls == [1, 1]


def test_runtime_choice_and_missing_onnxruntime(tmp_path, monkeypatch, capsys):
    assert choose_runtime("torch", device=torch.device("cpu")) == "torch"
    assert choose_runtime("auto", device=torch.device("cpu")) == ("onnx" if onnx_export.AUTO_PREFERS_ONNX else "torch")
    monkeypatch.setattr(onnx_export, "AUTO_PREFERS_ONNX", True)
    assert choose_runtime("auto", device=torch.device("cpu")) == "onnx"
    assert choose_runtime("auto", device=torch.device("cuda")) == "torch"
    with pytest.raises(MedsegUserError, match="runs on the CPU"):
        choose_runtime("onnx", device=torch.device("cuda"))
    with pytest.raises(MedsegUserError, match="unknown runtime"):
        choose_runtime("tensorrt", device=torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    assert choose_runtime("auto", device=torch.device("cpu")) == "torch"
    with pytest.raises(MedsegUserError, match=r"needs onnxruntime .* pip install 'medseg\[onnx\]'"):
        choose_runtime("onnx", device=torch.device("cpu"))
    write_checkpoint(tmp_path / "run")
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_volume(_image((10, 9, 8)), inputs / "case.nii.gz")
    args = ["predict", "--model", str(tmp_path / "run"), "--input", str(inputs), "--no-tta", "--device", "cpu"]
    assert main([*args, "--output", str(tmp_path / "o1"), "--runtime", "onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "onnxruntime" in err[0] and err[0].startswith("medseg: error:")
    assert main([*args, "--output", str(tmp_path / "o2")]) == 0  # auto falls back to torch
    assert (tmp_path / "o2" / "case.nii.gz").is_file() and not (tmp_path / "run" / "checkpoint_last.onnx").exists()
