"""DICOM-SEG out and in, and DICOM series that cannot be one volume.

Series are written slice by slice with pydicom (CT, int16 with RescaleIntercept -1024), so the
geometry of every file is known exactly; no DICOM is written through SimpleITK (its writer changes
the process locale, see :mod:`medseg.io.dicom`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
highdicom = pytest.importorskip("highdicom")

from medseg.core.labels import LabelSet  # noqa: E402
from medseg.errors import GeometryMismatchError, InvalidFileError, LabelValueError  # noqa: E402
from medseg.io import read_volume, write_volume  # noqa: E402
from medseg.io.dicom_seg import write_dicom_seg  # noqa: E402
from medseg.io.viewer import label_color  # noqa: E402

LABELS = LabelSet.from_manifest({"0": "background", "1": "liver", "2": "tumour"})
OBLIQUE_ROW = (np.cos(np.pi / 6), np.sin(np.pi / 6), 0.0)  # LPS direction along a row (increasing column)
OBLIQUE_COLUMN = (0.0, 0.0, -1.0)  # LPS direction down a column (increasing row)


def write_ct_series(
    folder: Path,
    hu_xyz: np.ndarray,
    *,
    spacing_mm: tuple[float, float, float] = (0.8, 0.9, 2.5),
    origin_lps: tuple[float, float, float] = (10.0, -20.0, 30.0),
    row: Sequence[float] = (1.0, 0.0, 0.0),
    column: Sequence[float] = (0.0, 1.0, 0.0),
    offsets_mm: Sequence[float] | None = None,
    series_uid: str | None = None,
    file_names: Sequence[str] | None = None,
) -> str:
    """Write ``hu_xyz`` (x = column, y = row, z = slice) as one CT file per slice; returns the series UID.

    Slice ``k`` lies at ``origin + offsets_mm[k] * (row x column)`` (default ``k * spacing_mm[2]``).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    normal = np.cross(row, column)
    columns, rows, slices = hu_xyz.shape
    for k in range(slices):
        uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, uid, "CT"
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "P1", "Test^Patient", "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.2.1125.9.1", series_uid
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240101", "120000", "A1", "1"
        ds.ReferringPhysicianName, ds.Manufacturer = "", "test"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.2.1125.9.2"
        offset = offsets_mm[k] if offsets_mm is not None else k * spacing_mm[2]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in np.asarray(origin_lps) + offset * normal]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row, *column)]
        ds.PixelSpacing = [spacing_mm[1], spacing_mm[0]]  # row spacing (y), column spacing (x)
        ds.SliceThickness = spacing_mm[2]
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.PixelData = (hu_xyz[:, :, k].T.astype(np.int32) + 1024).astype(np.int16).tobytes()
        ds.save_as(folder / (file_names[k] if file_names else f"slice{k:03d}.dcm"), enforce_file_format=True)
    return series_uid


@pytest.fixture
def oblique_series(tmp_path: Path) -> tuple[Path, np.ndarray]:
    hu = np.random.default_rng(0).integers(-1000, 1000, size=(7, 6, 5))
    folder = tmp_path / "ct_series"
    write_ct_series(folder, hu, row=OBLIQUE_ROW, column=OBLIQUE_COLUMN)
    return folder, hu


def _labels_on(image, seed: int = 1, values=(0, 1, 2)):
    rng = np.random.default_rng(seed)
    return image.with_array(rng.choice(np.array(values, dtype=np.uint8), size=(1, *image.spatial_shape)), kind="label")


# -- reading series ------------------------------------------------------------------------


def test_series_reads_in_hounsfield_units_with_its_geometry(oblique_series) -> None:
    folder, hu = oblique_series
    image = read_volume(folder)
    np.testing.assert_array_equal(image.array[0], hu)  # rescale applied: stored values + intercept
    np.testing.assert_allclose(image.spacing_mm, (0.8, 0.9, 2.5), atol=1e-5)
    np.testing.assert_allclose(image.origin, (-10.0, 20.0, 30.0), atol=1e-5)  # LPS (10, -20, 30) in RAS
    lps_columns = np.diag([-1, -1, 1]) @ image.direction
    np.testing.assert_allclose(lps_columns[:, 0], OBLIQUE_ROW, atol=1e-6)
    np.testing.assert_allclose(lps_columns[:, 1], OBLIQUE_COLUMN, atol=1e-6)


