"""Evaluation on the real shared data: hippocampus, BraTS regions, MS lesions, DRIVE observers.

References are compared with perturbed copies written to a temporary folder (never into the
repository). Skipped when ../shared/data is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from medseg.cli import main
from medseg.data.manifest import load_manifest
from medseg.evaluation import evaluate
from medseg.io import read_volume, write_volume

MANIFESTS = Path(__file__).resolve().parents[1] / "data_manifests"
pytestmark = pytest.mark.shared_data


def test_hippocampus_identity_and_perturbed(shared_data: Path, tmp_path: Path) -> None:
    manifest = load_manifest(MANIFESTS / "msd_hippocampus.json", data_root=shared_data / "msd_hippocampus")
    cases = manifest.cases[:12]
    pred_dir = tmp_path / "pred"
    expected: dict[str, tuple[float, float]] = {}
    for index, case in enumerate(cases):
        label = read_volume(case.label, kind="label")
        array = label.array[0].copy()
        if index % 2:
            grown = ndimage.binary_dilation(array == 1) & (array == 0)
            array[grown] = 1  # grow the anterior part into the background only
            # the reference's n anterior voxels all stay: Dice = 2n / (n + n + added), volume +added voxels
            n, added = int(np.count_nonzero(label.array[0] == 1)), int(np.count_nonzero(grown))
            expected[case.case_id] = (2 * n / (2 * n + added), added * label.voxel_volume_ml)
        write_volume(label.with_array(array), pred_dir / f"{case.case_id}.nii.gz")
    evaluation = evaluate(manifest, pred_dir)
    table = evaluation.per_case.set_index(["case_id", "structure"])
    assert len(evaluation.cases[evaluation.cases.status == "ok"]) == 12
    assert len(evaluation.cases[evaluation.cases.status == "missing_prediction"]) == 208 - 12
    even, odd = cases[0].case_id, cases[1].case_id
    assert table.loc[(even, "Anterior"), "dice"] == 1.0 and table.loc[(even, "Anterior"), "hd95_mm"] == 0.0
    for case_id, (dice, volume_diff_ml) in expected.items():
        assert table.loc[(case_id, "Anterior"), "dice"] == pytest.approx(dice)
        assert table.loc[(case_id, "Anterior"), "volume_diff_ml"] == pytest.approx(volume_diff_ml)
        assert table.loc[(case_id, "Posterior"), "dice"] == 1.0
    assert 0.6 < expected[odd][0] < 0.99  # the dilation changed something, but not everything
    assert table.loc[(odd, "Posterior"), "dice"] == 1.0
    # a one-voxel dilation moves a boundary by 1 voxel; a thin part that becomes interior
    # can put the nearest boundary voxel 2 voxels away, never more
    assert 1.0 <= table.loc[(odd, "Anterior"), "hd_mm"] <= 2.0
    assert 0.99 < table.loc[(odd, "Anterior"), "nsd"] <= 1.0


def test_brats_regions(shared_data: Path, tmp_path: Path) -> None:
    manifest = load_manifest(MANIFESTS / "brats2013.json", data_root=shared_data / "brats2013_deepmedic")
    case = manifest.cases[0]
    label = manifest.read_label(case)
    array = label.array[0].copy()
    array[array == 4] = 1  # call every enhancing voxel necrosis: regions tell what that costs
    write_volume(label.with_array(array), tmp_path / "pred" / f"{case.case_id}.nii.gz")
    evaluation = evaluate(manifest, tmp_path / "pred")
    rows = evaluation.per_case[evaluation.per_case.case_id == case.case_id].set_index("structure")
    assert rows.loc["whole_tumour", "dice"] == 1.0
    assert rows.loc["tumour_core", "dice"] == 1.0  # {1, 3, 4}: 4 -> 1 stays inside the core
    assert rows.loc["enhancing_tumour", "status"] == "pred_empty"
    assert rows.loc["enhancing_tumour", "dice"] == 0.0
    assert rows.loc["tumour_core", "label"] == "1+3+4"


def test_ms_lesions_lesion_wise(shared_data: Path, tmp_path: Path) -> None:
    manifest = load_manifest(MANIFESTS / "ms_lesions.json", data_root=shared_data / "ms_lesions_lesjak")
    expected_lesions = {"patient07": 37, "patient19": 98, "patient26": 19}  # PROVENANCE.md, 26-connectivity
    for case in manifest.cases:
        label = read_volume(case.label, kind="label")
        components, count = ndimage.label(label.array[0] > 0, structure=np.ones((3, 3, 3)))
        sizes = np.bincount(components.ravel())
        smallest = [int(i) for i in np.argsort(sizes[1:])[:5] + 1]  # drop the five smallest lesions
        array = label.array[0].copy()
        array[np.isin(components, smallest)] = 0
        write_volume(label.with_array(array), tmp_path / "pred" / f"{case.case_id}.nii.gz")
    out = tmp_path / "out"
    code = main(
        [
            "evaluate",
            "--reference",
            str(MANIFESTS / "ms_lesions.json"),
            "--data-root",
            str(shared_data / "ms_lesions_lesjak"),
            "--prediction",
            str(tmp_path / "pred"),
            "--out",
            str(out),
            "--no-report",
        ]
    )
    assert code == 0
    summary = pd.read_csv(out / "lesion_summary.csv").set_index("case_id")
    for case_id, count in expected_lesions.items():
        assert summary.loc[case_id, "n_ref"] == count
        assert summary.loc[case_id, "tp"] == count - 5
        assert summary.loc[case_id, "fn"] == 5 and summary.loc[case_id, "fp"] == 0
        assert summary.loc[case_id, "lesion_recall"] == pytest.approx((count - 5) / count)
        assert summary.loc[case_id, "lesion_precision"] == 1.0
    lesions = pd.read_csv(out / "lesions.csv")
    assert len(lesions[lesions.source == "reference"]) == sum(expected_lesions.values())
    assert (~lesions[lesions.source == "reference"].matched).sum() == 15
    totals = json.loads((out / "summary.json").read_text())["lesions"]["white-matter lesion"]
    assert totals["tp"] == sum(expected_lesions.values()) - 15


def test_drive_two_observers(shared_data: Path, tmp_path: Path) -> None:
    manifest = load_manifest(MANIFESTS / "drive_retina.json", data_root=shared_data / "drive_retina")
    test_cases = [c for c in manifest.cases if c.subset == "test_labelled"][:4]
    for case in test_cases:  # the "prediction" is observer 2: the human baseline
        observer2 = manifest.read_label(case, key="label_observer2")
        write_volume(observer2, tmp_path / "pred" / f"{case.case_id}.png")
    evaluation = evaluate(manifest, tmp_path / "pred", subset="test_labelled")
    scored = evaluation.per_case[evaluation.per_case.status == "ok"]
    assert len(scored) == 4
    assert scored["dice"].between(0.74, 0.83).all()  # PROVENANCE: 0.742-0.829
    whole = evaluate(manifest, tmp_path / "pred", subset="test_labelled", field_of_view=False).per_case
    for case in test_cases:  # and exactly 2|A & B| / (|A| + |B|) of the two observers' vessel masks
        a = manifest.read_label(case).array[0] == 255
        b = manifest.read_label(case, key="label_observer2").array[0] == 255
        fov = read_volume(case.extras["fov_mask"], kind="label").array[0] > 0  # DRIVE's protocol: inside the FOV

        def dice(a: np.ndarray, b: np.ndarray) -> float:
            return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))

        assert scored.set_index("case_id").loc[case.case_id, "dice"] == pytest.approx(dice(a & fov, b & fov))
        assert whole.set_index("case_id").loc[case.case_id, "dice"] == pytest.approx(dice(a, b))
    inter = evaluation.inter_rater
    # inter-rater agreement covers every test case with two observers, predicted or not
    assert set(inter.rater_b) == {"observer2"} and len(inter) == 20  # 20 cases x 1 structure
    merged = inter.merge(scored, on=["case_id", "structure"], suffixes=("_inter", "_pred"))
    assert np.allclose(merged.dice_inter, merged.dice_pred)
    per_rater = evaluation.per_rater
    assert set(per_rater.rater) == {"rater1", "observer2", "majority", "staple"}
    assert (per_rater[per_rater.rater == "observer2"].dice == 1.0).all()
    assert not scored["spacing_known"].any()  # DRIVE has no pixel spacing: distances are pixels
