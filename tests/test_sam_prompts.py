"""Prompt derivation for Segment-Anything (torch-free): from masks, from user points/boxes, in voxels and RAS mm."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import oblique_affine

from medseg.core.labels import LabelSet
from medseg.refine.prompts import (
    PromptError,
    box_to_voxels,
    points_to_voxels,
    prompts_from_mask,
    user_prompts,
    world_to_voxel,
)
from medseg.refine.structures import find_structure, normalise_name
from medseg.refine.windowing import intensity_window, slice_to_rgb, to_uint8


def test_prompt_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import medseg.refine.prompts, medseg.refine.windowing, medseg.refine.structures\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_box_margin_in_mm_is_rounded_up_per_axis_and_clipped() -> None:
    mask = np.zeros((30, 40, 5), bool)
    mask[10:15, 2:9, 2] = True  # rows 10..14, cols 2..8
    jobs = prompts_from_mask(mask, spacing_mm=(0.5, 2.0, 3.0), margin_mm=3.0)
    assert [(j.slice_index, j.object_id) for j in jobs] == [(2, 1)]
    # 3 mm = 6 rows at 0.5 mm, 1.5 -> 2 columns at 2 mm; the column box is clipped at 0
    assert jobs[0].prompt.box_rc == (4, 0, 20, 10)


def test_positive_point_is_the_most_interior_pixel_in_mm() -> None:
    mask = np.zeros((40, 40, 1), bool)
    mask[5:35, 5:10, 0] = True  # a long thin bar ...
    mask[12:25, 20:33, 0] = True  # ... and a 13x13 square (but they are two components)
    jobs = prompts_from_mask(mask, spacing_mm=(1, 1, 1), margin_mm=0)
    assert len(jobs) == 2
    square = next(j for j in jobs if j.prompt.box_rc == (12, 20, 24, 32))
    assert tuple(square.prompt.points_rc[0]) == (18.0, 26.0)  # the square's centre
    assert square.prompt.point_labels.tolist() == [1]
    # L shape: the interior maximum lies in the thick part, never outside the mask
    shape = np.zeros((30, 30, 1), bool)
    shape[2:28, 2:6, 0] = True
    shape[18:28, 2:28, 0] = True
    (job,) = prompts_from_mask(shape, spacing_mm=(1, 1, 1), margin_mm=0)
    r, c = (int(v) for v in job.prompt.points_rc[0])
    assert shape[r, c, 0] and 18 <= r <= 27


def test_negative_points_lie_in_the_box_outside_the_object_and_far_from_it() -> None:
    mask = np.zeros((30, 30, 1), bool)
    mask[10:20, 10:20, 0] = True
    (job,) = prompts_from_mask(mask, spacing_mm=(1, 1, 1), margin_mm=4, negative_points=2)
    labels = job.prompt.point_labels.tolist()
    assert labels == [1, 0, 0]
    r0, c0, r1, c1 = job.prompt.box_rc
    for r, c in job.prompt.points_rc[1:]:
        assert r0 <= r <= r1 and c0 <= c <= c1
        assert not mask[int(r), int(c), 0]
        assert max(10 - r, r - 19, 10 - c, c - 19) == 4  # a box corner region, 4 px from the object
    assert tuple(job.prompt.points_rc[1]) != tuple(job.prompt.points_rc[2])


def test_each_component_and_only_the_slices_it_touches_are_prompted() -> None:
    mask = np.zeros((20, 20, 10), bool)
    mask[2:6, 2:6, 1:4] = True  # component 1 on slices 1..3
    mask[12:16, 12:18, 6] = True  # component 2 on slice 6
    jobs = prompts_from_mask(mask, spacing_mm=(1, 1, 1), margin_mm=1)
    assert [(j.object_id, j.slice_index) for j in jobs] == [(1, 1), (1, 2), (1, 3), (2, 6)]
    assert jobs[-1].prompt.box_rc == (11, 11, 16, 18)
    # slicing across axis 0: rows are j, columns are k
    jobs0 = prompts_from_mask(mask, spacing_mm=(1, 1, 1), axis=0, margin_mm=0)
    assert sorted({j.slice_index for j in jobs0}) == [2, 3, 4, 5, 12, 13, 14, 15]
    assert next(j for j in jobs0 if j.slice_index == 2).prompt.box_rc == (2, 1, 5, 3)
    assert prompts_from_mask(np.zeros((4, 4, 4), bool), spacing_mm=(1, 1, 1)) == []


def test_a_3d_user_box_becomes_one_2d_box_per_slice_of_its_extent() -> None:
    jobs = user_prompts((20, 30, 12), boxes=[((3, 4, 5), (10, 20, 7))], axis=2)
    assert [j.slice_index for j in jobs] == [5, 6, 7]
    assert {j.prompt.box_rc for j in jobs} == {(3, 4, 10, 20)}
    assert all(j.prompt.points_rc is None for j in jobs)


def test_points_join_the_box_that_holds_them_and_form_objects_otherwise() -> None:
    points = np.array([[5, 6, 6], [15, 25, 6], [1, 1, 9]])
    negatives = np.array([[4, 4, 6]])
    jobs = user_prompts(
        (20, 30, 12), points=points, negative_points=negatives, boxes=[((3, 4, 5), (10, 20, 7))], axis=2
    )
    on_six = [j for j in jobs if j.slice_index == 6]
    boxed = next(j for j in on_six if j.object_id == 1)
    assert boxed.prompt.points_rc.tolist() == [[5.0, 6.0], [4.0, 4.0]]
    assert boxed.prompt.point_labels.tolist() == [1, 0]
    loose = next(j for j in on_six if j.object_id != 1)
    assert loose.prompt.box_rc is None and loose.prompt.points_rc.tolist() == [[15.0, 25.0], [4.0, 4.0]]
    assert [j.slice_index for j in jobs if j.object_id not in (1, loose.object_id)] == [9]
    # negative points alone never prompt a slice
    assert user_prompts((20, 30, 12), negative_points=np.array([[1, 1, 1]])) == []


def test_world_mm_prompts_land_on_the_right_voxels_of_an_oblique_volume() -> None:
    affine = oblique_affine()
    shape = (20, 24, 9)
    voxel = np.array([7, 11, 4])
    world = (affine @ np.append(voxel, 1.0))[:3]
    assert np.allclose(world_to_voxel(world, affine), voxel)
    # a point a third of a voxel off the centre still lands on that voxel
    nudged = world + affine[:3, :3] @ np.array([0.3, -0.3, 0.3])
    assert points_to_voxels([nudged], shape=shape, affine=affine, world=True).tolist() == [voxel.tolist()]
    # a world box holds its corners' voxels
    corner_a = (affine @ np.array([3, 4, 2, 1.0]))[:3]
    corner_b = (affine @ np.array([9, 12, 6, 1.0]))[:3]
    low, high = box_to_voxels(
        [*np.minimum(corner_a, corner_b), *np.maximum(corner_a, corner_b)], shape=shape, affine=affine, world=True
    )
    assert all(lo <= v for lo, v in zip(low, (3, 4, 2))) and all(hi >= v for hi, v in zip(high, (9, 12, 6)))


def test_prompts_outside_the_image_are_one_line_errors() -> None:
    with pytest.raises(PromptError, match=r"voxel \(20, 3, 3\) lies outside the image of shape \(20, 24, 9\)"):
        points_to_voxels([(20, 3, 3)], shape=(20, 24, 9))
    with pytest.raises(PromptError, match="outside the image"):
        points_to_voxels([(-1, 3, 3)], shape=(20, 24, 9))
    with pytest.raises(PromptError, match="RAS"):
        points_to_voxels([(1e4, 0, 0)], shape=(20, 24, 9), affine=np.eye(4), world=True)
    with pytest.raises(PromptError, match="needs 3 coordinates"):
        points_to_voxels([(1, 2)], shape=(20, 24, 9))
    with pytest.raises(PromptError, match="outside the image"):
        box_to_voxels((30, 30, 30, 40, 40, 40), shape=(20, 24, 9))
    # a box reaching past the edge is clipped, not refused
    assert box_to_voxels((15, 20, 5, 40, 40, 40), shape=(20, 24, 9)) == ((15, 20, 5), (19, 23, 8))


def test_windowing_ct_and_mri() -> None:
    ct = np.array([-1000.0, -160.0, 40.0, 240.0, 2000.0])
    low, high = intensity_window(ct)  # auto: air means CT
    assert (low, high) == (-160.0, 240.0)
    assert to_uint8(ct, low, high).tolist() == [0, 0, 128, 255, 255]
    mri = np.concatenate([np.zeros(1000), np.linspace(1, 100, 1000), [1e6]])
    low, high = intensity_window(mri, modality="mri")
    assert 1.0 < low < 2.0 and 99.0 < high < 100.5  # the one bright outlier is ignored
    assert intensity_window(ct, window=(-1000, 400)) == (-1000.0, 400.0)
    with pytest.raises(ValueError, match="low < high"):
        intensity_window(ct, window=(10, 10))
    rgb = slice_to_rgb(np.array([[0.0, 50.0], [100.0, 200.0]]), 0.0, 100.0)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8 and rgb[..., 0].tolist() == [[0, 128], [255, 255]]


def test_structure_names_are_case_spelling_and_synonym_tolerant() -> None:
    hippocampus = LabelSet.from_manifest({"0": "background", "1": "Anterior", "2": "Posterior"})
    assert find_structure("anterior", hippocampus).label_ids == (1,)
    assert find_structure("Hippocampus head", hippocampus).name == "Anterior"
    assert find_structure("hippocampus_tail", hippocampus).name == "Posterior"
    assert find_structure("uncus", hippocampus, synonyms={"Anterior": ["uncus"]}).name == "Anterior"
    brats = LabelSet.from_manifest(
        {"0": "background", "1": "necrosis", "2": "edema", "3": "non_enhancing", "4": "enhancing_tumour"},
        regions={"tumour_core": [1, 3, 4]},
    )
    assert find_structure("Enhancing tumor", brats).label_ids == (4,)
    assert find_structure("TC", brats).label_ids == (1, 3, 4)
    assert find_structure("oedema", brats).name == "edema"
    assert normalise_name("  Tumour-Core ") == "tumor core"
    with pytest.raises(
        PromptError, match="unknown structure name 'spleen'; the model's label map has: Anterior, Posterior"
    ):
        find_structure("spleen", hippocampus)