def test_files_out_of_order_are_sorted_by_position(tmp_path: Path, oblique_series) -> None:
    folder, hu = oblique_series
    shuffled = tmp_path / "shuffled"
    names = ["z.dcm", "b.dcm", "y.dcm", "a.dcm", "m.dcm"]  # file order unrelated to slice order
    write_ct_series(shuffled, hu, row=OBLIQUE_ROW, column=OBLIQUE_COLUMN, file_names=names)
    ordered, scrambled = read_volume(folder), read_volume(shuffled)
    np.testing.assert_array_equal(scrambled.array, ordered.array)
    np.testing.assert_allclose(scrambled.affine, ordered.affine, atol=1e-6)


@pytest.mark.parametrize(
    ("offsets_mm", "message"),
    [
        (
            (0.0, 2.5, 7.5, 10.0),
            "1 missing slice(s) between slice001.dcm and slice002.dcm (gap 5 mm, slice spacing 2.5 mm)",
        ),
        ((0.0, 2.5, 5.0, 8.0), "non-uniform slice spacing (2.5 to 3 mm, first between slice002.dcm and slice003.dcm)"),
        ((0.0, 2.5, 2.5, 5.0), "two slices at the same position"),
    ],
)
def test_a_series_that_is_not_a_regular_stack_is_one_line_error(tmp_path: Path, offsets_mm, message) -> None:
    folder = tmp_path / "bad"
    write_ct_series(folder, np.zeros((4, 3, 4)), offsets_mm=offsets_mm)
    with pytest.raises(InvalidFileError) as raised:
        read_volume(folder)
    text = str(raised.value)
    assert text.startswith(f"{folder}: ") and message in text and "\n" not in text


def test_two_series_of_equal_size_in_one_folder_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    write_ct_series(folder, np.zeros((4, 3, 3)), series_uid="1.2.3.4.1", file_names=["a1", "a2", "a3"])
    write_ct_series(folder, np.ones((4, 3, 3)), series_uid="1.2.3.4.2", file_names=["b1", "b2", "b3"])
    with pytest.raises(InvalidFileError, match=r"mixes 2 DICOM series and 2 have 3 files .*own folder"):
        read_volume(folder)
    write_ct_series(folder, np.ones((4, 3, 1)), series_uid="1.2.3.4.2", file_names=["b4"], offsets_mm=[7.5])
    volume = read_volume(folder)  # now one series is the largest: read, the other named
    assert volume.meta["dicom_series_uid"] == "1.2.3.4.2" and volume.meta["dicom_other_series"] == ["1.2.3.4.1"]


# -- DICOM-SEG out and in -----------------------------------------------------------------


def test_nifti_label_to_dicom_seg_and_back_is_equal_voxel_for_voxel(tmp_path: Path, oblique_series) -> None:
    folder, _ = oblique_series
    image = read_volume(folder)
    nifti = write_volume(_labels_on(image), tmp_path / "labels.nii.gz")
    label = read_volume(nifti, kind="label")
    seg = write_dicom_seg(label, tmp_path / "labels.dcm", source=folder, labels=LABELS)
    back = read_volume(seg, kind="label")
    np.testing.assert_array_equal(back.array, label.array)
    assert back.spatial_shape == label.spatial_shape == image.spatial_shape
    np.testing.assert_allclose(back.affine, label.affine, atol=1e-5)  # DS strings hold ~16 digits
    assert back.same_geometry(image, tolerance_mm=1e-5)
    assert back.meta["dicom_seg_segments"] == {"1": "liver", "2": "tumour"}
    assert back.meta["dicom_source_series_uids"] == [image.meta["dicom_series_uid"]]


