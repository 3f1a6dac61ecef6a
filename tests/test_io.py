"""Round trips per format, LPS/RAS correctness against nibabel, label casting, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import oblique_affine

from medseg.core.itk import to_sitk
from medseg.core.labels import as_label_array
from medseg.core.volume import Volume
from medseg.errors import InvalidFileError, LabelValueError, OutputError
from medseg.io import read_channels, read_volume, strip_volume_suffix, write_volume

RNG = np.random.default_rng(0)


def _image(shape=(7, 9, 5), affine=None) -> Volume:
    array = RNG.normal(size=(1, *shape)).astype(np.float32)
    return Volume(array, oblique_affine() if affine is None else affine, kind="image")


def _label(shape=(7, 9, 5), affine=None) -> Volume:
    array = RNG.integers(0, 4, size=(1, *shape)).astype(np.uint8)
    return Volume(array, oblique_affine() if affine is None else affine, kind="label")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("kind", ["image", "label"])
def test_round_trip_oblique_anisotropic(tmp_path: Path, suffix: str, kind: str) -> None:
    volume = _image() if kind == "image" else _label()
    path = write_volume(volume, tmp_path / f"case{suffix}")
    back = read_volume(path, kind=kind)
    np.testing.assert_allclose(back.affine, volume.affine, atol=1e-6)
    assert back.spatial_shape == volume.spatial_shape
    np.testing.assert_array_equal(back.array, volume.array)
    if kind == "label":
        assert np.issubdtype(back.array.dtype, np.integer)
    # and a second round trip is exact
    again = read_volume(write_volume(back, tmp_path / f"again{suffix}"), kind=kind)
    np.testing.assert_allclose(again.affine, back.affine, atol=1e-9)


def test_multichannel_round_trip(tmp_path: Path) -> None:
    volume = Volume(RNG.normal(size=(2, 5, 6, 4)).astype(np.float32), oblique_affine())
    for suffix in (".nii.gz", ".mha"):
        back = read_volume(write_volume(volume, tmp_path / f"multi{suffix}"))
        assert back.num_channels == 2
        np.testing.assert_allclose(back.array, volume.array)
        np.testing.assert_allclose(back.affine, volume.affine, atol=1e-6)


def test_lps_ras_against_nibabel(tmp_path: Path) -> None:
    """A NIfTI written by nibabel read by SimpleITK (LPS) must give nibabel's RAS affine."""
    affine = oblique_affine()
    data = np.arange(7 * 9 * 5, dtype=np.int16).reshape(7, 9, 5)
    path = tmp_path / "nib.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    # medseg's NIfTI path (nibabel) and its ITK path (SimpleITK + LPS->RAS) must agree
    via_nibabel = read_volume(path)
    itk_image = sitk.ReadImage(str(path))
    sitk.WriteImage(itk_image, str(tmp_path / "same.mha"))
    via_itk = read_volume(tmp_path / "same.mha")
    np.testing.assert_allclose(via_itk.affine, nib.load(str(path)).affine, atol=1e-5)
    np.testing.assert_array_equal(via_itk.array, via_nibabel.array)
    # a physical point: voxel (1, 2, 3) in RAS from nibabel == ITK's LPS point with x, y negated
    lps = np.array(itk_image.TransformIndexToPhysicalPoint((1, 2, 3)))
    ras = affine @ np.array([1, 2, 3, 1.0])
    np.testing.assert_allclose(lps * [-1, -1, 1], ras[:3], atol=1e-4)


def test_to_sitk_orientation_matches_physical_points(oblique: np.ndarray) -> None:
    volume = _image(affine=oblique)
    image = to_sitk(volume)
    for index in [(0, 0, 0), (6, 8, 4), (3, 1, 2)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        ras = oblique @ np.array([*index, 1.0])
        np.testing.assert_allclose(lps * [-1, -1, 1], ras[:3], atol=1e-6)
        # array order: ITK's (z, y, x) array vs medseg's (x, y, z)
        assert sitk.GetArrayFromImage(image)[index[::-1]] == pytest.approx(volume.array[(0, *index)])


def test_nifti_keeps_qform_sform_codes(tmp_path: Path) -> None:
    data = np.zeros((4, 5, 6), np.uint8)
    image = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=4)
    nib.save(image, str(tmp_path / "src.nii.gz"))
    volume = read_volume(tmp_path / "src.nii.gz", kind="label")
    write_volume(volume, tmp_path / "out.nii.gz")
    header = nib.load(str(tmp_path / "out.nii.gz")).header
    assert int(header["qform_code"]) == 1
    assert int(header["sform_code"]) == 4


