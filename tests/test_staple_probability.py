"""Binary STAPLE of one structure: posterior probabilities, rater performance, geometry kept."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import oblique_affine

from medseg.core.volume import Volume
from medseg.errors import GeometryMismatchError
from medseg.evaluation.raters import staple, staple_probability


def _rater(mask: np.ndarray, affine: np.ndarray, value: int = 2) -> Volume:
    return Volume((mask * value).astype(np.uint8)[None], affine, kind="label")


def test_identical_raters_give_a_certain_consensus_on_their_grid() -> None:
    affine = oblique_affine()
    truth = np.zeros((12, 10, 8), bool)
    truth[3:8, 2:7, 2:6] = True
    estimate = staple_probability([_rater(truth, affine), _rater(truth, affine)], label_id=2)
    assert estimate.probability.spatial_shape == truth.shape
    assert np.allclose(estimate.probability.affine, affine)
    assert np.allclose(estimate.probability.channel(0)[truth], 1.0)
    assert np.allclose(estimate.probability.channel(0)[~truth], 0.0)
    assert estimate.sensitivity == pytest.approx((1.0, 1.0)) and estimate.specificity == pytest.approx((1.0, 1.0))
    consensus = estimate.consensus()
    assert consensus.kind == "label" and np.array_equal(consensus.channel(0) == 1, truth)


def test_a_careless_rater_is_estimated_worse_and_outvoted() -> None:
    rng = np.random.default_rng(0)
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    truth = np.zeros((30, 30, 10), bool)
    truth[5:25, 8:20, 2:8] = True
    careful = [truth.copy(), truth.copy()]
    careful[0][5, 8:20, 2:8] = False  # one slice row less
    careful[1][24, 8:20, 2:8] = False
    careless = truth ^ (rng.random(truth.shape) < 0.15)  # 15 % of voxels flipped
    raters = [_rater(careful[0], affine), _rater(careful[1], affine), _rater(careless, affine)]
    estimate = staple_probability(raters, label_id=2)
    assert estimate.sensitivity[2] < min(estimate.sensitivity[:2])
    assert estimate.specificity[2] < min(estimate.specificity[:2])
    probability = estimate.probability.channel(0)
    assert probability.min() >= 0.0 and probability.max() <= 1.0
    consensus = estimate.consensus().channel(0) == 1
    assert (consensus != truth).mean() < 0.01  # the two careful raters win where the careless one errs
    assert estimate.iterations >= 1


def test_two_similar_raters_disagreeing_voxels_fall_below_one_half() -> None:
    """What the module docstring says: two similar raters' STAPLE keeps only what both marked."""
    affine = np.eye(4)
    a = np.zeros((40, 40), bool)
    a[10:30, 10:30] = True
    b = a.copy()
    a[10:30, 30] = True  # each rater adds one column the other does not
    b[9, 10:30] = True
    raters = [_rater(a[..., None], affine, 1), _rater(b[..., None], affine, 1)]
    estimate = staple_probability(raters, label_id=1)
    disputed = estimate.probability.channel(0)[(a != b)[..., None]]
    assert disputed.size == 40 and (disputed < 0.5).all() and (disputed > 0.3).all()
    multi = staple(raters).channel(0) > 0
    assert np.array_equal(estimate.consensus().channel(0) == 1, multi)
    assert np.array_equal(multi, (a & b)[..., None])


def test_raters_on_different_grids_are_refused() -> None:
    mask = np.ones((4, 4, 4), bool)
    with pytest.raises(GeometryMismatchError, match="geometry differs"):
        staple_probability([_rater(mask, np.eye(4)), _rater(mask, np.diag([2.0, 1, 1, 1]))], label_id=2)