def test_seg_references_the_series_and_carries_names_colours_and_algorithm(tmp_path: Path, oblique_series) -> None:
    from medseg import __version__

    folder, _ = oblique_series
    image = read_volume(folder)
    seg_path = write_dicom_seg(_labels_on(image), tmp_path / "case.dcm", source=folder, labels=LABELS)
    ds = pydicom.dcmread(seg_path)
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY" and ds.SeriesDescription == "medseg segmentation"
    assert ds.SoftwareVersions == __version__ and ds.PatientID == "P1"
    sources = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in folder.iterdir()}
    (series,) = ds.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == image.meta["dicom_series_uid"]
    assert {item.ReferencedSOPInstanceUID for item in series.ReferencedInstanceSequence} == sources
    assert int(ds.NumberOfFrames) == 5 * 2  # every slice of every segment, empty frames kept
    for number, (item, name) in enumerate(zip(ds.SegmentSequence, ["liver", "tumour"]), start=1):
        assert (item.SegmentNumber, item.SegmentLabel, item.SegmentDescription) == (
            number,
            name,
            f"label value {number}",
        )
        assert item.SegmentAlgorithmType == "AUTOMATIC" and item.SegmentAlgorithmName == "medseg"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "medseg" and algorithm.AlgorithmVersion == __version__
        rgb = highdicom.color.CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue).to_rgb()
        assert np.max(np.abs(np.array(rgb) - label_color(number))) <= 1


def test_each_seg_frame_lies_on_its_source_slice(tmp_path: Path, oblique_series) -> None:
    """highdicom's own frame -> source-instance map against the label map's slices, one by one."""
    folder, _ = oblique_series
    image = read_volume(folder)
    label = _labels_on(image)
    seg = highdicom.seg.segread(write_dicom_seg(label, tmp_path / "case.dcm", source=folder, labels=LABELS))
    for path in folder.iterdir():
        source = pydicom.dcmread(path, stop_before_pixels=True)
        position_ras = np.diag([-1, -1, 1]) @ np.array([float(v) for v in source.ImagePositionPatient])
        k = int(round((np.linalg.inv(image.affine) @ np.append(position_ras, 1))[2]))
        frames = seg.get_pixels_by_source_instance([source.SOPInstanceUID], combine_segments=True)
        np.testing.assert_array_equal(frames[0], label.array[0][:, :, k].T)  # (rows, columns) = (y, x)


def test_label_values_that_are_not_1_to_n_survive_the_round_trip(tmp_path: Path, oblique_series) -> None:
    folder, _ = oblique_series
    image = read_volume(folder)
    labels = LabelSet({0: "background", 1: "artery", 255: "vein"})
    label = _labels_on(image, values=(0, 1, 255))
    back = read_volume(write_dicom_seg(label, tmp_path / "v.dcm", source=folder, labels=labels), kind="label")
    np.testing.assert_array_equal(back.array, label.array)
    assert back.meta["dicom_seg_segments"] == {"1": "artery", "255": "vein"}


def test_seg_of_labels_off_the_series_grid_or_with_unknown_values_is_refused(tmp_path: Path, oblique_series) -> None:
    folder, _ = oblique_series
    image = read_volume(folder)
    shifted = image.affine.copy()
    shifted[:3, 3] += image.affine[:3, 2] * 0.5  # half a slice along the stack
    label = _labels_on(image)
    moved = type(label)(label.array, shifted, kind="label")
    with pytest.raises(GeometryMismatchError, match=r"not on one of its 5 slices"):
        write_dicom_seg(moved, tmp_path / "a.dcm", source=folder, labels=LABELS)
    unknown = label.with_array(np.where(label.array == 2, 7, label.array).astype(np.uint8))
    with pytest.raises(LabelValueError, match=r"label values \[7\] are not in the label map"):
        write_dicom_seg(unknown, tmp_path / "b.dcm", source=folder, labels=LABELS)
    with pytest.raises(InvalidFileError, match="DICOM series folder"):
        write_dicom_seg(label, tmp_path / "c.dcm", source=tmp_path / "missing", labels=LABELS)
    assert not list(tmp_path.glob("*.dcm"))


