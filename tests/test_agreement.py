"""Matched lesion volumes from an evaluation's lesion table, and Bland–Altman limits of agreement."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from medseg.core.labels import LabelSet
from medseg.core.volume import Volume
from medseg.errors import MedsegUserError
from medseg.evaluation.agreement import MATCHED_LESION_COLUMNS, bland_altman, matched_lesion_volumes
from medseg.evaluation.case import EvaluationSettings, evaluate_pair


def test_bland_altman_by_hand() -> None:
    result = bland_altman([1.0, 2.0, 3.0, 4.0], [1.5, 2.0, 2.5, 5.0])
    # d = 0.5, 0, -0.5, 1: mean 0.25, sample variance 1.25 / 3
    sd = math.sqrt(1.25 / 3)
    assert result["n"] == 4 and result["n_dropped"] == 0
    assert result["bias"] == pytest.approx(0.25)
    assert result["sd"] == pytest.approx(sd)
    assert result["loa_low"] == pytest.approx(0.25 - 1.96 * sd)
    assert result["loa_high"] == pytest.approx(0.25 + 1.96 * sd)


def test_bland_altman_drops_nan_pairs_and_counts_them() -> None:
    result = bland_altman([1.0, np.nan, 3.0, 2.0], [2.0, 5.0, np.nan, 2.0])
    assert result["n"] == 2 and result["n_dropped"] == 2
    assert result["bias"] == pytest.approx(0.5)
    one = bland_altman([1.0], [3.0])
    assert one["bias"] == 2.0 and math.isnan(one["sd"]) and math.isnan(one["loa_high"])
    none = bland_altman([], [])
    assert none["n"] == 0 and math.isnan(none["bias"])


def test_bland_altman_refuses_unequal_lengths() -> None:
    with pytest.raises(MedsegUserError, match="equal length, got 3 and 2"):
        bland_altman([1, 2, 3], [1, 2])


def _lesion_case() -> tuple[Volume, Volume]:
    reference = np.zeros((20, 20, 10), np.uint8)
    prediction = np.zeros_like(reference)
    reference[2:6, 2:6, 2:6] = 1  # 64 voxels; predicted with 80 voxels (IoU 0.8): matched
    prediction[2:7, 2:6, 2:6] = 1
    reference[10:13, 10:13, 2:5] = 1  # 27 voxels; predicted exactly: matched
    prediction[10:13, 10:13, 2:5] = 1
    reference[15:17, 2:4, 7:9] = 1  # 8 voxels; missed
    prediction[15:18, 14:18, 6:9] = 1  # 36 voxels; a false positive
    affine = np.diag([2.0, 1.0, 1.0, 1.0])  # 0.002 ml per voxel
    return Volume(reference[None], affine, kind="label"), Volume(prediction[None], affine, kind="label")


def test_matched_lesion_volumes_pairs_each_matched_reference_lesion_with_its_partner() -> None:
    labels = LabelSet.from_manifest({"0": "background", "1": "lesion"})
    reference, prediction = _lesion_case()
    pair = evaluate_pair(
        reference, prediction, settings=EvaluationSettings(labels=labels, things=("lesion",)), case_id="c1"
    )
    pairs = matched_lesion_volumes(pd.DataFrame(pair.lesions))
    assert list(pairs.columns) == MATCHED_LESION_COLUMNS
    assert len(pairs) == 2  # the missed lesion and the false positive have no partner
    by_size = pairs.sort_values("ref_ml").reset_index(drop=True)
    assert by_size["ref_ml"].tolist() == pytest.approx([27 * 0.002, 64 * 0.002])
    assert by_size["pred_ml"].tolist() == pytest.approx([27 * 0.002, 80 * 0.002])
    assert by_size["dice"].tolist() == pytest.approx([1.0, 2 * 64 / (64 + 80)])
    assert (pairs["case_id"] == "c1").all() and (pairs["structure"] == "lesion").all()


def test_matched_lesion_volumes_empty_and_malformed_tables() -> None:
    assert matched_lesion_volumes(pd.DataFrame()).empty
    with pytest.raises(MedsegUserError, match="missing column.*matched_id"):
        matched_lesion_volumes(pd.DataFrame({"case_id": ["a"], "structure": ["s"], "source": ["reference"],
                                             "lesion_id": [1], "volume_ml": [1.0], "matched": [True]}))  # fmt: skip
    with pytest.raises(MedsegUserError, match="lesions table"):
        matched_lesion_volumes([1, 2, 3])
