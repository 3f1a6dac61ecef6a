"""SAM refinement with a quality gate: controlled backends (test doubles of the protocol) decide the outcome.

An oracle that segments the bright object inside the box (the reference, up to the box) must be
accepted; the same answer shifted by 3 voxels must be rejected and leave the U-Net's output
bit-identical; a randomly initialised tiny SAM must be rejected; refinement.json bound to other
weights is refused.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

torch = pytest.importorskip("torch")

from medseg.core.labels import LabelSet  # noqa: E402
from medseg.core.volume import Volume  # noqa: E402
from medseg.errors import CheckpointError, MedsegUserError  # noqa: E402
from medseg.refine.apply import SamRefiner, load_refinement  # noqa: E402
from medseg.refine.fit import ValidationCase, fit_cases, sam_fingerprint, score_structure  # noqa: E402
from medseg.refine.gate import CaseScore, GateCriteria, bootstrap_ci, judge, paired_deltas  # noqa: E402
from medseg.refine.protocol import MaskCandidate, PromptBackend, SlicePrompt  # noqa: E402
from medseg.refine.refine import RefineSetting, compose, default_grid, refine_case, slice_axis  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LABELS = LabelSet({0: "background", 1: "left", 2: "right"})
AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])  # the z slices are refined (largest spacing)
GRID = default_grid(margins_mm=(0.0, 2.0), points=(False, True), fusion_weights=(1.0,), choices=("iou",))


def synthetic_case(index: int) -> ValidationCase:
    """Two bright ellipsoids (the reference) on a dark image; the 'U-Net' misses part of their rim."""
    rng = np.random.default_rng(index)
    shape = (36, 36, 6)
    grid = np.indices(shape).astype(np.float64)
    reference = np.zeros(shape, np.uint8)
    for label, centre in ((1, (9.0, 10.0)), (2, (26.0, 25.0))):
        radius = 7.0 + 0.6 * rng.random()
        inside = ((grid[0] - centre[0]) ** 2 + (grid[1] - centre[1]) ** 2) / radius**2 + (
            (grid[2] - 2.5) / 3.2
        ) ** 2 < 1
        reference[inside] = label
    image = (reference > 0).astype(np.float32) + rng.normal(0, 0.05, shape).astype(np.float32)
    unet = np.zeros_like(reference)
    for label in (1, 2):  # the U-Net misses the object's outer ring on its lower half (rows past the centre)
        mask = reference == label
        ring = mask & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3, 1), bool))
        centre_row = np.nonzero(mask)[0].mean()
        unet[mask & ~(ring & (grid[0] > centre_row))] = label
    return ValidationCase(
        f"case_{index}",
        Volume(image[None], AFFINE),
        Volume(reference[None], AFFINE, kind="label"),
        Volume(unet[None], AFFINE, kind="label"),
    )


class BrightObjectBackend:
    """Test double: the bright pixels within 2 voxels of the box (the reference object), optionally shifted."""

    name = "bright-object"

    def __init__(self, shift_px: int = 0) -> None:
        self.shift_px = shift_px
        self.embedded = 0

    def embed(self, slice_rgb: np.ndarray) -> np.ndarray:
        self.embedded += 1
        return slice_rgb

    def decode(self, embedding: np.ndarray, prompt: SlicePrompt, *, multimask: bool = True) -> list[MaskCandidate]:
        bright = embedding[..., 0] > 127
        r0, c0, r1, c1 = (int(v) for v in prompt.box_rc)
        near_box = np.zeros_like(bright)
        near_box[max(r0 - 2, 0) : r1 + 3, max(c0 - 2, 0) : c1 + 3] = True
        mask = np.roll(bright & near_box, self.shift_px, axis=0)
        logits = np.where(mask, 8.0, -8.0).astype(np.float32)
        worse = ndimage.binary_erosion(mask, iterations=2)
        return [
            MaskCandidate(mask, 0.9, 0.95, logits),
            MaskCandidate(worse, 0.4, 0.99, np.where(worse, 8.0, -8.0).astype(np.float32)),
        ]


class FailingBackend:
    """Test double whose decoder always raises."""

    name = "failing"

    def embed(self, slice_rgb: np.ndarray) -> np.ndarray:
        return slice_rgb

    def decode(self, embedding, prompt, *, multimask=True):
        raise RuntimeError("CUDA error: device-side assert")


CASES = [synthetic_case(i) for i in range(5)]
CRITERIA = GateCriteria(bootstrap=200)


def test_doubles_implement_the_protocol():
    assert isinstance(BrightObjectBackend(), PromptBackend) and isinstance(FailingBackend(), PromptBackend)


def test_slice_axis_is_the_coarsest_or_the_last():
    assert slice_axis((1.0, 1.0, 2.0)) == 2 and slice_axis((3.0, 0.8, 0.8)) == 0 and slice_axis((1, 1, 1)) == 2


def test_gate_deltas_worst_case_filling_and_criteria():
    before = [CaseScore("a", "ok", 0.8, 2.0, 0.9, 50.0), CaseScore("b", "ok", 0.7, 3.0, 0.8, 50.0)]
    after = [CaseScore("a", "ok", 0.9, 1.0, 0.95, 50.0), CaseScore("b", "pred_empty", 0.0, np.nan, np.nan, 50.0)]
    deltas = paired_deltas(before, after)
    assert deltas["dice_delta"].tolist() == pytest.approx([0.1, -0.7])
    assert deltas["hd95_mm_delta"].tolist() == pytest.approx([-1.0, 47.0])  # a deleted structure costs the diagonal
    verdict = judge(deltas, GateCriteria(bootstrap=100))
    assert not verdict["passed"] and len(verdict["reasons"]) == 3 and verdict["n_worse"] == 1
    low, high = bootstrap_ci(np.array([1.0, 2.0, 3.0, 4.0]), resamples=500)
    assert 1.0 <= low < 2.5 < high <= 4.0
    with pytest.raises(ValueError):
        paired_deltas(before, after[::-1])


def test_compose_trades_voxels_only_with_the_surrounding_label():
    labels = np.zeros((6, 6, 3), np.uint8)
    labels[1:4, 1:4, :] = 1
    labels[4, 1:4, :] = 2  # a neighbour that must never be overwritten
    structure = LABELS.structures()[0]
    refined = np.zeros_like(labels, bool)
    refined[1:3, 1:5, :] = True  # loses row 3, gains column 4 (background), claims nothing of label 2
    refined[4, 1, :] = True
    out = compose(labels, structure, refined)
    assert np.all(out[3, 1:4] == 0) and np.all(out[1:3, 4] == 1) and np.all(out[4, 1:4] == 2)
    assert compose(labels, structure, labels == 1) is labels


def test_compose_a_region_gives_removed_voxels_to_the_surrounding_label():
    """BraTS-like: core = {1, 4} inside edema (2); removed core voxels become edema, added ones the core's label."""
    from medseg.core.labels import Structure

    labels = np.full((9, 9, 3), 0, np.uint8)
    labels[1:8, 1:8] = 2  # edema
    labels[3:6, 3:6] = 1  # necrosis
    labels[4, 4] = 4  # enhancing
    core = Structure("tumour_core", (1, 4), True)
    refined = np.zeros_like(labels, bool)
    refined[3:5, 3:7] = True  # drops row 5, adds column 6 (from edema)
    out = compose(labels, core, refined)
    assert np.all(out[5, 3:6] == 2) and np.all(out[3:5, 6] == 1) and np.all(out[4, 4] == 4)
    assert np.all(out[labels == 0] == 0)