def test_overlapping_segments_and_non_seg_files_are_one_line_errors(tmp_path: Path, oblique_series) -> None:
    from pydicom.sr.codedict import codes

    folder, _ = oblique_series
    sources = sorted((pydicom.dcmread(p) for p in folder.iterdir()), key=lambda d: float(d.ImagePositionPatient[0]))
    masks = np.zeros((5, 6, 7, 2), dtype=bool)
    masks[:, 1:4, 1:4, 0] = True
    masks[:, 2:5, 2:5, 1] = True  # overlaps the first segment
    algorithm = highdicom.AlgorithmIdentificationSequence(
        name="test", family=codes.cid7162.ArtificialIntelligence, version="1"
    )
    descriptions = [
        highdicom.seg.SegmentDescription(
            segment_number=n,
            segment_label=f"s{n}",
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type="AUTOMATIC",
            algorithm_identification=algorithm,
        )
        for n in (1, 2)
    ]
    seg = highdicom.seg.Segmentation(
        source_images=sources,
        pixel_array=masks,
        segmentation_type="BINARY",
        segment_descriptions=descriptions,
        series_instance_uid=highdicom.UID(),
        series_number=2,
        sop_instance_uid=highdicom.UID(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
    )
    seg.save_as(tmp_path / "overlap.dcm")
    with pytest.raises(LabelValueError, match=r"overlap.dcm: segments overlap"):
        read_volume(tmp_path / "overlap.dcm", kind="label")
    shutil.copy(next(folder.iterdir()), tmp_path / "slice.dcm")
    with pytest.raises(InvalidFileError, match=r"slice.dcm: not a DICOM-SEG file"):
        read_volume(tmp_path / "slice.dcm", kind="label")


# -- the command line ----------------------------------------------------------------------


def test_predict_writes_dicom_seg_that_evaluate_reads_as_reference(tmp_path: Path, oblique_series, capsys) -> None:
    """A user predicts a DICOM series as NIfTI and as DICOM-SEG, then scores one against the other."""
    pytest.importorskip("torch")
    from test_inference import write_checkpoint

    from medseg.cli import main

    folder, _ = oblique_series
    write_checkpoint(tmp_path / "run")
    common = ["--model", str(tmp_path / "run"), "--input", str(folder), "--device", "cpu", "--no-tta"]
    assert main(["predict", *common, "--output", str(tmp_path / "nifti")]) == 0
    assert main(["predict", *common, "--output", str(tmp_path / "seg"), "--output-format", "dicom-seg"]) == 0
    capsys.readouterr()
    nifti = read_volume(tmp_path / "nifti" / "ct_series.nii.gz", kind="label")
    seg = read_volume(tmp_path / "seg" / "ct_series.dcm", kind="label")
    np.testing.assert_array_equal(seg.array, nifti.array)
    assert seg.same_geometry(nifti, tolerance_mm=1e-5) and seg.same_geometry(read_volume(folder), tolerance_mm=1e-5)
    record = json.loads((tmp_path / "seg" / "medseg_predict.json").read_text())
    assert record["options"]["output_format"] == "dicom-seg"
    assert record["cases"]["ct_series"]["outputs"]["labels"]["file"] == "ct_series.dcm"

    # references: a folder holding the DICOM-SEG and a NIfTI of another case (mixed formats)
    references = tmp_path / "references"
    references.mkdir()
    shutil.copy(tmp_path / "seg" / "ct_series.dcm", references / "ct_series.dcm")
    write_volume(nifti, references / "other.nii.gz")
    write_volume(nifti, tmp_path / "nifti" / "other.nii.gz")
    manifest = tmp_path / "labels.json"
    manifest.write_text(json.dumps({"labels": {"0": "background", "1": "a", "2": "b"}}))
    code = main(
        ["evaluate", "--reference", str(references), "--prediction", str(tmp_path / "nifti"), "--labels", str(manifest)]
        + ["--out", str(tmp_path / "eval"), "--no-report"]
    )
    assert code == 0, capsys.readouterr()
    import pandas as pd

    per_case = pd.read_csv(tmp_path / "eval" / "per_case.csv")
    assert sorted(per_case["case_id"].unique()) == ["ct_series", "other"]
    scored = per_case[per_case["status"] == "ok"]
    assert len(scored) and (scored["dice"] == 1.0).all()  # the same labels, read from DICOM-SEG and NIfTI
    assert set(per_case["status"]) <= {"ok", "both_empty"}


def test_stats_of_a_series_inside_a_dicom_seg_names_structures_by_segment_label(
    tmp_path: Path, oblique_series, capsys
) -> None:
    from medseg.cli import main

    folder, hu = oblique_series
    label = _labels_on(read_volume(folder))
    seg = write_dicom_seg(label, tmp_path / "case.dcm", source=folder, labels=LABELS)
    assert main(["stats", "--image", str(folder), "--labels", str(seg), "--out", str(tmp_path / "s.csv")]) == 0
    import pandas as pd

    table = pd.read_csv(tmp_path / "s.csv").set_index("structure")
    for name, value in (("liver", 1), ("tumour", 2)):
        mask = label.array[0] == value
        assert table.loc[name, "voxel_count"] == mask.sum()
        assert table.loc[name, "intensity_mean"] == pytest.approx(hu[mask].mean())  # HU: the rescale applied
        # the slice spacing comes from positions written with 6 decimals: 2.4999999 mm
        assert table.loc[name, "volume_ml"] == pytest.approx(mask.sum() * 0.8 * 0.9 * 2.5 / 1000, rel=1e-5)


def test_dicom_seg_output_of_non_dicom_inputs_is_refused_before_predicting(tmp_path: Path, capsys) -> None:
    pytest.importorskip("torch")
    from test_inference import write_checkpoint

    from medseg.cli import main
    from medseg.core.volume import Volume

    write_checkpoint(tmp_path / "run")
    scan = write_volume(Volume(np.ones((1, 8, 8, 4), np.float32), np.eye(4)), tmp_path / "in" / "scan.nii.gz")
    common = ["predict", "--model", str(tmp_path / "run"), "--input", str(tmp_path / "in"), "--output"]
    assert main([*common, str(tmp_path / "o"), "--device", "cpu", "--output-format", "dicom-seg"]) == 2
    error = capsys.readouterr().err
    assert error == f"medseg: error: {scan}: --output-format dicom-seg needs DICOM series folders as input, not files\n"
    assert main([*common, str(tmp_path / "o"), "--output-format", "dicom"]) == 2
    assert "--output-format 'dicom': choose one of auto, nii.gz, nii, nrrd, mha, seg.nrrd, dicom-seg" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "o" / "scan.nii.gz").exists()


