"""Evaluation and batch prediction on a Dask cluster: identical to the serial run, worker deaths, resume.

One local cluster of 2 worker processes (1 thread each) serves the module; the API is pointed at its
scheduler address, as ``--scheduler`` does.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

distributed = pytest.importorskip("distributed")

from conftest import oblique_affine  # noqa: E402

from medseg.cli import main  # noqa: E402
from medseg.core.volume import Volume  # noqa: E402
from medseg.errors import MedsegUserError  # noqa: E402
from medseg.evaluation import evaluate, write_outputs  # noqa: E402
from medseg.evaluation.batch import _run_job  # noqa: E402
from medseg.evaluation.case import EvaluationSettings  # noqa: E402
from medseg.evaluation.dask_runner import dask_client, run_cases  # noqa: E402
from medseg.evaluation.pairing import case_jobs  # noqa: E402
from medseg.io import write_volume  # noqa: E402

LABELS = {"0": "background", "1": "front", "2": "back"}


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=40
    ) as local:
        yield local


def _label_pairs(root: Path, count: int = 6) -> tuple[Path, Path, Path]:
    """References and perturbed predictions (shifted, eroded, one structure missing) plus a manifest."""
    rng = np.random.default_rng(3)
    (root / "ref").mkdir(parents=True)
    (root / "pred").mkdir()
    for index in range(count):
        ref = np.zeros((24, 20, 12), np.uint8)
        ref[4 : 12 + index % 3, 5:15, 2:9] = 1
        ref[13:20, 4 : 10 + index % 4, 3:10] = 2
        pred = np.roll(ref, index % 3 - 1, axis=index % 3)
        if index == 4:
            pred[pred == 2] = 0
        pred[rng.random(pred.shape) < 0.01] = 1
        volume = Volume(ref[None], oblique_affine(), kind="label")
        write_volume(volume, root / "ref" / f"case_{index}.nii.gz")
        write_volume(volume.with_array(pred[None]), root / "pred" / f"case_{index}.nii.gz")
    manifest = root / "dataset.json"
    manifest.write_text(json.dumps({"name": "t", "labels": LABELS, "training": [], "test": []}))
    return root / "ref", root / "pred", manifest


def test_evaluation_on_dask_is_identical_to_serial(tmp_path, cluster):
    ref, pred, manifest = _label_pairs(tmp_path)
    serial = evaluate(ref, pred, labels=manifest, out=tmp_path / "serial")
    on_dask = evaluate(ref, pred, labels=manifest, out=tmp_path / "dask", scheduler=cluster.scheduler_address)
    pd.testing.assert_frame_equal(serial.per_case, on_dask.per_case)
    pd.testing.assert_frame_equal(serial.cases, on_dask.cases)
    assert (serial.confusion == on_dask.confusion).all()
    assert sum(on_dask.cases_per_worker.values()) == 6 and not serial.cases_per_worker
    assert set(on_dask.cases_per_worker) <= {str(w.name) for w in cluster.workers.values()}
    write_outputs(serial, tmp_path / "serial", report=False)
    write_outputs(on_dask, tmp_path / "dask", report=False)
    for table in ("per_case.csv", "cases.csv"):
        assert (tmp_path / "serial" / table).read_bytes() == (tmp_path / "dask" / table).read_bytes()


def test_evaluation_rerun_resumes_from_finished_cases(tmp_path, cluster):
    ref, pred, manifest = _label_pairs(tmp_path)
    address = cluster.scheduler_address
    first = evaluate(ref, pred, labels=manifest, out=tmp_path / "out", scheduler=address)
    cache = sorted((tmp_path / "out" / ".cache").glob("*.json"))
    assert len(cache) == 6  # the driver recorded every case as it arrived
    for entry in cache[:2]:  # as if the driver had been killed before these two arrived
        entry.unlink()
    again = evaluate(ref, pred, labels=manifest, out=tmp_path / "out", scheduler=address)
    assert sum(again.cases_per_worker.values()) == 2  # only the unfinished cases were sent to the workers
    pd.testing.assert_frame_equal(first.per_case, again.per_case)


def _die_once(marker: str, function, *args):
    """Kill this worker process the first time any worker runs it (the marker file says it happened)."""
    try:
        with open(marker, "x"):
            pass
    except FileExistsError:
        return function(*args)
    os._exit(1)


def test_a_worker_that_dies_has_its_case_run_elsewhere(tmp_path, cluster):
    ref, pred, manifest = _label_pairs(tmp_path)
    jobs, _, _ = case_jobs(ref, pred, data_root=None, probabilities=None, subset=None)
    from medseg.evaluation.pairing import resolve_labels

    labels, _ = resolve_labels(manifest, None, None)
    settings = EvaluationSettings(labels=labels)
    marker = str(tmp_path / "died")
    results: dict[int, dict] = {}
    with dask_client(scheduler=cluster.scheduler_address) as client:
        run_cases(client, _die_once, [(marker, _run_job, job, settings) for job in jobs], on_result=results.__setitem__)
    assert Path(marker).exists()  # a worker did die
    assert sorted(results) == list(range(len(jobs)))  # every case finished once
    serial = [_run_job(job, settings) for job in jobs]
    pd.testing.assert_frame_equal(
        pd.DataFrame([row for i in range(len(jobs)) for row in results[i]["rows"]]),
        pd.DataFrame([row for r in serial for row in r["rows"]]),
    )


@pytest.fixture
def tiny_model(tmp_path):
    torch = pytest.importorskip("torch")
    from test_inference import write_checkpoint

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers run 1 thread each: the same arithmetic
    write_checkpoint(tmp_path / "run")
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for index in range(4):
        volume = Volume(rng.normal(size=(1, 14, 12, 6)).astype(np.float32) + 2, oblique_affine())
        write_volume(volume, inputs / f"case_{index}.nii.gz")
    (inputs / "broken.nii.gz").write_bytes(b"not a nifti")
    yield tmp_path / "run", inputs
    torch.set_num_threads(previous)


def _outputs(record_path: Path) -> dict[str, object]:
    record = json.loads(record_path.read_text())
    return {case: (entry["status"], entry.get("outputs")) for case, entry in record["cases"].items()}


def test_prediction_on_dask_is_identical_to_serial_and_resumes(tmp_path, cluster, tiny_model):
    from medseg.inference.batch import RECORD_FILE, predict_batch

    run, inputs = tiny_model
    options = {"device": "cpu", "tta": True, "progress": False}
    serial = predict_batch(run, inputs, tmp_path / "serial", **options)
    on_dask = predict_batch(run, inputs, tmp_path / "dask", scheduler=cluster.scheduler_address, **options)
    assert on_dask.predicted == serial.predicted == [f"case_{i}" for i in range(4)]
    assert [c for c, _ in on_dask.failed] == [c for c, _ in serial.failed] == ["broken"]
    assert sum(on_dask.cases_per_worker.values()) == 5
    # the same files with the same bytes, recorded in the same order
    assert _outputs(tmp_path / "serial" / RECORD_FILE) == _outputs(tmp_path / "dask" / RECORD_FILE)
    assert list(_outputs(tmp_path / "serial" / RECORD_FILE)) == list(_outputs(tmp_path / "dask" / RECORD_FILE))
    for index in range(4):
        name = f"case_{index}.nii.gz"
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "dask" / name).read_bytes()
    assert not [p for p in (tmp_path / "dask").iterdir() if p.name.startswith(".")]  # nothing half-written
    # a partial run (as if the driver had been killed after two cases): the rerun predicts only the rest
    (tmp_path / "dask" / "case_1.nii.gz").unlink()
    record = json.loads((tmp_path / "dask" / RECORD_FILE).read_text())
    del record["cases"]["case_3"]
    (tmp_path / "dask" / RECORD_FILE).write_text(json.dumps(record))
    again = predict_batch(run, inputs, tmp_path / "dask", scheduler=cluster.scheduler_address, **options)
    assert again.predicted == ["case_1", "case_3"] and again.skipped == ["case_0", "case_2"]
    assert _outputs(tmp_path / "serial" / RECORD_FILE) == _outputs(tmp_path / "dask" / RECORD_FILE)


def test_options_and_missing_dask_are_one_line_errors(tmp_path, monkeypatch, capsys):
    ref, pred, manifest = _label_pairs(tmp_path, count=1)
    with pytest.raises(MedsegUserError, match="exclude each other"):
        evaluate(ref, pred, labels=manifest, scheduler="tcp://127.0.0.1:1", dask_local=2)
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if Dask were not installed
    with pytest.raises(MedsegUserError, match=r'pip install -e "\.\[dask\]"'):
        evaluate(ref, pred, labels=manifest, dask_local=2)
    argv = ["evaluate", "--reference", str(ref), "--prediction", str(pred), "--labels", str(manifest)]
    code = main(argv + ["--out", str(tmp_path / "o"), "--scheduler", "tcp://127.0.0.1:8786"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and 'pip install -e ".[dask]"' in err
    # without Dask, --workers still works
    assert main(argv + ["--out", str(tmp_path / "w"), "--workers", "2", "--no-report"]) == 0
