"""The shipped manifests against the real data in ../shared/data (skipped where it is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medseg.data.check import check_manifest
from medseg.data.manifest import load_manifest

MANIFESTS = Path(__file__).resolve().parents[1] / "data_manifests"

SHIPPED = {
    "msd_hippocampus": ("msd_hippocampus", 208),
    "brats2013": ("brats2013_deepmedic", 6),
    "ms_lesions": ("ms_lesions_lesjak", 3),
    "drive_retina": ("drive_retina", 40),
    "totalseg_ct": ("totalseg_ct_example", 1),
    "totalseg_mr": ("totalseg_mr_example", 1),
}


@pytest.mark.shared_data
@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_manifest_checks_clean(shared_data: Path, name: str) -> None:
    folder, num_cases = SHIPPED[name]
    manifest = load_manifest(MANIFESTS / f"{name}.json", data_root=shared_data / folder)
    assert len(manifest.cases) == num_cases
    report = check_manifest(manifest)
    assert report.problems == []
    assert report.cases_ok == num_cases


@pytest.mark.shared_data
def test_brats_regions_and_channels(shared_data: Path) -> None:
    manifest = load_manifest(MANIFESTS / "brats2013.json", data_root=shared_data / "brats2013_deepmedic")
    assert manifest.channels == ("FLAIR", "T1c")
    assert manifest.labels.regions["tumour_core"] == (1, 3, 4)
    case = manifest.cases[0]
    assert case.case_id == "brats_2013_pat0005_1"
    image = manifest.read_image(case)
    assert image.num_channels == 2
    label = manifest.read_label(case)
    assert label.array.dtype == np.uint8  # stored as float32, cast
    assert set(np.unique(label.array)) <= {0, 1, 2, 3, 4}


@pytest.mark.shared_data
def test_drive_second_observer_mapped_to_label_ids(shared_data: Path) -> None:
    manifest = load_manifest(MANIFESTS / "drive_retina.json", data_root=shared_data / "drive_retina")
    case = manifest.case("01_test")
    first = manifest.read_label(case)
    second = manifest.read_label(case, key="label_observer2")
    assert set(np.unique(first.array)) == {0, 255} == set(np.unique(second.array))
    assert first.same_geometry(second)
    dice = 2 * np.sum((first.array > 0) & (second.array > 0)) / (np.sum(first.array > 0) + np.sum(second.array > 0))
    assert 0.74 < dice < 0.83  # PROVENANCE: inter-observer Dice 0.742-0.829


@pytest.mark.shared_data
def test_hippocampus_nifti_matches_nibabel(shared_data: Path) -> None:
    import nibabel as nib

    from medseg.io import read_volume

    path = shared_data / "msd_hippocampus" / "imagesTr" / "hippocampus_004.nii.gz"
    volume = read_volume(path)
    reference = nib.load(str(path))
    np.testing.assert_allclose(volume.affine, reference.affine)
    np.testing.assert_allclose(volume.array[0], reference.get_fdata(dtype=np.float32))