def test_oracle_backend_is_accepted_and_improves_held_out_cases():
    backend = BrightObjectBackend()
    decisions = fit_cases(CASES[:4], labels=LABELS, backend=backend, grid=GRID, criteria=CRITERIA)
    for name in ("left", "right"):
        decision = decisions[name]
        assert decision["decision"] == "accepted", decision
        assert decision["delta_dice"]["mean"] > 0.05 and decision["delta_hd95_mm"]["mean"] <= 0
        low, high = decision["delta_dice"]["ci95"]
        assert 0 < low <= decision["delta_dice"]["mean"] <= high
        assert decision["worse_fraction"] <= 0.2 and len(decision["cases"]) == 4
    # one embedding per slice holding a structure, shared by every structure, prompt and setting
    assert backend.embedded == sum(int(np.any(c.unet.array[0] > 0, axis=(0, 1)).sum()) for c in CASES[:4])
    refinement = {"structures": decisions, "max_change_fraction": 0.5, "sam": {"sha256": "x"}}
    refiner = SamRefiner(refinement, BrightObjectBackend(), labels=LABELS)
    held_out = CASES[4]
    refined, status = refiner(held_out.image, held_out.unet)
    assert status == {"left": "applied", "right": "applied"}
    assert refined.same_geometry(held_out.unet) and refined.array.dtype == held_out.unet.array.dtype
    for structure in LABELS.structures():
        kwargs = {"case_id": "held_out", "nsd_tolerance_mm": 1.0}
        unet_score = score_structure(held_out.reference, held_out.unet.array[0], structure, **kwargs)
        refined_score = score_structure(held_out.reference, refined.array[0], structure, **kwargs)
        assert refined_score.dice > unet_score.dice + 0.05