def _qform_sform_source(path: Path) -> nib.Nifti1Image:
    """A scanner-like NIfTI: a rigid qform (code 1) beside a sheared, shifted sform (code 2)."""
    qform = oblique_affine(spacing_mm=(0.7, 0.9, 3.0))
    sform = qform.copy()
    sform[0, 1] += 0.05  # a small shear, which a qform (rotation and zooms only) cannot hold
    sform[:3, 3] += (1.5, -2.0, 0.75)
    image = nib.Nifti1Image(RNG.normal(size=(6, 5, 4)).astype(np.float32), None)
    image.set_qform(qform, code=1)
    image.set_sform(sform, code=2)
    nib.save(image, str(path))
    return nib.load(str(path))


def test_nifti_keeps_differing_qform_and_sform(tmp_path: Path) -> None:
    """A label derived from a NIfTI gets the source's qform, sform and codes, not one affine in both."""
    source = _qform_sform_source(tmp_path / "src.nii.gz")
    assert not np.allclose(source.header.get_qform(), source.header.get_sform(), atol=1e-3)
    image = read_volume(tmp_path / "src.nii.gz")
    np.testing.assert_allclose(image.affine, source.header.get_sform(), atol=1e-6)  # nibabel's choice
    label = image.with_array((image.array > 0).astype(np.uint8), kind="label")
    written = nib.load(str(write_volume(label, tmp_path / "seg.nii.gz")))
    header = written.header
    np.testing.assert_allclose(header.get_qform(), source.header.get_qform(), atol=1e-5)
    np.testing.assert_allclose(header.get_sform(), source.header.get_sform(), atol=1e-5)
    assert int(header["qform_code"]) == 1
    assert int(header["sform_code"]) == 2
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)


def test_nifti_with_a_changed_affine_writes_its_own_affine_in_both(tmp_path: Path) -> None:
    """Once the geometry changed (a shift here), the source's header no longer applies."""
    _qform_sform_source(tmp_path / "src.nii.gz")
    image = read_volume(tmp_path / "src.nii.gz")
    moved_affine = oblique_affine(spacing_mm=(1.0, 1.0, 2.0), origin=(3.0, 4.0, 5.0))
    moved = Volume(image.array[:, ::2], moved_affine, meta=image.meta)  # meta still names the source
    header = nib.load(str(write_volume(moved, tmp_path / "moved.nii.gz"))).header
    np.testing.assert_allclose(header.get_qform(), moved_affine, atol=1e-5)
    np.testing.assert_allclose(header.get_sform(), moved_affine, atol=1e-5)


def test_float_labels_cast_and_non_integral_rejected(tmp_path: Path) -> None:
    data = np.zeros((4, 4, 4), np.float32)
    data[1, 1, 1] = 2.0
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "float.nii.gz"))
    label = read_volume(tmp_path / "float.nii.gz", kind="label")
    assert label.array.dtype == np.uint8 and label.array.max() == 2
    data[2, 2, 2] = 1.5
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "bad.nii.gz"))
    with pytest.raises(LabelValueError, match=r"bad\.nii\.gz.*non-integral.*1\.5"):
        read_volume(tmp_path / "bad.nii.gz", kind="label")


def test_label_dtype_widening() -> None:
    assert as_label_array(np.array([0, 300])).dtype == np.int16
    assert as_label_array(np.array([-1.0, 2.0])).dtype == np.int16
    assert as_label_array(np.array([True, False])).dtype == np.uint8


