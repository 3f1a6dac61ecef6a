"""Viewer-ready label maps: Slicer .seg.nrrd segment fields, ITK-SNAP label descriptions, the palette."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medseg.core.labels import LabelSet
from medseg.core.volume import Volume
from medseg.errors import InvalidFileError, LabelValueError
from medseg.evaluation.pairing import find_volumes
from medseg.io import read_volume, strip_volume_suffix
from medseg.io.viewer import PALETTE_RGB, itksnap_label_text, label_color, write_itksnap_labels, write_seg_nrrd

LABELS = LabelSet.from_manifest({"0": "background", "1": "liver", "2": "tumour", "3": "cyst"})


def _nrrd_fields(path: Path) -> dict[str, str]:
    """The ``key:=value`` lines of an NRRD header (the header is plain text before the first blank line)."""
    header = path.read_bytes().split(b"\n\n", 1)[0].decode("ascii")
    return dict(line.split(":=", 1) for line in header.splitlines() if ":=" in line)


def _label_volume() -> Volume:
    affine = np.array([[0.0, 0.8, 0.0, 5.0], [-1.2, 0.0, 0.0, 2.0], [0.0, 0.0, 2.5, -30.0], [0, 0, 0, 1]])
    array = np.zeros((1, 10, 8, 6), dtype=np.uint8)
    array[0, 2:5, 1:7, 0:3] = 1  # liver: i 2..4, j 1..6, k 0..2
    array[0, 7, 3, 5] = 2  # tumour: one voxel at (7, 3, 5)
    return Volume(array, affine, kind="label")


def test_palette_is_matplotlib_tab20_saturated_tones_first() -> None:
    matplotlib = pytest.importorskip("matplotlib")
    tab20 = [tuple(round(255 * c) for c in rgb) for rgb in matplotlib.colormaps["tab20"].colors]
    assert list(PALETTE_RGB) == tab20[0::2] + tab20[1::2]
    assert label_color(0) == (0, 0, 0)
    assert label_color(1) == (31, 119, 180) and label_color(20) == (158, 218, 229) and label_color(21) == label_color(1)


def test_seg_nrrd_carries_slicer_segment_fields_and_reads_back_voxel_for_voxel(tmp_path: Path) -> None:
    volume = _label_volume()
    path = write_seg_nrrd(volume, tmp_path / "case_7.seg.nrrd", labels=LABELS)
    fields = _nrrd_fields(path)
    assert fields["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert fields["Segmentation_ContainedRepresentationNames"] == "Binary labelmap|"
    expected = {
        0: ("liver", "1", "2 4 1 6 0 2", label_color(1)),
        1: ("tumour", "2", "7 7 3 3 5 5", label_color(2)),
        2: ("cyst", "3", "0 -1 0 -1 0 -1", label_color(3)),
    }
    for index, (name, value, extent, rgb) in expected.items():
        prefix = f"Segment{index}_"
        assert fields[prefix + "Name"] == name and fields[prefix + "LabelValue"] == value
        assert fields[prefix + "ID"] == f"Segment_{value}" and fields[prefix + "Layer"] == "0"
        assert fields[prefix + "Extent"] == extent
        colour = [float(c) for c in fields[prefix + "Color"].split()]
        np.testing.assert_allclose(colour, np.array(rgb) / 255, atol=1e-6)
        assert "TerminologyEntry:" in fields[prefix + "Tags"]
    assert "Segment3_Name" not in fields
    back = read_volume(path, kind="label")
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.affine, volume.affine, atol=1e-9)
    assert strip_volume_suffix(path) == "case_7" and list(find_volumes(tmp_path)) == ["case_7"]


def test_seg_nrrd_refuses_unnamed_values_wrong_names_and_2d(tmp_path: Path) -> None:
    volume = _label_volume()
    unnamed = volume.with_array(np.where(volume.array == 2, 9, volume.array).astype(np.uint8))
    with pytest.raises(LabelValueError, match=r"label values \[9\] are not in the label map"):
        write_seg_nrrd(unnamed, tmp_path / "a.seg.nrrd", labels=LABELS)
    with pytest.raises(InvalidFileError, match=r"b.nrrd: a Slicer segmentation file name ends in .seg.nrrd"):
        write_seg_nrrd(volume, tmp_path / "b.nrrd", labels=LABELS)
    flat = Volume(np.zeros((1, 4, 4), np.uint8), np.eye(4), kind="label")
    with pytest.raises(InvalidFileError, match="one 3D label map"):
        write_seg_nrrd(flat, tmp_path / "c.seg.nrrd", labels=LABELS)
    assert not list(tmp_path.iterdir())


def test_itksnap_label_descriptions_list_every_label_with_its_colour(tmp_path: Path) -> None:
    labels = LabelSet({0: "background", 1: "left hippocampus", 255: 'the "vessel"'})
    path = write_itksnap_labels(labels, tmp_path / "labels.itksnap.txt")
    rows = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    parsed = [(row.split('"')[0].split(), row.split('"', 1)[1].rsplit('"', 1)[0]) for row in rows]
    assert parsed == [
        (["0", "0", "0", "0", "0", "0", "0"], "Clear Label"),
        (["1", *map(str, label_color(1)), "1", "1", "1"], "left hippocampus"),
        (["255", *map(str, label_color(255)), "1", "1", "1"], "the 'vessel'"),
    ]
    assert "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL" in itksnap_label_text(labels)


def test_predict_writes_seg_nrrd_and_itksnap_labels(tmp_path: Path, capsys) -> None:
    pytest.importorskip("torch")
    from test_inference import LABELS as MODEL_LABELS
    from test_inference import write_checkpoint

    from medseg.cli import main
    from medseg.io import write_volume

    write_checkpoint(tmp_path / "run")
    image = Volume(np.random.default_rng(0).normal(size=(1, 14, 12, 6)).astype(np.float32), np.diag([1, 1, 2, 1]))
    write_volume(image, tmp_path / "in" / "case_0.nii.gz")
    args = ["predict", "--model", str(tmp_path / "run"), "--input", str(tmp_path / "in"), "--output"]
    assert main([*args, str(tmp_path / "out"), "--device", "cpu", "--no-tta", "--output-format", "seg.nrrd"]) == 0
    path = tmp_path / "out" / "case_0.seg.nrrd"
    fields = _nrrd_fields(path)
    assert [fields[f"Segment{i}_Name"] for i in range(2)] == [MODEL_LABELS["1"], MODEL_LABELS["2"]]
    assert read_volume(path, kind="label").same_geometry(image, tolerance_mm=1e-6)
    itksnap = (tmp_path / "out" / "labels.itksnap.txt").read_text()
    assert f'"{MODEL_LABELS["2"]}"' in itksnap
    record = json.loads((tmp_path / "out" / "medseg_predict.json").read_text())
    assert record["cases"]["case_0"]["outputs"]["labels"]["file"] == "case_0.seg.nrrd"
    # a rerun with the same options reuses the case; another format predicts it again
    assert main([*args, str(tmp_path / "out"), "--device", "cpu", "--no-tta", "--output-format", "seg.nrrd"]) == 0
    assert "reused 1" in capsys.readouterr().out
    assert main([*args, str(tmp_path / "out"), "--device", "cpu", "--no-tta", "--output-format", "mha"]) == 0
    assert "predicted 1, reused 0" in capsys.readouterr().out and (tmp_path / "out" / "case_0.mha").is_file()