@pytest.mark.shared_data
def test_real_hippocampus_label_round_trips_through_dicom_seg(tmp_path: Path, shared_data: Path) -> None:
    """MSD Hippocampus case 004: its image as a DICOM series, its expert label -> DICOM-SEG -> label map."""
    image = read_volume(shared_data / "msd_hippocampus" / "imagesTr" / "hippocampus_004.nii.gz")
    label = read_volume(shared_data / "msd_hippocampus" / "labelsTr" / "hippocampus_004.nii.gz", kind="label")
    lps = np.diag([-1, -1, 1]) @ image.affine[:3, :3]
    spacing = tuple(float(s) for s in image.spacing_mm)
    assert np.dot(np.cross(lps[:, 0], lps[:, 1]), lps[:, 2]) > 0  # a right-handed grid: slices along row x column
    write_ct_series(
        tmp_path / "series",
        np.round(image.array[0]).astype(np.int64) - 1024,
        spacing_mm=spacing,  # type: ignore[arg-type]
        origin_lps=tuple(np.diag([-1, -1, 1]) @ image.affine[:3, 3]),  # type: ignore[arg-type]
        row=lps[:, 0] / spacing[0],
        column=lps[:, 1] / spacing[1],
    )
    series = read_volume(tmp_path / "series")
    assert series.same_geometry(label, tolerance_mm=1e-4)
    labels = LabelSet.from_manifest({"0": "background", "1": "Anterior", "2": "Posterior"})
    back = read_volume(
        write_dicom_seg(label, tmp_path / "004.dcm", source=tmp_path / "series", labels=labels), kind="label"
    )
    np.testing.assert_array_equal(back.array, label.array)
    np.testing.assert_allclose(back.affine, label.affine, atol=1e-5)
    assert back.meta["dicom_seg_segments"] == {"1": "Anterior", "2": "Posterior"}