def test_2d_png_tif_gif_round_trip(tmp_path: Path) -> None:
    from PIL import Image

    pixels = np.zeros((6, 10), np.uint8)  # rows x cols
    pixels[2, 7] = 255
    Image.fromarray(pixels).save(tmp_path / "mask.png")
    label = read_volume(tmp_path / "mask.png", kind="label")
    assert label.spatial_shape == (10, 6)  # (x = columns, y = rows)
    assert label.array[0, 7, 2] == 255 and label.array.sum() == 255
    assert label.meta["spacing_known"] is False
    for suffix in (".png", ".tif"):
        back = read_volume(write_volume(label, tmp_path / f"out{suffix}"), kind="label")
        np.testing.assert_array_equal(back.array, label.array)
    rgb = np.stack([pixels, pixels // 2, pixels // 3], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "rgb.tif")
    image = read_volume(tmp_path / "rgb.tif")
    assert image.num_channels == 3 and image.array[1, 7, 2] == 127


def test_palette_gif_label_keeps_indices(tmp_path: Path) -> None:
    """DRIVE's 2nd observer stores labels as palette indices 0/1 whose colours are 3/253."""
    from PIL import Image

    indices = np.zeros((5, 5), np.uint8)
    indices[1:3, 1:3] = 1
    image = Image.fromarray(indices, mode="P")
    image.putpalette([3, 3, 3, 253, 253, 253] + [0] * 762)
    image.save(tmp_path / "pal.gif")
    label = read_volume(tmp_path / "pal.gif", kind="label")
    assert set(np.unique(label.array)) == {0, 1}
    with pytest.raises(InvalidFileError, match="GIF"):
        write_volume(label, tmp_path / "out.gif")


def test_dicom_series_folder(tmp_path: Path, oblique: np.ndarray) -> None:
    """Write a DICOM series with SimpleITK, read the folder, compare geometry with the source."""
    import locale

    saved_locale = locale.setlocale(locale.LC_ALL)
    affine = np.eye(4)
    affine[:3, :3] = np.diag([0.8, 0.8, 2.5])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    volume = Volume(RNG.integers(0, 1000, size=(1, 8, 6, 4)).astype(np.float32), affine)
    image = sitk.Cast(to_sitk(volume), sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.42"
    folder = tmp_path / "dicom"
    folder.mkdir()
    for k in range(image.GetDepth()):
        slice_image = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0020|000e": series_uid,
            "0020|0032": "\\".join(str(v) for v in position),
            "0020|0013": str(k),
            "0008|0060": "CT",
            "0018|0050": "2.5",
        }
        # ImageOrientationPatient: row direction (x axis) then column direction (y axis)
        tags["0020|0037"] = "\\".join(
            str(v) for v in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7])
        )
        for tag, value in tags.items():
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_image)
    locale.setlocale(locale.LC_ALL, saved_locale)  # GDCM's writer sets the C locale too
    back = read_volume(folder)
    assert locale.setlocale(locale.LC_ALL) == saved_locale  # read_volume leaves the locale alone
    assert back.meta["format"] == "dicom"
    assert back.spatial_shape == volume.spatial_shape
    np.testing.assert_allclose(back.affine, volume.affine, atol=1e-3)
    np.testing.assert_array_equal(back.array, volume.array)


def test_read_channels_geometry_mismatch(tmp_path: Path) -> None:
    from medseg.errors import GeometryMismatchError

    write_volume(_image(), tmp_path / "a.nii.gz")
    write_volume(_image(affine=np.diag([1.0, 1.0, 1.0, 1.0])), tmp_path / "b.nii.gz")
    with pytest.raises(GeometryMismatchError, match=r"b\.nii\.gz.*a\.nii\.gz.*spacing_mm"):
        read_channels([tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"])


def test_corrupt_missing_and_unknown_files(tmp_path: Path) -> None:
    path = write_volume(_image(), tmp_path / "good.nii.gz")
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(InvalidFileError, match=r"truncated\.nii\.gz: cannot read"):
        read_volume(truncated)
    garbage = tmp_path / "garbage.mha"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(InvalidFileError, match=r"garbage\.mha: cannot read"):
        read_volume(garbage)
    with pytest.raises(InvalidFileError, match=r"missing\.nii\.gz: file not found"):
        read_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InvalidFileError, match="unsupported file type"):
        read_volume(tmp_path / "notes.txt")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(InvalidFileError, match="no DICOM series"):
        read_volume(empty_dir)


def test_write_is_atomic_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = write_volume(_label(), tmp_path / "out.nii.gz")
    before = target.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib, "save", disk_full)
    with pytest.raises(OutputError, match=r"out\.nii\.gz: cannot write \(No space left on device\)"):
        write_volume(_label(), target)
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["out.nii.gz"]  # no temporary file left behind


