"""Label maps keep the file's memory order (NIfTI: Fortran) and every metric gives the same numbers either way."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import oblique_affine
from scipy import ndimage

from medseg.core.labels import LabelSet
from medseg.core.volume import Volume
from medseg.evaluation.case import EvaluationSettings, evaluate_pair
from medseg.io import read_volume, write_volume
from medseg.metrics import surface_search
from medseg.metrics.overlap import confusion_matrix

RNG = np.random.default_rng(3)


def _blobs(shape: tuple[int, ...], labels: list[int]) -> np.ndarray:
    smooth = ndimage.gaussian_filter(RNG.random(shape), 1.5)
    edges = np.quantile(smooth, np.linspace(0.5, 1.0, len(labels) + 1))
    out = np.zeros(shape, dtype=np.uint8)
    for value, low in zip(labels, edges[:-1]):
        out[smooth >= low] = value
    return out


def test_nifti_label_is_read_without_a_transposing_copy_and_images_stay_c_ordered(tmp_path: Path) -> None:
    array = _blobs((11, 13, 7), [1, 2, 5])
    nib.save(nib.Nifti1Image(array, oblique_affine()), tmp_path / "seg.nii.gz")
    label = read_volume(tmp_path / "seg.nii.gz", kind="label")
    assert label.array.flags.f_contiguous and not label.array.flags.c_contiguous
    np.testing.assert_array_equal(label.array[0], array)
    image = read_volume(tmp_path / "seg.nii.gz", kind="image")
    assert image.array.flags.c_contiguous and image.array.dtype == np.float32
    np.testing.assert_array_equal(image.array[0], array.astype(np.float32))
    # and a Fortran-ordered label writes back the same voxels and geometry
    write_volume(label, tmp_path / "again.nii.gz")
    again = read_volume(tmp_path / "again.nii.gz", kind="label")
    np.testing.assert_array_equal(again.array, label.array)
    np.testing.assert_allclose(again.affine, label.affine, atol=1e-6)


@pytest.mark.parametrize("shape", [(40, 31, 23), (64, 50)])
def test_confusion_matrix_and_label_blocks_agree_in_both_orders(shape) -> None:
    ref, pred = _blobs(shape, [1, 2, 3]), _blobs(shape, [1, 3, 2])
    c_order = confusion_matrix(ref, pred, num_classes=4)
    f_order = confusion_matrix(np.asfortranarray(ref), np.asfortranarray(pred), num_classes=4)
    mixed = confusion_matrix(np.asfortranarray(ref), pred, num_classes=4)
    np.testing.assert_array_equal(c_order, f_order)
    np.testing.assert_array_equal(c_order, mixed)
    assert c_order.sum() == ref.size
    blocks_c = surface_search._label_blocks(ref, [1, 2, 3, 9])
    blocks_f = surface_search._label_blocks(np.asfortranarray(ref), [1, 2, 3, 9])
    assert blocks_c.keys() == blocks_f.keys() and blocks_f[9] is None
    for value in (1, 2, 3):
        np.testing.assert_array_equal(blocks_c[value], blocks_f[value])


def test_evaluate_pair_gives_identical_rows_for_fortran_and_c_ordered_maps() -> None:
    labels = LabelSet.from_manifest({"0": "background", "2": "liver", "7": "spleen"})  # ids not 0..n-1
    ref, pred = _blobs((36, 30, 20), [2, 7]), _blobs((36, 30, 20), [7, 2])
    affine = np.diag([0.8, 0.9, 2.0, 1.0])
    settings = EvaluationSettings(labels=labels)

    def rows(order: str) -> list[dict]:
        make = np.asfortranarray if order == "F" else np.ascontiguousarray
        reference = Volume(make(ref)[None], affine, kind="label")
        prediction = Volume(make(pred)[None], affine, kind="label")
        return evaluate_pair(reference, prediction, settings=settings, case_id="c").rows

    for first, second in zip(rows("C"), rows("F"), strict=True):
        for key, value in first.items():
            other = second[key]
            same = value == other or (
                isinstance(value, float) and isinstance(other, float) and math.isnan(value) and math.isnan(other)
            )
            assert same, (first["structure"], key, value, other)
    assert {r["structure"] for r in rows("F")} == {"liver", "spleen"}
