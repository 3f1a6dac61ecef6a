"""Regenerate the medseg manifests in this folder from the shared datasets' ``dataset.json``.

Usage: ``python data_manifests/make_manifests.py --shared-data ../shared/data``

The manifests hold only metadata (relative paths, label names, regions, evaluation settings);
the images stay where their licences allow them to be. Each manifest is used with
``--data-root ../shared/data/<folder>``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

EXTRA = {
    "msd_hippocampus": {
        "folder": "msd_hippocampus",
        "nsd_tolerance_mm": 1.0,
    },
    "brats2013": {
        "folder": "brats2013_deepmedic",
        "regions": {
            "whole_tumour": [1, 2, 3, 4],
            "tumour_core": [1, 3, 4],
            "enhancing_tumour": [4],
        },
        "nsd_tolerance_mm": 1.0,
    },
    "ms_lesions": {
        "folder": "ms_lesions_lesjak",
        "things": ["white-matter lesion"],
        "nsd_tolerance_mm": 1.0,
    },
    "drive_retina": {
        "folder": "drive_retina",
        "case_lists": ["training", "test_labelled"],
        "raters": {"label_observer2": "observer2"},
        "label_value_map": {"label_observer2": {"1": 255}},
        "nsd_tolerance_mm": 1.0,
    },
    "totalseg_ct": {"folder": "totalseg_ct_example", "nsd_tolerance_mm": 3.0},
    "totalseg_mr": {"folder": "totalseg_mr_example", "nsd_tolerance_mm": 3.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared-data", type=Path, default=HERE.parent.parent / "shared" / "data")
    args = parser.parse_args()
    for name, extra in EXTRA.items():
        extra = dict(extra)
        folder = extra.pop("folder")
        source = json.loads((args.shared_data / folder / "dataset.json").read_text())
        manifest = {
            "name": name,
            "description": source.get("description", ""),
            "source": f"dataset.json of ../shared/data/{folder} (see its PROVENANCE.md)",
            "reference": source.get("reference", ""),
            "licence": source.get("licence", ""),
            "data_root_hint": f"../shared/data/{folder}",
            "tensorImageSize": source.get("tensorImageSize", "3D"),
            "modality": source["modality"],
            "labels": source["labels"],
            **extra,
        }
        for key in ("labels_present", "label_value_notes"):
            if key in source:
                manifest[key] = source[key]
        lists = extra.get("case_lists", ["training", "test"])
        for list_name in lists:
            manifest[list_name] = source.get(list_name, [])
        out = HERE / f"{name}.json"
        out.write_text(json.dumps(manifest, indent=2) + "\n")
        print(f"wrote {out} ({sum(len(manifest[k]) for k in lists)} cases)")


if __name__ == "__main__":
    main()
