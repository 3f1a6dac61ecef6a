"""Several processes training one model: torchrun + DistributedDataParallel (gloo on the CPU, NCCL on GPUs)."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_dataset

from medseg.data.manifest import load_manifest
from medseg.errors import MedsegUserError
from medseg.model.checkpoint import load_checkpoint
from medseg.planning import fingerprint_dataset, make_plans
from medseg.training import train
from medseg.training.data import epoch_seed
from medseg.training.distributed import Ranks

REPO = Path(__file__).resolve().parents[1]
TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")
RUN_FILES = {"checkpoint_last.pt", "checkpoint_best.pt", "history.csv", "plans.json", "resolved_config.json"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 5-case dataset and small plans (4 iterations per epoch, validation every 2 epochs), on disk."""
    root = tmp_path_factory.mktemp("ddp")
    manifest_path = make_dataset(root / "data", num_cases=5, shape=(16, 18, 10))
    plans = make_plans(fingerprint_dataset(load_manifest(manifest_path), workers=1), base_features=4)
    plans["training"].update(iterations_per_epoch=4, validate_every=2)
    plans["configurations"]["3d"]["batch_size"] = 2
    plans_path = root / "plans.json"
    plans_path.write_text(json.dumps(plans))
    return manifest_path, plans_path


def _torchrun(nproc: int, manifest: Path, plans: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N -m medseg train ...`` as a user types it."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command += ["-m", "medseg", "train", str(manifest), "--plans", str(plans), "--out", str(out)]
    command += ["--threads", "1", "--loader-workers", "0", "--no-postprocessing", *extra]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    return done


def _history(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_ranks_come_from_torchrun_variables_only() -> None:
    assert Ranks.from_torchrun({}) is None  # not started by torchrun: one process
    ranks = Ranks.from_torchrun({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert ranks == Ranks(world_size=4, rank=3, local_rank=1) and not ranks.is_main
    assert Ranks.from_torchrun({"WORLD_SIZE": "1"}).is_main
    with pytest.raises(MedsegUserError, match="not integers"):
        Ranks.from_torchrun({"WORLD_SIZE": "two"})
    with pytest.raises(MedsegUserError, match="rank 2"):
        Ranks(world_size=2, rank=2)


def test_each_rank_draws_its_own_patches_and_one_process_draws_as_before() -> None:
    legacy = int(np.random.SeedSequence([7, 3]).generate_state(1)[0])  # the stream of a single process
    assert epoch_seed(7, 3) == legacy
    assert len({epoch_seed(7, 3, rank=r) for r in range(4)}) == 4
    assert len({epoch_seed(7, e, rank=r) for r in range(4) for e in range(4)}) == 16
    assert epoch_seed(7, 3, rank=1) == epoch_seed(7, 3, rank=1)


def test_one_rank_with_ddp_trains_exactly_as_one_process(tiny, tmp_path, monkeypatch, one_torch_thread) -> None:
    """A gloo group of one (DDP wrapper, broadcasts, barriers) changes nothing in the weights."""
    manifest_path, plans_path = tiny
    manifest, plans = load_manifest(manifest_path), json.loads(plans_path.read_text())
    options = dict(epochs=2, seed=4, device="cpu", progress=False, loader_workers=0, time_limit_min=None)
    train(manifest, plans=plans, out_dir=tmp_path / "plain", **options)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # what torchrun sets
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    result = train(manifest, plans=plans, out_dir=tmp_path / "ddp", ranks=Ranks(world_size=1), **options)
    assert result["world_size"] == 1 and not torch.distributed.is_initialized()  # the group is closed again
    plain, ddp = load_checkpoint(tmp_path / "plain")["model"], load_checkpoint(tmp_path / "ddp")["model"]
    assert all(torch.equal(plain[k], ddp[k]) for k in plain)
    assert [r["train_loss"] for r in _history(tmp_path / "plain")] == [
        r["train_loss"] for r in _history(tmp_path / "ddp")
    ]


def _free_port() -> int:
    with socket.socket() as probe:  # a free port for the rendezvous (torchrun chooses one itself)
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, kwargs: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # what torchrun sets for its ranks
    train(ranks=Ranks(world_size=world_size, rank=rank, local_rank=rank), **kwargs)


def _train_in_forked_ranks(world_size: int, **kwargs) -> None:
    """The ranks as forked copies of this process: torchrun's work without its start-up (imports) per rank."""
    context = multiprocessing.get_context("fork")
    port = _free_port()
    ranks = [context.Process(target=_rank_main, args=(r, world_size, port, kwargs)) for r in range(world_size)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=300)
    for process in ranks:
        if process.is_alive():  # a rank waiting for another that left: the test fails, not hangs
            process.kill()
            process.join()
    assert [p.exitcode for p in ranks] == [0] * world_size


def test_two_gloo_processes_train_one_model_and_resume_exactly(tiny, tmp_path) -> None:
    """torchrun -m medseg train, interrupted after 2 of 4 epochs and resumed = 4 epochs straight."""
    manifest, plans = tiny
    split = tmp_path / "split"
    done = _torchrun(2, manifest, plans, split, "--epochs", "4", "--max-epochs-this-run", "2", "--device", "cpu")
    assert done.stdout.count("fold 0: 2 epochs") == 1  # rank 0 reports, rank 1 does not
    halfway = load_checkpoint(split)
    assert halfway["training"]["world_size"] == 2 and halfway["training"]["iteration"] == 8
    resolved = json.loads((split / "resolved_config.json").read_text())
    assert resolved["world_size"] == 2 and resolved["patches_per_iteration"] == 4
    # resumed by two ranks, and the same two ranks without interruption (both forked from this process,
    # sparing torchrun's start-up): the same history and weights, bit for bit
    options = dict(epochs=4, device="cpu", num_threads=1, loader_workers=0, progress=False)
    data = dict(manifest=load_manifest(manifest), plans=json.loads(plans.read_text()))
    _train_in_forked_ranks(2, **data, out_dir=split, resume=True, **options)
    straight = tmp_path / "straight"
    _train_in_forked_ranks(2, **data, out_dir=straight, **options)
    rows = _history(split)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4] and int(rows[-1]["iteration"]) == 16
    losses = [float(r["train_loss"]) for r in rows]  # the mean over the ranks
    assert losses[-1] < losses[0], losses
    assert {p.name for p in split.iterdir()} == RUN_FILES  # one set of checkpoints, no partial files
    resumed, reference = load_checkpoint(split)["model"], load_checkpoint(straight)["model"]
    assert any(not torch.equal(halfway["model"][k], resumed[k]) for k in resumed)  # the resumed run did train
    assert [r["train_loss"] for r in _history(straight)] == [r["train_loss"] for r in rows]
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)

    # a single process would draw other patches: resuming with another world size is refused
    with pytest.raises(MedsegUserError, match="trained by 2 process"):
        train(load_manifest(manifest), plans=plans, out_dir=split, epochs=6, resume=True, device="cpu", progress=False)


def test_ranks_stop_together_at_the_time_limit(tiny, tmp_path) -> None:
    """The wall clock is rank 0's: both ranks stop at the same iteration (or one would wait forever)."""
    manifest, plans = tiny
    run = tmp_path / "timed"
    _train_in_forked_ranks(
        2,
        manifest=load_manifest(manifest),
        plans=json.loads(plans.read_text()),
        out_dir=run,
        time_limit_min=0.05,
        iterations_per_epoch=2,
        device="cpu",
        num_threads=1,
        loader_workers=0,
        progress=False,
    )
    rows = _history(run)
    rates = [float(r["learning_rate"]) for r in rows]
    assert rows and rates == sorted(rates, reverse=True)  # the poly schedule, compressed into the budget
    assert float(rows[-1]["elapsed_s"]) < 0.05 * 60 + 5
    assert load_checkpoint(run)["training"]["world_size"] == 2


@pytest.mark.gpu
def test_ddp_on_one_gpu_trains(tiny, tmp_path) -> None:
    """torchrun with one process per GPU (here one): NCCL, AMP, DDP; the loss falls and rank 0 writes."""
    manifest, plans = tiny
    run = tmp_path / "gpu"
    _torchrun(1, manifest, plans, run, "--epochs", "4", "--device", "cuda")
    losses = [float(r["train_loss"]) for r in _history(run)]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    resolved = json.loads((run / "resolved_config.json").read_text())
    assert resolved["device"] == "cuda:0" and resolved["amp"] is True and resolved["world_size"] == 1
    assert {p.name for p in run.iterdir()} == RUN_FILES


@pytest.mark.gpu
def test_amp_inference_matches_float32(tiny, tmp_path, one_torch_thread) -> None:
    """On CUDA, prediction runs the network under float16 autocast; the labels match float32 on the CPU."""
    from medseg.inference import Segmenter
    from medseg.io import read_channels

    manifest_path, plans_path = tiny
    manifest = load_manifest(manifest_path)
    plans = json.loads(plans_path.read_text())
    train(manifest, plans=plans, out_dir=tmp_path / "run", epochs=4, device="cpu", progress=False, loader_workers=0)
    image = read_channels(manifest.labelled_cases[0].images)
    on_gpu = Segmenter.from_checkpoint(tmp_path / "run", device="cuda", postprocessing=None)
    on_cpu = Segmenter.from_checkpoint(tmp_path / "run", device="cpu", postprocessing=None)
    assert on_gpu.amp and not on_cpu.amp
    fast, exact = on_gpu.predict(image), on_cpu.predict(image)
    np.testing.assert_array_equal(fast.affine, image.affine)
    assert fast.array.shape == exact.array.shape
    assert np.mean(fast.array == exact.array) > 0.99  # float16 may flip a voxel on a near tie
    probabilities = on_gpu.predict_probabilities(image).array
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, on_cpu.predict_probabilities(image).array, atol=2e-2)
