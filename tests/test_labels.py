"""LabelSet from MSD and nnU-Net styles, regions, errors."""

from __future__ import annotations

import pytest

from medseg.core.labels import LabelSet
from medseg.errors import ManifestError


def test_msd_and_nnunet_styles_agree() -> None:
    msd = LabelSet.from_manifest({"0": "background", "2": "Posterior", "1": "Anterior"})
    nnunet = LabelSet.from_manifest({"background": 0, "Anterior": 1, "Posterior": 2})
    assert msd == nnunet
    assert msd.ids == (0, 1, 2) and msd.foreground_ids == (1, 2)
    assert msd.name_of(2) == "Posterior" and msd.id_of("Anterior") == 1
    assert msd.is_contiguous and msd.num_classes == 3


def test_regions_by_name_and_id() -> None:
    labels = LabelSet.from_manifest(
        {"0": "background", "1": "necrosis", "2": "edema", "3": "non-enhancing", "4": "enhancing"},
        regions={"whole_tumour": [1, 2, 3, 4], "tumour_core": ["necrosis", 3, "enhancing"], "et": [4]},
    )
    assert labels.regions["tumour_core"] == (1, 3, 4)
    structures = labels.structures()
    assert [s.name for s in structures][-3:] == ["whole_tumour", "tumour_core", "et"]
    assert structures[0].label == 1 and structures[-1].label is None and structures[-1].is_region


def test_nnunet_region_lists() -> None:
    labels = LabelSet.from_manifest({"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enh": 3, "ed": 1, "nc": 2})
    assert labels.regions == {"whole": (1, 2, 3), "core": (2, 3)}


def test_non_contiguous_ids() -> None:
    labels = LabelSet.from_manifest({"0": "background", "255": "vessel"})
    assert not labels.is_contiguous and labels.max_id == 255


@pytest.mark.parametrize(
    "labels, regions, message",
    [
        ({}, None, "non-empty"),
        ({"0": "a", "1": "a"}, None, "used by ids"),
        ({"0": "bg", "1": "x"}, {"r": ["y"]}, "unknown label name 'y'"),
        ({"0": "bg", "1": "x"}, {"r": [7]}, "unknown label ids"),
        ({"bg": "zero"}, None, "neither MSD style"),
    ],
)
def test_invalid_label_maps(labels, regions, message) -> None:
    with pytest.raises(ManifestError, match=message):
        LabelSet.from_manifest(labels, regions=regions)