def test_shifted_backend_is_rejected_and_the_output_is_bit_identical():
    decisions = fit_cases(
        CASES[:4], labels=LABELS, backend=BrightObjectBackend(shift_px=3), grid=GRID, criteria=CRITERIA
    )
    for name in ("left", "right"):
        assert decisions[name]["decision"] == "rejected"
        assert "mean Dice did not rise" in decisions[name]["reason"]
    refiner = SamRefiner({"structures": decisions}, BrightObjectBackend(shift_px=3), labels=LABELS)
    case = CASES[4]
    refined, status = refiner(case.image, case.unet)
    assert refined is case.unet and np.array_equal(refined.array, case.unet.array)
    assert all(s.startswith("skipped: rejected by the gate (no setting passed") for s in status.values())


def test_random_weight_tiny_sam_is_rejected():
    from medseg.refine.train_sam import new_tiny_sam

    backend = new_tiny_sam(seed=0)
    decisions = fit_cases(CASES[:3], labels=LABELS, backend=backend, grid=GRID[:2], criteria=CRITERIA)
    assert all(d["decision"] == "rejected" for d in decisions.values()), decisions
    # without the change limit SAM's raw answers reach the gate, which must see them make cases worse
    unlimited = fit_cases(
        CASES[:3], labels=LABELS, backend=backend, grid=GRID[:2], criteria=CRITERIA, max_change_fraction=10.0
    )
    for decision in unlimited.values():
        assert decision["decision"] == "rejected" and decision["best"]["delta_dice"]["mean"] < 0
        assert "cases got worse" in decision["reason"]


def test_sam_failure_and_change_limit_fall_back_bit_identically():
    case = CASES[0]
    plan = {"left": RefineSetting(margin_mm=0.0), "right": RefineSetting(margin_mm=0.0)}
    out, status = refine_case(case.image, case.unet, labels=LABELS, plan=plan, backend=FailingBackend())
    assert out is case.unet and all(s.startswith("skipped: SAM failed (RuntimeError") for s in status.values())
    out, status = refine_case(
        case.image, case.unet, labels=LABELS, plan=plan, backend=BrightObjectBackend(), max_change_fraction=0.01
    )
    assert out is case.unet and all("limit 1%" in s for s in status.values())