@pytest.mark.parametrize("what", ["volume", "json"])
def test_writes_fsync_the_file_before_renaming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str) -> None:
    """The data must be on disk before the rename makes them the target, or a crash can leave it empty."""
    from medseg.io import write_json

    calls: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        calls.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def recording_replace(source, target) -> None:
        calls.append(("replace", os.stat(source).st_ino, Path(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    if what == "volume":
        target = write_volume(_label(), tmp_path / "seg.nii.gz")
    else:
        target = write_json({"a": 1}, tmp_path / "summary.json")
    replaces = [(i, call) for i, call in enumerate(calls) if call[0] == "replace"]
    assert len(replaces) == 1 and replaces[0][1][2] == target, calls
    index, (_, inode, _) = replaces[0]
    assert ("fsync", inode) in calls[:index], f"the temporary file was not fsynced before os.replace: {calls}"
    assert os.stat(target).st_ino == inode


@pytest.mark.parametrize("failing_step", ["save", "replace"])
def test_permission_denied_is_an_output_error_naming_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_step: str
) -> None:
    """A read-only output folder, simulated (tests run as root, where chmod does not stop writes)."""
    from medseg.errors import MedsegUserError

    folder = tmp_path / "read_only"
    folder.mkdir()

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(args[-1]))

    if failing_step == "save":  # creating the temporary file fails
        monkeypatch.setattr(nib, "save", denied)
    else:  # the data are written, but the rename onto the target is refused
        monkeypatch.setattr(os, "replace", denied)
    target = folder / "seg.nii.gz"
    with pytest.raises(OutputError, match=r"read_only/seg\.nii\.gz: cannot write \(Permission denied\)") as caught:
        write_volume(_label(), target)
    assert isinstance(caught.value, MedsegUserError)  # reported as a message, not a traceback
    assert os.listdir(folder) == []  # neither the target nor a temporary file


def test_strip_volume_suffix() -> None:
    assert strip_volume_suffix("a/b/case_01.nii.gz") == "case_01"
    assert strip_volume_suffix("x.mha") == "x"
    assert strip_volume_suffix("21_training.tif") == "21_training"


def test_colour_label_image_is_refused(tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(InvalidFileError, match=r"rgb\.png: colour \(RGB\) image cannot be a label map"):
        read_volume(tmp_path / "rgb.png", kind="label")


def test_boolean_label_volume_becomes_uint8(tmp_path: Path) -> None:
    label = _label()
    mask = label.with_array(label.array == 1, kind="label")
    assert mask.array.dtype == np.uint8
    back = read_volume(write_volume(mask, tmp_path / "mask.nrrd"), kind="label")
    np.testing.assert_array_equal(back.array, mask.array)


def test_read_json_names_the_file_and_the_problem(tmp_path) -> None:
    from medseg.errors import ManifestError, MedsegUserError
    from medseg.io import read_json

    good = tmp_path / "good.json"
    good.write_text('{"a": [1, 2]}', encoding="utf-8")
    assert read_json(good, what="plans file") == {"a": [1, 2]}
    with pytest.raises(MedsegUserError, match=r"missing\.json: plans file not found"):
        read_json(tmp_path / "missing.json", what="plans file")
    broken = tmp_path / "broken.json"
    broken.write_text('{"a": \n', encoding="utf-8")
    with pytest.raises(ManifestError, match=r"broken\.json: invalid JSON \(line 2"):
        read_json(broken, what="manifest", error=ManifestError)
    with pytest.raises(MedsegUserError, match=r": cannot read manifest \("):
        read_json(tmp_path, what="manifest")  # a folder
