"""Per-structure statistics: volumes in ml and intensity summaries, worked out by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medseg.cli import main
from medseg.core.labels import LabelSet
from medseg.core.volume import Volume
from medseg.errors import GeometryMismatchError, LabelValueError
from medseg.evaluation.statistics import STATISTICS_COLUMNS, structure_statistics
from medseg.io import read_volume, write_volume

SPACING_MM = (0.5, 2.0, 3.0)  # one voxel = 3 mm^3 = 0.003 ml
LABELS = LabelSet.from_manifest(
    {"0": "background", "1": "liver", "2": "tumour", "3": "cyst"}, regions={"organ": [1, 2]}
)


def _pair() -> tuple[Volume, Volume]:
    """Liver: a 2x3x4 block holding 1..24; tumour: 3 voxels of -5, 0, 5; cyst: absent; elsewhere -1000."""
    affine = np.diag([*SPACING_MM, 1.0])
    affine[:3, 3] = (4.0, -2.0, 7.5)
    image = np.full((6, 5, 7), -1000.0, dtype=np.float32)
    labels = np.zeros((6, 5, 7), dtype=np.uint8)
    image[1:3, 1:4, 2:6] = np.arange(1, 25, dtype=np.float32).reshape(2, 3, 4)
    labels[1:3, 1:4, 2:6] = 1
    for value, position in zip((-5.0, 0.0, 5.0), ((5, 0, 0), (5, 0, 1), (5, 0, 2))):
        image[position], labels[position] = value, 2
    return Volume(image[None], affine), Volume(labels[None], affine, kind="label")


def test_volumes_and_intensities_match_hand_computed_values() -> None:
    image, labels = _pair()
    table = structure_statistics(image, labels, labels=LABELS).set_index("structure")
    assert list(table.reset_index().columns) == list(STATISTICS_COLUMNS)
    assert list(table.index) == ["liver", "tumour", "cyst", "organ"]
    liver = table.loc["liver"]
    assert liver["voxel_count"] == 24 and liver["label_ids"] == "1"
    assert liver["volume_ml"] == pytest.approx(24 * 0.5 * 2.0 * 3.0 / 1000)  # 0.072 ml
    assert liver["intensity_mean"] == pytest.approx(12.5)
    assert liver["intensity_sd"] == pytest.approx(math.sqrt((24**2 - 1) / 12))  # population sd of 1..24
    assert liver["intensity_median"] == pytest.approx(12.5)
    assert liver["intensity_p5"] == pytest.approx(1 + 0.05 * 23)  # linear interpolation: 2.15
    assert liver["intensity_p95"] == pytest.approx(1 + 0.95 * 23)  # 22.85
    assert (liver["intensity_min"], liver["intensity_max"]) == (1.0, 24.0)
    tumour = table.loc["tumour"]
    assert tumour["voxel_count"] == 3 and tumour["volume_ml"] == pytest.approx(0.009)
    assert tumour["intensity_mean"] == 0.0 and tumour["intensity_sd"] == pytest.approx(math.sqrt(50 / 3))
    cyst = table.loc["cyst"]
    assert cyst["voxel_count"] == 0 and cyst["volume_ml"] == 0.0 and math.isnan(cyst["intensity_mean"])
    organ = table.loc["organ"]  # region: liver + tumour
    assert organ["label_ids"] == "1+2" and organ["voxel_count"] == 27
    assert organ["intensity_mean"] == pytest.approx((300 + 0) / 27)


def test_one_pass_grouping_agrees_with_a_mask_per_structure() -> None:
    rng = np.random.default_rng(4)
    affine = np.diag([0.7, 0.8, 1.5, 1.0])
    image = Volume(rng.normal(40, 30, size=(2, 20, 18, 9)).astype(np.float32), affine)  # two channels
    labels = Volume(rng.integers(0, 4, size=(1, 20, 18, 9)).astype(np.uint8), affine, kind="label")
    table = structure_statistics(image, labels, labels=LABELS)
    assert len(table) == 4 * 2
    for row in table.itertuples():
        mask = np.isin(labels.array[0], [int(v) for v in row.label_ids.split("+")])
        values = image.array[row.channel][mask].astype(np.float64)
        assert row.voxel_count == mask.sum()
        assert row.volume_ml == pytest.approx(mask.sum() * 0.7 * 0.8 * 1.5 / 1000)
        np.testing.assert_allclose(
            [row.intensity_mean, row.intensity_sd, row.intensity_median, row.intensity_p5, row.intensity_p95],
            [values.mean(), values.std(), np.median(values), np.percentile(values, 5), np.percentile(values, 95)],
            rtol=1e-12,
        )


def test_without_a_label_map_every_value_present_is_a_structure() -> None:
    image, labels = _pair()
    table = structure_statistics(image, labels)
    assert list(table["structure"]) == ["1", "2"] and list(table["voxel_count"]) == [24, 3]


def test_geometry_mismatch_and_unknown_label_values_are_one_line_errors(tmp_path: Path) -> None:
    image, labels = _pair()
    moved = Volume(labels.array, labels.affine + _shift(1.0), kind="label")  # origin 1 mm further right
    with pytest.raises(GeometryMismatchError, match=r"geometry differs: origin"):
        structure_statistics(image, moved, labels=LABELS)
    unknown = labels.with_array(np.where(labels.array == 2, 9, labels.array).astype(np.uint8))
    with pytest.raises(LabelValueError, match=r"label values \[9\] are not in the label map"):
        structure_statistics(image, unknown, labels=LABELS)


def _shift(mm: float) -> np.ndarray:
    shift = np.zeros((4, 4))
    shift[0, 3] = mm
    return shift


def _write_pair(tmp_path: Path) -> tuple[Path, Path, Path]:
    image, labels = _pair()
    manifest = tmp_path / "dataset.json"
    manifest.write_text(json.dumps({"labels": LABELS.to_json()["labels"], "regions": {"organ": [1, 2]}}))
    return write_volume(image, tmp_path / "ct.nii.gz"), write_volume(labels, tmp_path / "ct_seg.nii.gz"), manifest


def test_stats_command_prints_and_writes_csv_and_json(tmp_path: Path, capsys) -> None:
    image, labels, manifest = _write_pair(tmp_path)
    out_csv, out_json = tmp_path / "s.csv", tmp_path / "s.json"
    args = ["stats", "--image", str(image), "--labels", str(labels), "--labels-from", str(manifest)]
    assert main([*args, "--out", str(out_csv)]) == 0
    printed = capsys.readouterr().out
    assert "liver" in printed and "0.072" in printed and f"wrote {out_csv}" in printed
    table = pd.read_csv(out_csv, dtype={"label_ids": str}).set_index("structure")
    assert table.loc["liver", "voxel_count"] == 24 and table.loc["liver", "intensity_p95"] == pytest.approx(22.85)
    assert main([*args, "--out", str(out_json)]) == 0
    content = json.loads(out_json.read_text())  # strict JSON: NaN became null
    assert content["image"] == str(image) and content["spacing_mm"] == pytest.approx(list(SPACING_MM))
    cyst = next(s for s in content["structures"] if s["structure"] == "cyst")
    assert cyst["voxel_count"] == 0 and cyst["intensity_mean"] is None


def test_stats_command_bad_inputs_are_one_line_errors(tmp_path: Path, capsys) -> None:
    image, labels, manifest = _write_pair(tmp_path)
    _, label_volume = _pair()
    shifted = write_volume(
        Volume(label_volume.array, label_volume.affine + _shift(2.0), kind="label"), tmp_path / "moved.nii.gz"
    )
    assert main(["stats", "--image", str(image), "--labels", str(shifted)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("medseg: error: ") and "geometry differs" in error and error.count("\n") == 1
    small = tmp_path / "small.json"
    small.write_text(json.dumps({"labels": {"0": "background", "1": "liver"}}))
    assert main(["stats", "--image", str(image), "--labels", str(labels), "--labels-from", str(small)]) == 2
    assert f"medseg: error: {labels}: label values [2] are not in the label map" in capsys.readouterr().err
    assert main(["stats", "--image", str(image), "--labels", str(labels), "--out", str(tmp_path / "s.txt")]) == 2
    captured = capsys.readouterr()
    assert "s.txt: statistics are written as .csv or .json" in captured.err and captured.out == ""  # checked first


def test_predict_statistics_beside_the_predictions(tmp_path: Path, capsys) -> None:
    pytest.importorskip("torch")
    from test_inference import write_checkpoint

    write_checkpoint(tmp_path / "run")
    rng = np.random.default_rng(0)
    for index in range(2):
        write_volume(
            Volume(rng.normal(size=(1, 14, 12, 6)).astype(np.float32) + 2, np.diag([0.9, 1.1, 2.0, 1.0])),
            tmp_path / "in" / f"case_{index}.nii.gz",
        )
    args = ["predict", "--model", str(tmp_path / "run"), "--input", str(tmp_path / "in")]
    assert main([*args, "--output", str(tmp_path / "out"), "--device", "cpu", "--no-tta", "--statistics"]) == 0
    combined = pd.read_csv(tmp_path / "out" / "statistics.csv")
    assert list(combined.columns) == ["case_id", *STATISTICS_COLUMNS]
    for index in range(2):
        prediction = read_volume(tmp_path / "out" / f"case_{index}.nii.gz", kind="label")
        image = read_volume(tmp_path / "in" / f"case_{index}.nii.gz")
        per_case = pd.read_csv(tmp_path / "out" / "statistics" / f"case_{index}.csv").set_index("structure")
        for name, label_id in (("a", 1), ("b", 2)):
            mask = prediction.array[0] == label_id
            assert per_case.loc[name, "voxel_count"] == mask.sum()
            assert per_case.loc[name, "volume_ml"] == pytest.approx(mask.sum() * 0.9 * 1.1 * 2.0 / 1000)
            if mask.any():
                assert per_case.loc[name, "intensity_mean"] == pytest.approx(float(image.array[0][mask].mean()))
        rows = combined[combined["case_id"] == f"case_{index}"]
        assert list(rows["voxel_count"]) == list(per_case["voxel_count"])
    record = json.loads((tmp_path / "out" / "medseg_predict.json").read_text())
    assert record["cases"]["case_0"]["outputs"]["statistics"]["file"] == "statistics/case_0.csv"