def test_refinement_file_is_bound_to_the_weights(tmp_path):
    sam = tmp_path / "sam"
    sam.mkdir()
    (sam / "config.json").write_text("{}")
    (sam / "model.safetensors").write_bytes(b"weights")
    identity = sam_fingerprint(sam)
    content = {
        "format": "medseg-refinement",
        "checkpoints": [{"path": "run/checkpoint_last.pt", "sha256": "a" * 64}],
        "sam": identity,
        "structures": {},
    }
    (tmp_path / "refinement.json").write_text(json.dumps(content))
    assert load_refinement(tmp_path, checkpoints=[("x", "a" * 64)], sam_sha256=identity["sha256"])["sam"] == identity
    with pytest.raises(CheckpointError, match="fitted for U-Net checkpoint"):
        load_refinement(tmp_path, checkpoints=[("x", "b" * 64)], sam_sha256=identity["sha256"])
    (sam / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(CheckpointError, match="fitted for SAM"):
        load_refinement(tmp_path, checkpoints=[("x", "a" * 64)], sam_sha256=sam_fingerprint(sam)["sha256"])
    with pytest.raises(MedsegUserError, match="no refinement fitted"):
        load_refinement(tmp_path / "elsewhere", checkpoints=[], sam_sha256="")


def test_refine_fit_and_predict_with_sam_from_the_command_line(tmp_path, capsys):
    """refine fit writes refinement.json bound to both hashes; predict --sam applies it, records each
    structure's status, keeps rejected structures bit-identical, and refuses other SAM weights."""
    from test_inference import write_checkpoint

    from medseg.cli import main
    from medseg.io import read_volume, write_volume
    from medseg.refine.train_sam import new_tiny_sam

    data = tmp_path / "data"
    training = []
    for case in CASES:
        for kind, volume in (("images", case.image), ("labels", case.reference)):
            write_volume(volume, data / kind / f"{case.case_id}.nii.gz")
        training.append({"image": f"images/{case.case_id}.nii.gz", "label": f"labels/{case.case_id}.nii.gz"})
    manifest = data / "dataset.json"
    labels = {"0": "background", "1": "a", "2": "b"}
    manifest.write_text(json.dumps({"name": "two", "labels": labels, "modality": {"0": "MRI"}, "training": training}))
    run = tmp_path / "run"
    write_checkpoint(run, labels=labels)
    (run / "resolved_config.json").write_text(json.dumps({"fold": 0, "manifest": {"things": []}}))
    sam = tmp_path / "sam"
    new_tiny_sam(seed=1).model.save_pretrained(sam)

    base = ["--model", str(run), "--sam", str(sam)]
    assert (
        main(["refine", "fit", *base, "--manifest", str(manifest), "--fold", "0", "--device", "cpu", "--no-tta"]) == 0
    )
    out = capsys.readouterr().out
    content = json.loads((run / "refinement.json").read_text())
    assert content["sam"]["sha256"] == sam_fingerprint(sam)["sha256"] and len(content["checkpoints"]) == 1
    assert set(content["structures"]) == {"a", "b"} and "wrote" in out
    for name, decision in content["structures"].items():
        assert f"{name}: {decision['decision']}" in out
        if decision["decision"] == "accepted":  # then the criteria hold on the recorded numbers
            assert decision["delta_dice"]["mean"] > 0 and decision["worse_fraction"] <= 0.2
        else:
            assert decision["reason"]

    predict = ["predict", "--model", str(run), "--input", str(data / "images"), "--device", "cpu", "--no-tta"]
    assert main([*predict, "--output", str(tmp_path / "plain")]) == 0
    assert main([*predict, "--output", str(tmp_path / "refined"), "--sam", str(sam)]) == 0
    record = json.loads((tmp_path / "refined" / "medseg_predict.json").read_text())
    for case in CASES:
        status = record["cases"][case.case_id]["refinement"]
        assert set(status) == {"a", "b"} and all(s == "applied" or s.startswith("skipped: ") for s in status.values())
        plain = read_volume(tmp_path / "plain" / f"{case.case_id}.nii.gz", kind="label").array[0]
        refined = read_volume(tmp_path / "refined" / f"{case.case_id}.nii.gz", kind="label").array[0]
        if all(s.startswith("skipped") for s in status.values()):  # the U-Net's output, bit-identical
            assert np.array_equal(plain, refined) and plain.dtype == refined.dtype
        for name, decision in content["structures"].items():
            if decision["decision"] == "rejected":
                assert status[name].startswith("skipped: rejected by the gate")
    capsys.readouterr()

    (sam / "config.json").write_text((sam / "config.json").read_text() + "\n")  # other SAM file, other hash
    assert main([*predict, "--output", str(tmp_path / "again"), "--sam", str(sam)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medseg: error:") and "fitted for SAM" in err and len(err.splitlines()) == 1
