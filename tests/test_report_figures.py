"""report.html's pictures without matplotlib: SVG box plots as matplotlib computes them, overlay orientation,
and each case's volumes read once however many of its structures are among the worst."""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest

from medseg.core.volume import Volume
from medseg.evaluation import evaluate
from medseg.evaluation import report as report_module
from medseg.evaluation.figures import box_plot_svg, overlay_png
from medseg.io import write_volume


def _svg(uri: str) -> ET.Element:
    assert uri.startswith("data:image/svg+xml;base64,")
    return ET.fromstring(base64.b64decode(uri.split(",", 1)[1]))


def test_box_plot_whiskers_and_outliers_match_matplotlib() -> None:
    cbook = pytest.importorskip("matplotlib.cbook")
    rng = np.random.default_rng(1)
    groups = {
        "liver": np.r_[rng.normal(0.9, 0.02, 30), 0.2, 0.5],  # two low outliers
        "spleen": np.r_[rng.normal(0.8, 0.05, 12), np.nan],
        "missing": np.array([np.nan]),
    }
    root = _svg(box_plot_svg(groups, metric="dice"))
    ns = "{http://www.w3.org/2000/svg}"
    expected_fliers = sum(
        len(cbook.boxplot_stats(v[np.isfinite(v)])[0]["fliers"]) for v in groups.values() if np.isfinite(v).any()
    )
    assert expected_fliers >= 2
    assert len(root.findall(f"{ns}circle")) == expected_fliers
    assert len(root.findall(f"{ns}rect")) == 1 + 2  # the frame + one box per structure with values
    labels = [t.text for t in root.findall(f"{ns}text")]
    assert {"liver", "spleen", "missing"} <= set(labels)


def test_overlay_is_oriented_like_imshow_transposed_with_origin_lower() -> None:
    from PIL import Image

    reference = np.zeros((40, 30), bool)
    reference[2:8, 20:28] = True  # small x, large y: the top-left of the picture
    uri = overlay_png(reference, np.zeros_like(reference), crop=False, size_px=40)
    picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))
    assert picture.shape == (30, 40, 3)  # rows = y, columns = x
    green = np.argwhere((picture[..., 1] == 255) & (picture[..., 0] == 0))
    assert green[:, 0].max() < 10 and green[:, 1].max() < 10  # top rows (large y), left columns (small x)
    cropped = overlay_png(reference, np.zeros_like(reference), size_px=40)
    assert Image.open(io.BytesIO(base64.b64decode(cropped.split(",", 1)[1]))).size != (40, 30)


def test_report_reads_each_worst_case_once(tmp_path, monkeypatch) -> None:
    affine = np.diag([0.8, 0.8, 1.5, 1.0])
    reference = np.zeros((30, 28, 16), np.uint8)
    for label in range(1, 7):
        reference[4 * label - 2 : 4 * label + 1, 5:20, 3:12] = label
    prediction = np.roll(reference, 1, axis=1)
    for folder, array in (("ref", reference), ("pred", prediction)):
        write_volume(Volume(array[None], affine, kind="label"), tmp_path / folder / "case.nii.gz")
    labels = {"0": "background", **{str(i): f"s{i}" for i in range(1, 7)}}
    (tmp_path / "labels.json").write_text(pd.Series({"labels": labels}).to_json())
    evaluation = evaluate(tmp_path / "ref", tmp_path / "pred", labels=tmp_path / "labels.json")
    reads: list[str] = []
    original = report_module.read_volume
    monkeypatch.setattr(report_module, "read_volume", lambda path, **kw: reads.append(path) or original(path, **kw))
    page = report_module.write_report(evaluation, tmp_path / "report.html").read_text()
    assert reads == []  # the serial run kept the arrays it read: the report reads nothing again
    kept_page = page
    evaluation.label_arrays = {}  # as after workers: each worst case's files are read, once
    page = report_module.write_report(evaluation, tmp_path / "report.html").read_text()
    assert page == kept_page
    assert len(reads) == 2  # reference and prediction, once, for the five overlays of this case
    assert page.count('alt="overlay case"') == 5
    slices = [int(k) for k in re.findall(r"slice k=(\d+)", page)]
    assert len(slices) == 5 and all(3 <= k < 12 for k in slices)  # each on a slice holding its structure
    # the whole CLI writes its report without importing matplotlib (its import alone cost more than the report)
    script = (
        "import sys; from medseg.cli import main; "
        f"main(['evaluate', '--reference', {str(tmp_path / 'ref')!r}, '--prediction', {str(tmp_path / 'pred')!r}, "
        f"'--labels', {str(tmp_path / 'labels.json')!r}, '--out', {str(tmp_path / 'cli')!r}]); "
        "print('matplotlib' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False" and (tmp_path / "cli" / "report.html").exists()
