"""Volume geometry properties, comparison and repr."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import oblique_affine

from medseg.core.orientation import orientation_code
from medseg.core.volume import Volume


def test_properties_of_an_anisotropic_volume() -> None:
    affine = np.diag([-0.8, -0.8, 1.5, 1.0])
    affine[:3, 3] = [100.0, 50.0, -20.0]
    volume = Volume(np.zeros((2, 4, 5, 6), np.float32), affine)
    assert volume.num_channels == 2
    assert volume.spatial_shape == (4, 5, 6)
    assert volume.spacing_mm == pytest.approx((0.8, 0.8, 1.5))
    assert volume.origin == (100.0, 50.0, -20.0)
    assert volume.orientation == "LPS"
    assert volume.voxel_volume_ml == pytest.approx(0.8 * 0.8 * 1.5 / 1000)
    np.testing.assert_allclose(volume.direction, np.diag([-1.0, -1.0, 1.0]))
    text = repr(volume)
    assert "shape=(4, 5, 6)" in text and "spacing_mm=0.8x0.8x1.5" in text and "LPS" in text


def test_oblique_spacing_is_column_norm() -> None:
    volume = Volume(np.zeros((1, 3, 3, 3), np.float32), oblique_affine(spacing_mm=(0.7, 1.1, 3.0)))
    assert volume.spacing_mm == pytest.approx((0.7, 1.1, 3.0), abs=1e-6)


def test_2d_volume() -> None:
    volume = Volume(np.zeros((3, 10, 6), np.uint8), np.eye(4))
    assert volume.spatial_ndim == 2 and volume.spacing_mm == (1.0, 1.0) and volume.orientation == "RA"


def test_same_geometry_names_the_field() -> None:
    a = Volume(np.zeros((1, 4, 4, 4), np.float32), np.eye(4))
    shifted = np.eye(4)
    shifted[0, 3] = 0.01
    b = Volume(np.zeros((1, 4, 4, 4), np.float32), shifted)
    assert a.same_geometry(a.with_array(np.ones((4, 4, 4))))
    assert not a.same_geometry(b)
    assert a.same_geometry(b, tolerance_mm=0.1)
    assert "origin" in a.geometry_differences(b)[0]
    c = Volume(np.zeros((1, 4, 4, 5), np.float32), np.eye(4))
    assert "shape" in a.geometry_differences(c)[0]
    flipped = Volume(np.zeros((1, 4, 4, 4), np.float32), np.diag([-1.0, 1, 1, 1]))
    assert "direction" in a.geometry_differences(flipped)[0]


def test_with_array_keeps_affine_and_validates() -> None:
    a = Volume(np.zeros((1, 4, 4, 4), np.float32), oblique_affine())
    label = a.with_array(np.ones((4, 4, 4), np.uint8), kind="label")
    assert label.kind == "label" and label.num_channels == 1
    np.testing.assert_array_equal(label.affine, a.affine)
    with pytest.raises(ValueError, match="spatial shape"):
        a.with_array(np.zeros((4, 4, 5)))


def test_invalid_volumes_raise() -> None:
    with pytest.raises(ValueError, match="integers"):
        Volume(np.zeros((1, 2, 2, 2), np.float32), np.eye(4), kind="label")
    with pytest.raises(ValueError, match="singular"):
        Volume(np.zeros((1, 2, 2, 2)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="shape"):
        Volume(np.zeros((2, 2)), np.eye(4))
    with pytest.raises(ValueError, match="kind"):
        Volume(np.zeros((1, 2, 2, 2)), np.eye(4), kind="mask")  # type: ignore[arg-type]


def test_orientation_code_matches_nibabel() -> None:
    import nibabel as nib

    for affine in (oblique_affine(), np.diag([-1.0, 1.0, -2.0, 1.0]), oblique_affine(angles=(1.2, 0.1, -2.0))):
        assert orientation_code(affine) == "".join(nib.aff2axcodes(affine))
