"""Surface metrics: boundaries, HD / HD95 / ASSD / NSD by hand, border handling, cropping, and MONAI agreement."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from medseg.metrics import surface_search as surface_module
from medseg.metrics.surface import (
    SURFACE_KEYS,
    mask_boundary,
    surface_distances,
    surface_element_areas,
    surface_metrics,
    surface_metrics_multi,
)


def _blob(shape: tuple[int, ...], rng: np.random.Generator, fraction: float = 0.35, sigma: float = 2.0) -> np.ndarray:
    smooth = ndimage.gaussian_filter(rng.random(shape), sigma)
    return smooth > np.quantile(smooth, 1.0 - fraction)


def _box(shape: tuple[int, ...], lo: tuple[int, ...], hi: tuple[int, ...]) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


# --------------------------------------------------------------------------- boundary
def test_boundary_face_connectivity_and_image_border():
    square = _box((5, 5), (1, 1), (4, 4))
    assert mask_boundary(square).sum() == 8  # the centre pixel has all 4 face neighbours inside
    full = np.ones((4, 5), bool)
    expected = np.ones((4, 5), bool)
    expected[1:-1, 1:-1] = False  # outside the image counts as background
    np.testing.assert_array_equal(mask_boundary(full), expected)
    cube = _box((6, 6, 6), (1, 1, 1), (5, 5, 5))
    assert mask_boundary(cube).sum() == 4**3 - 2**3
    plus = np.zeros((5, 5), bool)  # a diagonal-only background neighbour does not make a boundary pixel
    plus[1:4, 1:4] = True
    plus[1, 1] = False
    assert not mask_boundary(plus)[2, 2]
    one = np.zeros((3, 3, 3), bool)
    one[1, 1, 1] = True
    np.testing.assert_array_equal(mask_boundary(one), one)


def test_boundary_matches_scipy_erosion_definition():
    rng = np.random.default_rng(0)
    for shape in [(30, 31), (12, 13, 14)]:
        mask = _blob(shape, rng)
        expected = mask & ~ndimage.binary_erosion(mask, border_value=0)
        np.testing.assert_array_equal(mask_boundary(mask), expected)


# --------------------------------------------------------------------------- distances by hand
@pytest.mark.parametrize("axis, k", [(0, 1), (1, 2), (2, 3)])
def test_shift_by_k_voxels_gives_k_times_spacing(axis, k):
    spacing = (0.8, 0.6, 1.5)
    ref = _box((20, 20, 20), (5, 5, 5), (12, 12, 12))
    pred = np.roll(ref, k, axis=axis)
    out = surface_metrics(ref, pred, spacing_mm=spacing)
    assert out["hd_mm"] == pytest.approx(k * spacing[axis], abs=1e-12)
    d_rp, d_pr = surface_distances(ref, pred, spacing_mm=spacing)
    assert d_rp.max() == pytest.approx(k * spacing[axis])
    assert len(d_rp) == mask_boundary(ref).sum() and len(d_pr) == mask_boundary(pred).sum()


def test_2d_square_shift_hand_computed_hd_hd95_assd():
    # 3x3 square shifted by one row, spacing (2, 1): each boundary has 8 pixels with distances
    # {2, 2, 2} (far row), {1} (centre of the other square), {0, 0, 0, 0} (shared ring pixels).
    ref = _box((8, 8), (2, 2), (5, 5))
    pred = np.roll(ref, 1, axis=0)
    d_rp, d_pr = surface_distances(ref, pred, spacing_mm=(2.0, 1.0))
    assert sorted(d_rp) == [0, 0, 0, 0, 1, 2, 2, 2]
    assert sorted(d_pr) == [0, 0, 0, 0, 1, 2, 2, 2]
    out = surface_metrics(ref, pred, spacing_mm=(2.0, 1.0))
    assert out["hd_mm"] == 2.0
    assert out["hd95_mm"] == pytest.approx(2.0)  # linear percentile: position 6.65 of [.., 2, 2]
    assert out["assd_mm"] == pytest.approx(14 / 16)  # mean of the 16 concatenated distances


def test_hd95_uses_linear_percentile_and_max_of_directions():
    ref = _box((30, 30), (5, 5), (15, 15))
    pred = ref.copy()
    pred[20, 20] = True  # an outlier island; the nearest reference boundary pixel is the corner (14, 14)
    d_rp, d_pr = surface_distances(ref, pred, spacing_mm=(1.0, 1.0))
    assert d_rp.max() == 0.0
    assert d_pr.max() == pytest.approx(math.hypot(6, 6))
    out = surface_metrics(ref, pred, spacing_mm=(1.0, 1.0))
    assert out["hd_mm"] == pytest.approx(math.hypot(6, 6))
    assert out["hd95_mm"] == pytest.approx(max(np.percentile(d_rp, 95), np.percentile(d_pr, 95)))
    assert out["assd_mm"] == pytest.approx(math.hypot(6, 6) / (len(d_rp) + len(d_pr)))


def test_single_voxels_deepmind_worked_example():
    # DeepMind surface-distance README: one voxel each, 2 voxels apart along the 1 mm axis, spacing (3, 2, 1).
    ref = np.zeros((128, 128, 128), np.uint8)
    pred = np.zeros((128, 128, 128), np.uint8)
    ref[50, 60, 70] = 1
    pred[50, 60, 72] = 1
    out = surface_metrics(ref, pred, spacing_mm=(3.0, 2.0, 1.0), nsd_tolerance_mm=1.0)
    assert out["hd_mm"] == 2.0 and out["hd95_mm"] == 2.0 and out["assd_mm"] == 2.0
    # surfels sit on the voxel corners: half of each voxel's corners are 1 mm away, half 2 mm
    assert out["nsd"] == pytest.approx(0.5)
    assert surface_metrics(ref, pred, spacing_mm=(3.0, 2.0, 1.0), nsd_tolerance_mm=2.0)["nsd"] == pytest.approx(1.0)
    assert surface_metrics(ref, pred, spacing_mm=(3.0, 2.0, 1.0), nsd_tolerance_mm=0.99)["nsd"] == 0.0


def test_deepmind_worked_examples_surface_dice():
    # the cases of DeepMind's surface_distance_test.py (their HD / ASD use surfels, so only NSD and Dice compare)
    gt = np.zeros((128, 128), bool)
    pred = np.zeros((128, 128), bool)
    gt[50, 70] = True
    pred[50, 72] = True
    assert surface_metrics(gt, pred, spacing_mm=(2, 1))["nsd"] == pytest.approx(0.5)

    gt = np.zeros((6, 6), bool)
    gt[1:3, 1:3] = True
    pred = np.zeros((6, 6), bool)
    pred[1:4, 1:3] = True
    vertical, horizontal = 2.0, 1.0
    diag = 0.5 * math.hypot(vertical, horizontal)
    total_gt = 4 * diag + 2 * horizontal + 2 * vertical
    total_pred = 4 * diag + 2 * horizontal + 4 * vertical
    # every gt element is within 1 mm of pred; pred's bottom corner-edge-corner (2 diag + horizontal) is 2 mm away
    expected = (total_gt + total_pred - 2 * diag - horizontal) / (total_gt + total_pred)
    assert surface_metrics(gt, pred, spacing_mm=(vertical, horizontal))["nsd"] == pytest.approx(expected)

    gt = np.zeros((100, 100, 100), bool)
    pred = np.zeros((100, 100, 100), bool)
    gt[0:50] = True  # touches five image borders: the surface is closed there
    pred[0:51] = True
    assert surface_metrics(gt, pred, spacing_mm=(2, 1, 1))["nsd"] == pytest.approx(0.836, abs=5e-4)


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (2.0, 1.0)])
def test_2d_nsd_hand_computed_contour_lengths(spacing):
    # 2x2 squares, the prediction 2 rows lower. Each contour: 4 corner cells (diagonal length d) and 4 edge
    # cells (2 horizontal, length spacing[1]; 2 vertical, length spacing[0]). Cell rows of one contour are 0, 1
    # and 2 cell-rows from the other contour: row 0 (d, s1, d) is shared, row 1 holds the two vertical edges.
    s0, s1 = spacing
    d = 0.5 * math.hypot(s0, s1)
    ref = _box((10, 8), (2, 3), (4, 5))
    pred = np.roll(ref, 2, axis=0)
    total = 4 * d + 2 * s1 + 2 * s0
    shared = 2 * d + s1
    for tol, expected in [(0.0, shared / total), (s0, (shared + 2 * s0) / total), (2 * s0, 1.0)]:
        out = surface_metrics(ref, pred, spacing_mm=spacing, nsd_tolerance_mm=tol)
        assert out["nsd"] == pytest.approx(expected), tol
    lengths = surface_element_areas(spacing)
    assert lengths[0b0011] == s1 and lengths[0b0101] == s0 and lengths[0b0110] == pytest.approx(2 * d)


def test_identical_masks_and_cube_surface_area():
    cube = _box((9, 9, 9), (2, 2, 2), (6, 6, 6))
    out = surface_metrics(cube, cube, spacing_mm=(0.5, 1.0, 2.0))
    assert out == {"hd_mm": 0.0, "hd95_mm": 0.0, "assd_mm": 0.0, "nsd": 1.0}
    areas = surface_element_areas((1.0, 1.0, 1.0))
    assert areas[0] == 0.0 and areas[255] == 0.0
    assert areas[0b11110000] == pytest.approx(1.0)  # a flat unit face cell
    assert areas[0b10000000] == pytest.approx(math.sqrt(3) / 8)  # one corner cut off


# --------------------------------------------------------------------------- border, crop, empties
def test_masks_touching_the_image_border_match_unpadded_definition():
    ref = np.zeros((6, 10), bool)
    ref[:, :3] = True  # touches three image borders
    pred = np.zeros((6, 10), bool)
    pred[:, :4] = True
    out = surface_metrics(ref, pred, spacing_mm=(1.0, 1.0))
    # ref's boundary: column 0 (image border), column 2, rows 0 and 5; the border column is 0 from pred's border
    # column, column 2 is 1 from pred's column 3; max is 1
    assert out["hd_mm"] == 1.0
    padded = surface_metrics(np.pad(ref, 3), np.pad(pred, 3), spacing_mm=(1.0, 1.0))
    assert padded == pytest.approx(out)  # outside the image is background, so padding changes nothing


def test_translation_and_padding_invariance_3d():
    rng = np.random.default_rng(1)
    ref = _blob((14, 15, 16), rng)
    pred = _blob((14, 15, 16), rng)
    base = surface_metrics(ref, pred, spacing_mm=(0.7, 1.1, 2.5), nsd_tolerance_mm=1.5)
    shifted = surface_metrics(
        np.pad(ref, ((5, 0), (0, 7), (2, 3))),
        np.pad(pred, ((5, 0), (0, 7), (2, 3))),
        spacing_mm=(0.7, 1.1, 2.5),
        nsd_tolerance_mm=1.5,
    )
    assert shifted == pytest.approx(base, abs=1e-12)


@pytest.mark.parametrize("ndim", [2, 3])
def test_empty_masks_give_nan(ndim):
    shape = (6,) * ndim
    one = np.zeros(shape, bool)
    one[(2,) * ndim] = True
    empty = np.zeros(shape, bool)
    for a, b in [(one, empty), (empty, one), (empty, empty)]:
        out = surface_metrics(a, b, spacing_mm=(1.0,) * ndim)
        assert set(out) == set(SURFACE_KEYS)
        assert all(math.isnan(v) for v in out.values())
    d_rp, d_pr = surface_distances(one, empty, spacing_mm=(1.0,) * ndim)
    assert d_rp.size == 0 and d_pr.size == 0


def test_far_apart_structures_use_the_tree_fallback():
    ref = _box((60, 60, 10), (2, 2, 2), (6, 6, 6))
    pred = _box((60, 60, 10), (50, 40, 3), (55, 45, 7))
    out = surface_metrics(ref, pred, spacing_mm=(1.0, 1.0, 1.0))
    # nearest boundary points: ref corner (5, 5, z) and pred corner (50, 40, z): 45 and 35 apart in x, y
    assert min(surface_distances(ref, pred, spacing_mm=(1, 1, 1))[0]) == pytest.approx(math.hypot(45, 35))
    assert out["nsd"] == 0.0


@pytest.mark.parametrize("setting", ["_MAX_SHELL_OFFSETS", "_MAX_FRAME_VOXELS", "_MAX_DISTANCE_OFFSETS"])
def test_tree_paths_equal_shell_paths(monkeypatch, setting):
    # with the limit at 0 the k-d tree does the work the offset shells normally do: same exact results
    rng = np.random.default_rng(2)
    ref, pred = _blob((20, 18, 16), rng), _blob((20, 18, 16), rng)
    pred[:3, :3, :3] = True  # a small island far from most of ref
    for tol in (0.0, 1.0, 2.2, 3.0):
        shell = surface_metrics(ref, pred, spacing_mm=(0.8, 0.8, 1.5), nsd_tolerance_mm=tol)
        monkeypatch.setattr(surface_module, setting, 0)
        tree = surface_metrics(ref, pred, spacing_mm=(0.8, 0.8, 1.5), nsd_tolerance_mm=tol)
        monkeypatch.undo()
        assert tree == pytest.approx(shell, abs=1e-12), tol


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"spacing_mm": (1.0, 1.0)}, "spacing_mm"),
        ({"spacing_mm": (1.0, 0.0, 1.0)}, "spacing_mm"),
        ({"spacing_mm": (1.0, 1.0, 1.0), "nsd_tolerance_mm": -1.0}, "nsd_tolerance_mm"),
        ({"spacing_mm": (1.0, 1.0, 1.0), "nsd_tolerance_mm": math.inf}, "nsd_tolerance_mm"),
    ],
)
def test_surface_metrics_validation(kwargs, message):
    mask = _box((5, 5, 5), (1, 1, 1), (3, 3, 3))
    with pytest.raises(ValueError, match=message):
        surface_metrics(mask, mask, **kwargs)


def test_surface_metrics_rejects_non_binary_and_shape_mismatch():
    with pytest.raises(ValueError, match="binary"):
        surface_metrics(np.full((4, 4), 3), np.zeros((4, 4)), spacing_mm=(1, 1))
    with pytest.raises(ValueError, match="shape"):
        surface_metrics(np.zeros((4, 4)), np.zeros((4, 5)), spacing_mm=(1, 1))
    with pytest.raises(ValueError, match="2D or 3D"):
        surface_metrics(np.zeros(4), np.zeros(4), spacing_mm=(1,))


# --------------------------------------------------------------------------- multi-structure
def test_multi_equals_single_structure_calls():
    rng = np.random.default_rng(3)
    ref = np.zeros((30, 28, 20), np.uint16)
    pred = np.zeros_like(ref)
    boxes = [((2, 2, 2), (10, 12, 9)), ((15, 3, 4), (27, 13, 15)), ((4, 16, 5), (13, 26, 18))]
    for lab, (lo, hi) in enumerate(boxes, 1):
        region = tuple(slice(a, b) for a, b in zip(lo, hi))
        ref[region][_blob(tuple(b - a for a, b in zip(lo, hi)), rng, 0.5, 1.5)] = lab
        pred[region][_blob(tuple(b - a for a, b in zip(lo, hi)), rng, 0.5, 1.5)] = lab
    pred[pred == 3] = 0  # missing structure
    pred[25:28, 20:24, 15:18] = 7  # label absent from the reference
    tolerances = {1: 1.0, 2: 2.0, 3: 1.0, 7: 0.5, 9: 1.0}
    out = surface_metrics_multi(
        ref, pred, labels=[1, 2, 3, 7, 9], spacing_mm=(0.9, 1.1, 2.0), nsd_tolerance_mm=tolerances
    )
    for lab in (1, 2):
        single = surface_metrics(ref == lab, pred == lab, spacing_mm=(0.9, 1.1, 2.0), nsd_tolerance_mm=tolerances[lab])
        assert out[lab] == pytest.approx(single, abs=1e-12)
    for lab in (3, 7, 9):
        assert all(math.isnan(v) for v in out[lab].values())
    fortran = surface_metrics_multi(
        np.asfortranarray(ref),
        np.asfortranarray(pred).astype(np.int32),
        labels=[1, 2, 3, 7, 9],
        spacing_mm=(0.9, 1.1, 2.0),
        nsd_tolerance_mm=tolerances,
    )
    for lab in out:
        assert fortran[lab] == pytest.approx(out[lab], nan_ok=True)


@pytest.mark.parametrize("high", [5, 40, 63, 64, 200])
def test_label_blocks_match_brute_force(high):
    rng = np.random.default_rng(high)
    labels = rng.integers(-3, high + 1, size=(21, 17, 11)).astype(np.int16)
    labels[rng.random(labels.shape) < 0.9] = 0
    wanted = [1, 2, high, high + 1]
    blocks = surface_module._label_blocks(labels, wanted)
    b = surface_module._BLOCK
    for lab in wanted:
        expected = np.zeros(tuple(-(-n // b) for n in labels.shape), bool)
        for idx in np.argwhere(labels == lab):
            expected[tuple(idx // b)] = True
        if expected.any():
            np.testing.assert_array_equal(blocks[lab], expected)
        else:
            assert blocks[lab] is None


def test_separate_parts_in_one_bounding_box_match_monai():
    # an L-shaped structure whose block box contains a separate island: each part is cropped on its own
    ref = np.zeros((64, 64, 10), bool)
    ref[:, :4, 2:8] = True
    ref[:4, :, 2:8] = True
    ref[40:44, 40:45, 3:6] = True
    pred = np.roll(ref, 1, axis=0)
    pred[60:63, 60:63, 0:3] = True  # a far-away false-positive island
    for tolerance in (1.0, 2.0):
        ours = surface_metrics(ref, pred, spacing_mm=(0.9, 0.7, 2.0), nsd_tolerance_mm=tolerance)
        _assert_close_to_monai(ours, _monai_surface(ref, pred, (0.9, 0.7, 2.0), tolerance))


def test_multi_validation():
    ref = np.zeros((5, 5), np.uint8)
    with pytest.raises(ValueError, match="positive"):
        surface_metrics_multi(ref, ref, labels=[0, 1], spacing_mm=(1, 1))
    with pytest.raises(ValueError, match=r"no tolerance for labels \[2\]"):
        surface_metrics_multi(ref, ref, labels=[1, 2], spacing_mm=(1, 1), nsd_tolerance_mm={1: 1.0})
    with pytest.raises(ValueError, match="integer label map"):
        surface_metrics_multi(ref.astype(float), ref, labels=[1], spacing_mm=(1, 1))
    assert surface_metrics_multi(ref, ref, labels=[], spacing_mm=(1, 1)) == {}


# --------------------------------------------------------------------------- MONAI cross-checks
def test_surface_element_tables_equal_monai():
    pytest.importorskip("torch")
    utils = pytest.importorskip("monai.metrics.utils")
    for spacing in [(1.0, 1.0, 1.0), (0.8, 0.6, 1.5), (3.0, 0.5, 2.0)]:
        monai_3d, _ = utils.get_code_to_measure_table(spacing)
        np.testing.assert_allclose(surface_element_areas(spacing), monai_3d.numpy(), rtol=1e-6, atol=1e-7)
        monai_2d, _ = utils.get_code_to_measure_table(spacing[:2])
        np.testing.assert_allclose(surface_element_areas(spacing[:2]), monai_2d.numpy(), rtol=1e-6)
    normals = utils._get_neighbour_code_to_normals_table().numpy()
    ours = surface_module._NORMALS_TABLE
    np.testing.assert_array_equal(ours[:128], normals[:128])
    # codes 128..255 are stored as the mirror of 255 - code: same triangles, components up to sign
    np.testing.assert_array_equal(np.abs(ours[128:]), np.abs(normals[128:]))


def _monai_surface(ref: np.ndarray, pred: np.ndarray, spacing: tuple[float, ...], tolerance: float) -> dict:
    torch = pytest.importorskip("torch")
    metrics = pytest.importorskip("monai.metrics")
    r = torch.from_numpy(ref)[None, None]
    p = torch.from_numpy(pred)[None, None]
    common = {"include_background": True, "spacing": list(spacing)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "hd_mm": metrics.compute_hausdorff_distance(p, r, **common).item(),
            "hd95_mm": metrics.compute_hausdorff_distance(p, r, percentile=95, **common).item(),
            "assd_mm": metrics.compute_average_surface_distance(p, r, symmetric=True, **common).item(),
            "nsd": metrics.compute_surface_dice(p, r, [tolerance], use_subvoxels=True, **common).item(),
        }


def _assert_close_to_monai(ours: dict, theirs: dict) -> None:
    for key in ("hd_mm", "hd95_mm", "assd_mm"):
        assert abs(ours[key] - theirs[key]) < 1e-3, (key, ours, theirs)
    assert abs(ours["nsd"] - theirs["nsd"]) < 1e-3, (ours, theirs)


@pytest.mark.parametrize("ndim", [2, 3])
def test_matches_monai_on_random_blobs(ndim):
    rng = np.random.default_rng(10 + ndim)
    shape = (34, 30, 22)[:ndim] if ndim == 3 else (60, 52)
    for trial in range(6):
        spacing = tuple(float(s) for s in rng.uniform(0.5, 2.0, size=ndim).round(2))
        ref = _blob(shape, rng)
        pred = [
            _blob(shape, rng),
            ndimage.binary_dilation(ref),
            np.roll(ref, 2, axis=0),
            ndimage.binary_erosion(ref) | _blob(shape, rng, 0.05),
            ref & _blob(shape, rng, 0.7),
            np.roll(ref, -1, axis=ndim - 1),
        ][trial]
        tolerance = [1.0, spacing[0], 2.0, 0.5, 3.0 * max(spacing), 0.0][trial]
        ours = surface_metrics(ref, pred, spacing_mm=spacing, nsd_tolerance_mm=tolerance)
        _assert_close_to_monai(ours, _monai_surface(ref, pred, spacing, tolerance))


def test_matches_monai_on_small_and_border_cases():
    cases = []
    one = np.zeros((12, 12, 12), bool)
    one[0, 5, 11] = True  # single voxel on the image border
    two = np.zeros_like(one)
    two[2, 6, 9] = True
    cases.append((one, two, (1.0, 2.0, 0.5)))
    full = np.ones((10, 9, 8), bool)
    part = np.zeros_like(full)
    part[:6, 2:, :] = True
    cases.append((full, part, (0.8, 0.8, 1.5)))
    cases.append((part, full, (0.8, 0.8, 1.5)))
    far_a = _box((40, 40, 12), (1, 1, 1), (5, 6, 4))
    far_b = _box((40, 40, 12), (30, 33, 6), (38, 39, 12))
    cases.append((far_a, far_a | far_b, (1.2, 0.7, 2.0)))
    blob_rng = np.random.default_rng(5)
    thin = _blob((30, 30, 8), blob_rng, 0.3)
    cases.append((thin, np.roll(thin, 1, axis=2) | _blob((30, 30, 8), blob_rng, 0.05), (0.4, 0.5, 4.0)))
    for ref, pred, spacing in cases:
        for tolerance in (1.0, 2.5):
            ours = surface_metrics(ref, pred, spacing_mm=spacing, nsd_tolerance_mm=tolerance)
            _assert_close_to_monai(ours, _monai_surface(ref, pred, spacing, tolerance))


def test_multi_matches_monai_on_label_maps():
    rng = np.random.default_rng(20)
    shape = (40, 36, 24)
    smooth = ndimage.gaussian_filter(rng.random(shape), 2.5)
    ref = np.digitize(smooth, np.quantile(smooth, [0.55, 0.7, 0.85])).astype(np.uint8)
    pred = ref.copy()
    pred[np.roll(ref, 1, axis=1) == 1] = 1
    pred[ndimage.binary_erosion(ref == 2)] = 3
    pred[ref == 3] = np.roll(ref, 2, axis=0)[ref == 3]
    spacing = (0.8, 0.8, 1.5)
    out = surface_metrics_multi(ref, pred, labels=[1, 2, 3], spacing_mm=spacing, nsd_tolerance_mm=1.0)
    for lab in (1, 2, 3):
        _assert_close_to_monai(out[lab], _monai_surface(ref == lab, pred == lab, spacing, 1.0))


def test_docstring_examples_run():
    import doctest

    from medseg.metrics import surface as module

    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
