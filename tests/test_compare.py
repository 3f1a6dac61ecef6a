"""Paired comparison of two evaluations: hand-computed statistics, Holm, bootstrap, unpaired cases, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon

import medseg
from medseg.cli import main
from medseg.errors import MedsegUserError
from medseg.evaluation.case import EXTRA_COLUMNS, PER_CASE_COLUMNS
from medseg.evaluation.comparison import compare, holm, paired_statistics

NAN = float("nan")
CASES = [f"00{i}" for i in range(1, 9)]  # ids that look numeric: they must stay strings

# method A: 8 cases; method B: cases 001-007, and 006 has no prediction (NaN, status missing_prediction)
DICE_A = {"liver": [0.80, 0.70, 0.90, 0.60, 0.85, 0.75, 0.50, 0.90], "tumor": [0.60, 0.50, 0.40, 0.70, 0.65, 0.55, 0.45, 0.50]}  # fmt: skip
DICE_B = {"liver": [0.85, 0.72, 0.90, 0.70, 0.80, NAN, 0.62], "tumor": [0.55, 0.52, 0.41, 0.72, 0.66, NAN, 0.50]}
HD95_A = {"liver": [5.0, 8.0, 3.0, 10.0, 4.0, 6.0, 7.0, 2.0], "tumor": [12.0, 15.0, 9.0, 20.0, 11.0, 13.0, 14.0, 9.0]}
HD95_B = {"liver": [4.0, 9.0, 3.0, 6.0, 2.0, NAN, 7.5], "tumor": [10.0, 14.0, 9.5, 18.0, 12.0, NAN, 13.0]}
# the paired differences B - A by hand (case 006 excluded: NaN in B; case 008 unpaired: only in A)
LIVER_DICE_D = [0.05, 0.02, 0.0, 0.10, -0.05, 0.12]
LIVER_HD95_D = [-1.0, 1.0, 0.0, -4.0, -2.0, 0.5]
TUMOR_DICE_D = [-0.05, 0.02, 0.01, 0.02, 0.01, 0.05]
DIAGONAL = 100.0


def _table(dice: dict[str, list[float]], hd95: dict[str, list[float]]) -> pd.DataFrame:
    rows = []
    for structure, values in dice.items():
        for i, value in enumerate(values):
            status = "ok" if not math.isnan(value) else "missing_prediction"
            row = {column: NAN for column in PER_CASE_COLUMNS + EXTRA_COLUMNS}
            row.update(case_id=CASES[i], structure=structure, label="1" if structure == "liver" else "2", status=status)
            row.update(
                dice=value, hd95_mm=hd95[structure][i], nsd=value, image_diagonal_mm=DIAGONAL, spacing_known=True
            )
            row["message"] = ""
            rows.append(row)
    return pd.DataFrame(rows, columns=PER_CASE_COLUMNS + EXTRA_COLUMNS)


@pytest.fixture
def tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    return _table(DICE_A, HD95_A), _table(DICE_B, HD95_B)


def _row(table: pd.DataFrame, structure: str, metric: str) -> pd.Series:
    rows = table[(table["structure"] == structure) & (table["metric"] == metric)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_paired_means_and_wins_equal_hand_computed_values(tables) -> None:
    result = compare(*tables, metrics=("dice", "hd95_mm"))
    assert list(result.table["structure"]) == ["liver", "liver", "tumor", "tumor"]
    dice = _row(result.table, "liver", "dice")
    assert (dice.n, dice.n_excluded, dice.n_a_only, dice.n_b_only) == (6, 1, 1, 0)
    assert dice.mean_a == pytest.approx((0.80 + 0.70 + 0.90 + 0.60 + 0.85 + 0.50) / 6)
    assert dice.mean_b == pytest.approx((0.85 + 0.72 + 0.90 + 0.70 + 0.80 + 0.62) / 6)
    assert dice.mean_diff == pytest.approx(0.24 / 6)  # 0.05 + 0.02 + 0 + 0.10 - 0.05 + 0.12
    assert dice.median_diff == pytest.approx((0.02 + 0.05) / 2)
    assert (dice.wins, dice.ties, dice.losses, dice.n_nonzero) == (4, 1, 1, 5)  # the 0.90 = 0.90 case is a tie
    assert dice.direction == "higher"
    tumor = _row(result.table, "tumor", "dice")
    assert tumor.mean_diff == pytest.approx(0.06 / 6)
    assert (tumor.wins, tumor.ties, tumor.losses) == (5, 0, 1)
    # the paired values: one row per case in both x metric; 006 excluded, 008 absent
    pairs = result.pairs[(result.pairs["structure"] == "liver") & (result.pairs["metric"] == "dice")]
    assert list(pairs["case_id"]) == CASES[:7]
    assert list(pairs["outcome"]) == ["win", "win", "tie", "win", "loss", "excluded", "win"]
    assert pairs["difference"].dropna().to_numpy() == pytest.approx(LIVER_DICE_D)
    assert pairs.iloc[5]["status_b"] == "missing_prediction"


def test_lower_is_better_counts_wins(tables) -> None:
    result = compare(*tables, metrics=("hd95_mm",))
    liver = _row(result.table, "liver", "hd95_mm")
    assert liver.direction == "lower"
    assert liver.mean_diff == pytest.approx(-5.5 / 6)
    assert (liver.mean_a, liver.mean_b) == (pytest.approx(37 / 6), pytest.approx(31.5 / 6))
    assert (liver.wins, liver.ties, liver.losses) == (3, 1, 2)  # B lower in 001, 004, 005; higher in 002, 007
    tumor = _row(result.table, "tumor", "hd95_mm")  # -2, -1, +0.5, -2, +1, -1
    assert (tumor.wins, tumor.ties, tumor.losses) == (4, 0, 2)
    assert tumor.mean_diff == pytest.approx(-4.5 / 6)


def test_volume_difference_compares_absolute_values() -> None:
    base = {"case_id": ["1", "2", "3"], "structure": ["s"] * 3}
    a = pd.DataFrame({**base, "volume_diff_ml": [-5.0, 2.0, 1.0]})
    b = pd.DataFrame({**base, "volume_diff_ml": [3.0, -1.0, -4.0]})  # |.|: 5 -> 3 better, 2 -> 1 better, 1 -> 4 worse
    row = compare(a, b, metrics="volume_diff_ml").table.iloc[0]
    assert row.direction == "lower_abs"
    assert (row.wins, row.ties, row.losses) == (2, 0, 1)
    assert (row.mean_a, row.mean_b, row.mean_diff) == (pytest.approx(8 / 3), pytest.approx(8 / 3), pytest.approx(0.0))


def test_wilcoxon_p_value_equals_scipy_on_the_same_differences(tables) -> None:
    result = compare(*tables, metrics=("dice", "hd95_mm"))
    for structure, metric, differences in (
        ("liver", "dice", LIVER_DICE_D),
        ("liver", "hd95_mm", LIVER_HD95_D),
        ("tumor", "dice", TUMOR_DICE_D),
    ):
        expected = wilcoxon(np.array(differences), zero_method="wilcox", alternative="two-sided")
        row = _row(result.table, structure, metric)
        assert row.p_value == pytest.approx(float(expected.pvalue), rel=1e-12)
        assert row.wilcoxon_w == pytest.approx(float(expected.statistic))
    # liver dice by hand: |d| ranks 0.02 -> 1, 0.05 and 0.05 -> 2.5, 0.10 -> 4, 0.12 -> 5; R- = 2.5 (the zero is dropped)
    assert _row(result.table, "liver", "dice").wilcoxon_w == 2.5


def test_every_difference_a_tie_has_p_one_and_no_pairs_nan() -> None:
    tied = paired_statistics(np.array([0.5, 0.7]), np.array([0.5, 0.7]), direction="higher")
    assert (tied["p_value"], tied["ties"], tied["wins"], tied["losses"]) == (1.0, 2, 0, 0)
    none = paired_statistics(np.array([]), np.array([]), direction="higher")
    assert none["n"] == 0 and math.isnan(none["p_value"]) and math.isnan(none["mean_diff"])


def test_holm_hand_worked_example() -> None:
    # sorted 0.01, 0.03, 0.04 (m = 3): 3 x 0.01 = 0.03; 2 x 0.03 = 0.06; max(0.06, 1 x 0.04) = 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # NaN is not a hypothesis (m = 2): 2 x 0.01 = 0.02; max(0.02, 0.2) = 0.2
    adjusted = holm([0.2, NAN, 0.01])
    assert adjusted[[0, 2]] == pytest.approx([0.2, 0.02]) and math.isnan(adjusted[1])
    assert holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]).shape == (0,)


def test_holm_is_applied_across_the_structures_of_each_metric(tables) -> None:
    table = compare(*tables, metrics=("dice", "hd95_mm")).table
    for metric in ("dice", "hd95_mm"):
        p = {s: _row(table, s, metric).p_value for s in ("liver", "tumor")}
        low, high = sorted(p, key=p.get)
        expected = {low: min(1.0, 2 * p[low])}
        expected[high] = min(1.0, max(expected[low], p[high]))
        for structure in ("liver", "tumor"):
            row = _row(table, structure, metric)
            assert row.p_holm == pytest.approx(expected[structure])
            assert row.significant == (row.p_holm < 0.05)


def test_holm_on_five_p_values_worked_by_hand() -> None:
    # sorted: 0.001, 0.01, 0.03, 0.04, 0.2 times 5, 4, 3, 2, 1 -> 0.005, 0.04, 0.09, 0.08, 0.2;
    # running maximum in that order -> 0.005, 0.04, 0.09, 0.09, 0.2; back in the input order:
    assert holm([0.01, 0.04, 0.03, 0.2, 0.001]) == pytest.approx([0.04, 0.09, 0.09, 0.2, 0.005])


def test_bootstrap_ci_resamples_pairs_is_reproducible_and_contains_the_mean(tables) -> None:
    first = _row(compare(*tables, metrics="dice").table, "liver", "dice")
    again = _row(compare(*tables, metrics="dice").table, "liver", "dice")
    other = _row(compare(*tables, metrics="dice", seed=1).table, "liver", "dice")
    assert first.ci_low < first.mean_diff < first.ci_high
    assert (first.ci_low, first.ci_high) == (again.ci_low, again.ci_high)
    assert (first.ci_low, first.ci_high) != (other.ci_low, other.ci_high)
    # the definition: resample the 6 pairs with replacement 2000 times (seed 0), 2.5 / 97.5 percentiles of the means
    d = np.array([0.85, 0.72, 0.90, 0.70, 0.80, 0.62]) - np.array([0.80, 0.70, 0.90, 0.60, 0.85, 0.50])
    means = d[np.random.default_rng(0).integers(0, 6, size=(2000, 6))].mean(axis=1)
    assert (first.ci_low, first.ci_high) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))
    narrower = _row(compare(*tables, metrics="dice", alpha=0.2).table, "liver", "dice")
    assert first.ci_low <= narrower.ci_low < narrower.ci_high <= first.ci_high
    no_ci = _row(compare(*tables, metrics="dice", bootstrap=0).table, "liver", "dice")
    assert math.isnan(no_ci.ci_low) and no_ci.mean_diff == pytest.approx(0.04)


def test_empty_worst_scores_the_missing_prediction(tables) -> None:
    result = compare(*tables, metrics=("dice", "hd95_mm"), empty="worst")
    dice = _row(result.table, "liver", "dice")  # 006: A 0.75, B 0 (missing prediction scored as the worst case)
    assert (dice.n, dice.n_excluded) == (7, 0)
    assert dice.mean_diff == pytest.approx((0.24 - 0.75) / 7)
    assert (dice.wins, dice.ties, dice.losses) == (4, 1, 2)
    hd95 = _row(result.table, "liver", "hd95_mm")  # 006: A 6, B = the image diagonal
    assert hd95.mean_diff == pytest.approx((-5.5 + DIAGONAL - 6.0) / 7)
    assert (hd95.wins, hd95.ties, hd95.losses) == (3, 1, 3)


def test_unpaired_cases_and_structures_are_listed(tables) -> None:
    a, b = tables
    b = pd.concat([b, b[b["structure"] == "tumor"].assign(structure="spleen")], ignore_index=True)
    result = compare(a, b, names=("base", "new"), metrics="dice")
    assert result.unpaired[["case_id", "structure", "only_in"]].values.tolist()[:2] == [
        ["008", "liver", "base"],
        ["008", "tumor", "base"],
    ]
    assert len(result.unpaired) == 2 + 7  # and every spleen row of B
    assert result.structures == {"common": ["liver", "tumor"], "only_in_a": [], "only_in_b": ["spleen"]}
    assert "spleen" not in set(result.table["structure"])
    lines = "\n".join(result.summary_lines())
    assert "unpaired: 2 case x structure rows only in base (not used): 008/liver, 008/tumor" in lines
    assert "structures only in new (not compared): spleen" in lines
    content = result.to_json()
    assert content["unpaired"]["only_in_a"] == 2 and content["unpaired"]["only_in_b"] == 7


def test_api_accepts_evaluations_and_is_public(tables) -> None:
    a, b = tables
    assert medseg.compare is compare
    result = medseg.compare(SimpleNamespace(per_case=a), SimpleNamespace(per_case=b), metrics="dice")
    assert result.sources == ("Evaluation", "Evaluation") and result.names == ("A", "B")
    assert _row(result.table, "liver", "dice").mean_diff == pytest.approx(0.04)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"metrics": ("dice", "volume")}, "metrics"),
        ({"names": ("x", "x")}, "names"),
        ({"alpha": 1.5}, "alpha"),
        ({"bootstrap": -1}, "bootstrap"),
        ({"seed": -3}, "seed"),
        ({"empty": "zero"}, "empty"),
    ],
)
def test_invalid_options_are_named(tables, options, named) -> None:
    with pytest.raises(MedsegUserError, match=named):
        compare(*tables, **options)


def test_table_problems_name_the_source(tables) -> None:
    a, b = tables
    with pytest.raises(MedsegUserError, match=r"B \(DataFrame\): the per_case table has no column hd95_mm"):
        compare(a, b.drop(columns="hd95_mm"))
    with pytest.raises(MedsegUserError, match="duplicate case x structure rows"):
        compare(a, pd.concat([b, b.head(1)]))
    with pytest.raises(MedsegUserError, match="no case x structure in common"):
        compare(a, b.assign(case_id=lambda t: "x" + t["case_id"]))


def _write_folder(folder: Path, table: pd.DataFrame) -> Path:
    folder.mkdir(parents=True)
    table.to_csv(folder / "per_case.csv", index=False)  # what write_outputs writes
    return folder


def test_cli_end_to_end(tables, tmp_path, capsys) -> None:
    a = _write_folder(tmp_path / "unet" / "eval_a", tables[0])
    b = _write_folder(tmp_path / "nnunet" / "eval_b", tables[1])
    out = tmp_path / "comparison"
    assert main(["compare", str(a), str(b), "--out", str(out), "--bootstrap", "500"]) == 0
    printed = capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"comparison.csv", "pairs.csv", "comparison.json", "report.html"}
    table = pd.read_csv(out / "comparison.csv")
    assert len(table) == 6  # 2 structures x (dice, hd95_mm, nsd)
    dice = _row(table, "liver", "dice")
    assert dice.mean_diff == pytest.approx(0.04) and (dice.wins, dice.ties, dice.losses) == (4, 1, 1)
    expected = wilcoxon(np.array(LIVER_DICE_D), zero_method="wilcox").pvalue
    assert dice.p_value == pytest.approx(expected, rel=1e-9)
    pairs = pd.read_csv(out / "pairs.csv", dtype={"case_id": str})
    assert set(pairs["case_id"]) == set(CASES[:7]) and len(pairs) == 2 * 3 * 7
    content = json.loads((out / "comparison.json").read_text())
    assert content["medseg_version"] == medseg.__version__
    assert content["names"] == {"a": "eval_a", "b": "eval_b"}  # the folder names
    assert content["definitions"]["directions"] == {"dice": "higher", "hd95_mm": "lower", "nsd": "higher"}
    assert (
        "Wilcoxon" in content["definitions"]["p_value"] and "zero_method='wilcox'" in content["definitions"]["p_value"]
    )
    assert content["unpaired"]["rows"][0] == {
        "case_id": "008",
        "structure": "liver",
        "only_in": "eval_a",
        "status": "ok",
    }
    assert content["settings"]["bootstrap"] == 500
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "<table" in page and 'src="http' not in page
    assert "008/liver" in page
    liver_dice = next(line for line in printed.splitlines() if "liver" in line and "dice" in line)
    assert liver_dice.split()[:3] == ["liver", "dice", "6"] and liver_dice.split()[-1] == "4/1/1"
    assert "only in eval_a (not used): 008/liver, 008/tumor" in printed


def test_cli_names_and_options(tables, tmp_path, capsys) -> None:
    a = _write_folder(tmp_path / "a", tables[0])
    b = _write_folder(tmp_path / "b", tables[1])
    code = main(
        ["compare", str(a), str(b), "--out", str(tmp_path / "o"), "--name-a", "U-Net", "--name-b", "nnU-Net",
         "--metric", "hd95_mm", "--empty", "worst", "--no-report"]
    )  # fmt: skip
    assert code == 0
    assert not (tmp_path / "o" / "report.html").exists()
    content = json.loads((tmp_path / "o" / "comparison.json").read_text())
    assert content["names"] == {"a": "U-Net", "b": "nnU-Net"} and content["settings"]["empty"] == "worst"
    assert [r["n"] for r in content["table"]] == [7, 7]


@pytest.mark.parametrize("problem", ["missing", "no_per_case", "no_common"])
def test_cli_bad_folder_is_one_error_line(tables, tmp_path, capsys, problem) -> None:
    good = _write_folder(tmp_path / "good", tables[0])
    if problem == "missing":
        bad = tmp_path / "nowhere"
    elif problem == "no_per_case":
        bad = tmp_path / "empty_folder"
        bad.mkdir()
    else:
        bad = _write_folder(tmp_path / "other_cases", tables[1].assign(case_id=lambda t: "x" + t["case_id"]))
    assert main(["compare", str(good), str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medseg: error: ") and str(bad) in err[0]
    assert not (tmp_path / "out").exists()


def test_cli_refuses_to_write_into_an_evaluation_folder(tables, tmp_path, capsys) -> None:
    a = _write_folder(tmp_path / "a", tables[0])
    b = _write_folder(tmp_path / "b", tables[1])
    (b / "report.html").write_text("the evaluation's report")
    assert main(["compare", str(a), str(b), "--out", str(b)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is the evaluation folder" in err[0]
    assert (b / "report.html").read_text() == "the evaluation's report"


def test_evaluate_with_a_baseline_writes_before_after_side_by_side(tmp_path) -> None:
    """``medseg evaluate --baseline`` scores both folders with the same settings and pairs them (refined vs U-Net)."""
    from medseg.core.volume import Volume
    from medseg.io.volumes import write_volume

    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    rng = np.random.default_rng(0)
    for index in range(4):
        reference = np.zeros((20, 20, 8), np.uint8)
        reference[5:15, 5:15, 2:6] = 1
        better, worse = reference.copy(), np.roll(reference, 2 + index % 2, axis=0)
        better[rng.integers(5, 15), 5, 2] = 0  # one voxel off: better than the shifted one
        for folder, array in (("ref", reference), ("after", better), ("before", worse)):
            write_volume(Volume(array[None], affine, kind="label"), tmp_path / folder / f"case_{index}.nii.gz")
    (tmp_path / "labels.json").write_text(json.dumps({"labels": {"0": "background", "1": "tumour"}}))
    code = main(
        ["evaluate", "--reference", str(tmp_path / "ref"), "--prediction", str(tmp_path / "after")]
        + ["--labels", str(tmp_path / "labels.json"), "--out", str(tmp_path / "ev"), "--no-report"]
        + ["--baseline", str(tmp_path / "before")]
    )
    assert code == 0
    after = pd.read_csv(tmp_path / "ev" / "per_case.csv")
    before = pd.read_csv(tmp_path / "ev" / "baseline" / "per_case.csv")
    result = pd.read_csv(tmp_path / "ev" / "before_after" / "comparison.csv")
    dice = result[(result["metric"] == "dice") & (result["structure"] == "tumour")].iloc[0]
    assert dice["n"] == 4 and dice["wins"] == 4 and dice["n_a_only"] == dice["n_b_only"] == 0
    assert math.isclose(dice["mean_diff"], after["dice"].mean() - before["dice"].mean(), abs_tol=1e-9)
