"""Batch evaluation speed on the 208 shared hippocampus cases, medseg beside MONAI.

Writes a perturbed copy of every reference label (shifts, dilations, erosions, one missing
structure) to a temporary folder, then times

* ``medseg evaluate --workers N`` (the command line, end to end: pairing, reading, every metric,
  CSV/JSON outputs; the HTML report is skipped as it is not evaluation), and
* MONAI 1.6 on the same pairs: ``compute_dice``, ``compute_iou``, ``compute_hausdorff_distance``
  (and with ``percentile=95``), ``compute_average_surface_distance``, ``compute_surface_dice``
  (``use_subvoxels=True``), with spacing, reading the files with nibabel, in one process,

prints both times, the ratio, and the largest difference between the two sets of values.

Usage:
    python benchmarks/bench_evaluate_hippocampus.py --data-root ../shared/data/msd_hippocampus
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

HERE = Path(__file__).resolve().parent


def perturb(reference_dir: Path, out_dir: Path) -> int:
    from medseg.io import read_volume, write_volume

    out_dir.mkdir(parents=True, exist_ok=True)
    files = sorted(reference_dir.glob("*.nii.gz"))
    for index, path in enumerate(files):
        label = read_volume(path, kind="label")
        array = label.array[0].copy()
        if index % 4 == 0:
            array = np.roll(array, 1, axis=index % 3)
        elif index % 4 == 1:
            array[ndimage.binary_dilation(array == 1) & (array == 0)] = 1
        elif index % 4 == 2:
            array[(array == 2) & ~ndimage.binary_erosion(array == 2)] = 0
        if index == 7:
            array[array == 2] = 0  # one missed structure: status pred_empty
        write_volume(label.with_array(array), out_dir / path.name)
    return len(files)


def monai_suite(reference_dir: Path, prediction_dir: Path) -> tuple[float, pd.DataFrame]:
    import nibabel as nib
    import torch
    from monai.metrics import (
        compute_average_surface_distance,
        compute_dice,
        compute_hausdorff_distance,
        compute_iou,
        compute_surface_dice,
    )

    torch.set_num_threads(2)
    rows = []
    start = time.perf_counter()
    for path in sorted(reference_dir.glob("*.nii.gz")):
        reference = nib.load(str(path))
        ref = np.rint(np.asarray(reference.dataobj)).astype(np.int64)
        pred = np.rint(np.asarray(nib.load(str(prediction_dir / path.name)).dataobj)).astype(np.int64)
        spacing = [float(s) for s in reference.header.get_zooms()[:3]]
        for label in (1, 2):
            r = torch.from_numpy(ref == label)[None, None].double()
            p = torch.from_numpy(pred == label)[None, None].double()
            row = {
                "case_id": path.name[:-7],
                "label": label,
                "dice": float(compute_dice(p, r, include_background=True)),
                "iou": float(compute_iou(p, r, include_background=True)),
            }
            if r.any() and p.any():
                row["hd_mm"] = float(compute_hausdorff_distance(p, r, include_background=True, spacing=spacing))
                row["hd95_mm"] = float(
                    compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=spacing)
                )
                row["assd_mm"] = float(
                    compute_average_surface_distance(p, r, include_background=True, symmetric=True, spacing=spacing)
                )
                row["nsd"] = float(
                    compute_surface_dice(p, r, [1.0], include_background=True, spacing=spacing, use_subvoxels=True)
                )
            rows.append(row)
    return time.perf_counter() - start, pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=HERE.parents[1] / "shared" / "data" / "msd_hippocampus")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-monai", action="store_true")
    args = parser.parse_args()
    manifest = HERE.parent / "data_manifests" / "msd_hippocampus.json"
    with tempfile.TemporaryDirectory(prefix="medseg_bench_") as tmp:
        tmp_path = Path(tmp)
        count = perturb(args.data_root / "labelsTr", tmp_path / "pred")
        command = [
            sys.executable,
            "-m",
            "medseg.cli",
            "evaluate",
            "--reference",
            str(manifest),
            "--data-root",
            str(args.data_root),
            "--prediction",
            str(tmp_path / "pred"),
            "--out",
            str(tmp_path / "eval"),
            "--workers",
            str(args.workers),
            "--no-report",
        ]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        medseg_s = time.perf_counter() - start
        print(f"{count} hippocampus cases, 2 structures each")
        print(
            f"medseg evaluate --workers {args.workers} (CLI, end to end incl. start-up and outputs): {medseg_s:.2f} s"
            f"  (target < 20 s)"
        )
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        print(f"medseg rerun (cached, nothing changed): {time.perf_counter() - start:.2f} s")
        if args.skip_monai:
            return
        monai_s, monai = monai_suite(args.data_root / "labelsTr", tmp_path / "pred")
        print(f"MONAI 1.6 same metrics, one process, 2 torch threads: {monai_s:.2f} s")
        print(f"ratio MONAI / medseg: {monai_s / medseg_s:.1f}x")
        ours = pd.read_csv(tmp_path / "eval" / "per_case.csv")
        ours = ours[ours.label.isin(["1", "2", 1, 2])].copy()
        ours["label"] = ours["label"].astype(int)
        merged = ours.merge(monai, on=["case_id", "label"], suffixes=("", "_monai"))
        for metric in ("dice", "iou", "hd_mm", "hd95_mm", "assd_mm", "nsd"):
            both = merged[[metric, f"{metric}_monai"]].dropna()
            print(
                f"  max |medseg - MONAI| {metric:8s}: {np.abs(both[metric] - both[f'{metric}_monai']).max():.2e} "
                f"over {len(both)} values"
            )


if __name__ == "__main__":
    main()
