"""The helpers that keep pandas, scipy.ndimage and pydicom out of ``medseg evaluate``: each numpy helper agrees
with the scipy function it replaces, and the console script's evaluate imports none of the three."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medseg.core.components import bounding_box, small_grid_components
from medseg.evaluation.figures import _interior
from medseg.metrics.surface_search import label_boxes


@pytest.mark.parametrize("seed", range(6))
def test_small_grid_components_number_and_box_like_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(40):
        ndim = int(rng.choice([2, 3]))
        shape = tuple(int(n) for n in rng.integers(1, 14, ndim))
        mask = rng.random(shape) < rng.uniform(0.05, 0.7)
        labels, boxes = small_grid_components(mask)
        expected, count = ndimage.label(mask, structure=np.ones((3,) * ndim, bool))
        assert np.array_equal(labels, expected)
        assert boxes == ndimage.find_objects(expected)
        assert len(boxes) == count


def test_small_grid_components_follow_a_long_winding_path() -> None:
    mask = np.zeros((15, 15), bool)  # a serpentine: one component whose first element is far from its end
    mask[::2, :] = True
    mask[1::4, -1] = True
    mask[3::4, 0] = True
    labels, boxes = small_grid_components(mask)
    assert labels.max() == 1 and boxes == [(slice(0, 15), slice(0, 15))]
    assert np.array_equal(labels, ndimage.label(mask, structure=np.ones((3, 3), bool))[0])


def test_bounding_box_is_find_objects_and_none_when_empty() -> None:
    mask = np.zeros((6, 7, 8), bool)
    assert bounding_box(mask) is None
    mask[1, 2, 3] = mask[4, 5, 3] = True
    assert (
        bounding_box(mask) == ndimage.find_objects(mask.astype(np.uint8))[0] == (slice(1, 5), slice(2, 6), slice(3, 4))
    )


@pytest.mark.parametrize("order", ["C", "F"])
def test_label_boxes_hold_every_voxel_and_are_block_aligned(order: str) -> None:
    labels = np.zeros((30, 21, 17), np.uint8)
    labels[3:9, 10:12, 5:16] = 2
    labels[25, 20, 16] = 2  # a far voxel in the last, partial block
    labels[12:14, 1:3, 0:2] = 5
    labels = np.asarray(labels, order=order)
    boxes = label_boxes(labels, [2, 5, 7])
    assert boxes[7] is None
    for value in (2, 5):
        tight = ndimage.find_objects((labels == value).astype(np.uint8))[0]
        box = boxes[value]
        assert box is not None
        for got, want, n in zip(box, tight, labels.shape):
            assert got.start <= want.start and got.stop >= want.stop
            assert got.start % 8 == 0 and (got.stop % 8 == 0 or got.stop == n)
            assert want.start - got.start < 8 and got.stop - want.stop < 8


def test_interior_is_binary_erosion_with_a_full_square() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random(tuple(int(n) for n in rng.integers(1, 20, 2))) < 0.7
        expected = ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), border_value=0)
        assert np.array_equal(_interior(mask), expected)


def test_console_evaluate_imports_neither_pandas_nor_scipy_ndimage_nor_pydicom(tmp_path) -> None:
    """The console script scores and reports a pair without the 0.2-0.3 s imports of pandas, scipy.ndimage and
    pydicom."""
    pytest.importorskip("pydicom")  # the dicom extra; without it there is nothing to keep out
    labels = np.zeros((24, 20, 12), np.uint8)
    labels[4:12, 5:15, 2:9] = 1
    labels[14:20, 3:8, 3:6] = 2
    prediction = np.roll(labels, 1, axis=0)
    for name, array in (("ref", labels), ("pred", prediction)):
        (tmp_path / name).mkdir()
        nib.save(nib.Nifti1Image(array, np.diag([0.8, 0.8, 1.5, 1.0])), tmp_path / name / "case_1.nii.gz")
    label_map = {"name": "pair", "labels": {"0": "background", "1": "left", "2": "right"}, "training": []}
    (tmp_path / "labels.json").write_text(json.dumps(label_map))
    code = (
        "import sys\n"
        "from medseg.cli import console\n"
        f"sys.argv = ['medseg', 'evaluate', '--reference', {str(tmp_path / 'ref')!r}, '--prediction',"
        f" {str(tmp_path / 'pred')!r}, '--labels', {str(tmp_path / 'labels.json')!r}, '--out', {str(tmp_path / 'out')!r}]\n"
        "try:\n"
        "    console()\n"
        "except SystemExit as stop:\n"
        "    print('exit', stop.code, [m for m in ('pandas', 'scipy.ndimage', 'pydicom') if m in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "exit 0 []", result.stdout + result.stderr
    assert (tmp_path / "out" / "report.html").stat().st_size > 0
    import pydicom  # noqa: F401 - still importable after nibabel was imported without it

    summary = (tmp_path / "out" / "per_case.csv").read_text()
    assert "case_1" in summary
