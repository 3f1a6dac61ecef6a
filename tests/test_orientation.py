"""Orientation codes and RAS axis order of oblique affines near 45 degrees, against nibabel and MONAI.

Near 45 degrees two world axes are almost equally close to a voxel axis. nibabel (and MONAI's
``Orientation``, which uses nibabel's ``io_orientation``) decides the voxel-to-world assignment for
all axes together; an axis-by-axis greedy choice (medseg's old ``orientation_code`` and
``_ras_permutation`` loops) picks a different assignment for the two-axis rotations below, and then
puts a target spacing on the wrong axis.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import rotation_matrix
from nibabel.orientations import io_orientation

from medseg.core.orientation import orientation_code, ras_axis_order

SPACING_MM = (0.7, 0.9, 3.0)
SHAPE = (5, 6, 7)  # a distinct length per voxel axis, so a permuted shape shows the permutation

# (rotation about x, about y, about z) in degrees. The two-axis rotations are ones where a
# column-by-column greedy assignment disagrees with nibabel (found by trying every pair of axes
# with angles of +-44 and +-46 degrees); the z-only rotations agree with it and are kept as checks.
ANGLES_DEG = {
    "z44": (0.0, 0.0, 44.0),
    "z46": (0.0, 0.0, 46.0),
    "z-46": (0.0, 0.0, -46.0),
    "x44_z44": (44.0, 0.0, 44.0),  # greedy: RSP, nibabel: RAS
    "x44_z46": (44.0, 0.0, 46.0),  # greedy: ASR, nibabel: ALS
    "x46_y44": (46.0, 44.0, 0.0),  # greedy: RAS, nibabel: RSP
    "y44_z-46": (0.0, 44.0, -46.0),  # greedy: IRP, nibabel: PRS
    "x-46_y46": (-46.0, 46.0, 0.0),  # greedy: IAR, nibabel: ILA
}


def _affine(angles_deg: tuple[float, float, float]) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = rotation_matrix(tuple(np.deg2rad(angles_deg))) @ np.diag(SPACING_MM)
    affine[:3, 3] = (-10.0, 20.0, 5.0)
    return affine


def _nibabel_order(affine: np.ndarray) -> list[int]:
    """For each world axis R, A, S: the voxel axis nibabel's io_orientation maps onto it."""
    order = [0, 0, 0]
    for voxel_axis, (world_axis, _) in enumerate(io_orientation(affine)):
        order[int(world_axis)] = voxel_axis
    return order


@pytest.mark.parametrize("name", list(ANGLES_DEG))
def test_orientation_code_matches_nibabel_near_45_degrees(name: str) -> None:
    affine = _affine(ANGLES_DEG[name])
    assert orientation_code(affine) == "".join(nib.aff2axcodes(affine))


@pytest.mark.parametrize("name", list(ANGLES_DEG))
def test_ras_axis_order_matches_nibabel_near_45_degrees(name: str) -> None:
    affine = _affine(ANGLES_DEG[name])
    assert ras_axis_order(affine) == _nibabel_order(affine)


@pytest.mark.parametrize("name", list(ANGLES_DEG))
def test_ras_axis_order_is_the_shape_monai_orientation_produces(name: str) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("monai")
    from monai.data import MetaTensor
    from monai.transforms import Orientation

    affine = _affine(ANGLES_DEG[name])
    image = MetaTensor(torch.zeros((1, *SHAPE)), affine=torch.as_tensor(affine))
    # as medseg.model.transforms calls it
    reoriented = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(image)
    assert list(reoriented.shape[1:]) == [SHAPE[a] for a in ras_axis_order(affine)]
    # and the reoriented affine's spacing is the spacing taken in that order
    spacing = np.linalg.norm(np.asarray(reoriented.affine)[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, [SPACING_MM[a] for a in ras_axis_order(affine)], atol=1e-6)


def test_fingerprint_spacing_and_shape_follow_ras_axis_order(tmp_path: Path) -> None:
    """The planner's spacing and shape of an oblique case are in the order MONAI reorients to."""
    from medseg.core.volume import Volume
    from medseg.data.manifest import load_manifest
    from medseg.io import write_volume
    from medseg.planning import fingerprint_dataset

    affine = _affine(ANGLES_DEG["x44_z44"])
    rng = np.random.default_rng(0)
    image = Volume((rng.random((1, *SHAPE)) + 1.0).astype(np.float32), affine)  # no zero voxel: no crop
    label = np.zeros((1, *SHAPE), np.uint8)
    label[0, 1:3, 1:4, 2:5] = 1
    write_volume(image, tmp_path / "imagesTr" / "case_000.nii.gz")
    write_volume(image.with_array(label, kind="label"), tmp_path / "labelsTr" / "case_000.nii.gz")
    manifest = {
        "name": "oblique",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "object"},
        "training": [{"image": "./imagesTr/case_000.nii.gz", "label": "./labelsTr/case_000.nii.gz"}],
        "test": [],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(manifest))
    fingerprint = fingerprint_dataset(load_manifest(tmp_path / "dataset.json"), workers=1)
    order = _nibabel_order(affine)
    np.testing.assert_allclose(fingerprint["spacings_mm"][0], [SPACING_MM[a] for a in order], atol=1e-5)
    assert fingerprint["shapes"][0] == [SHAPE[a] for a in order]
