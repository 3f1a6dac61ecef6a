"""Benchmark: dynunet, fcn and deeplabv3plus side by side, each with the same wall-clock budget and fold.

For every dataset x architecture: ``plan_dataset(..., architecture=NAME)`` (the plans as planned,
nothing tuned per architecture), ``train`` fold 0 for ``--budget-min`` minutes of wall time
(``time_limit_min``: the schedule is compressed into it, the final validation included), then
prediction (mirroring TTA on, the run's best checkpoint) and ``medseg`` evaluation:

* ``hippocampus-3d`` / ``hippocampus-2d``: MSD Hippocampus, configuration ``3d`` and the
  slice-wise ``2d``; fold 0's validation cases; Dice per structure.
* ``drive``: DRIVE retina (2D RGB photographs), trained on fold 0 of the 20 training images,
  predicted on the 20 labelled test images, Dice against observer 1 and against observer 2,
  beside observer 2 against observer 1 (the human baseline).

Reported per row: parameters, iterations, iterations/s, best validation Dice (training's own,
on the preprocessed grid), Dice per structure in the input geometry, predict seconds per case.
``maskrcnn`` (instances, MS lesions AP50/AP75) is not part of this benchmark yet.

The real run needs ``--budget-min 10`` or more (3 architectures x 3 datasets: ~1.5 h of training
plus prediction on 2 CPU cores); run it alone on the machine. Smoke run (minutes)::

    python benchmarks/bench_architectures.py --budget-min 0.2 --max-predict-cases 1 --datasets drive \\
        --out /tmp/bench_arch_smoke

Full run::

    python benchmarks/bench_architectures.py --budget-min 10 --data-root ../shared/data --out bench_arch
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

DATASETS = {
    "hippocampus-3d": ("msd_hippocampus.json", "msd_hippocampus", "3d", "training"),
    "hippocampus-2d": ("msd_hippocampus.json", "msd_hippocampus", "2d", "training"),
    "drive": ("drive_retina.json", "drive_retina", "2d", "test_labelled"),
}
ARCHITECTURES = ("dynunet", "fcn", "deeplabv3plus")
REPO = Path(__file__).resolve().parents[1]


def run_one(
    dataset: str, architecture: str, *, data_root: Path, out: Path, budget_min: float, max_cases: int | None
) -> dict[str, Any]:
    """Plan, train, predict and evaluate one dataset with one architecture; one result row."""
    import pandas as pd
    import torch

    from medseg.data.manifest import load_manifest
    from medseg.evaluation import evaluate
    from medseg.inference import Segmenter
    from medseg.io import read_volume, write_volume
    from medseg.model.networks import build_network
    from medseg.planning import plan_dataset
    from medseg.training import train

    manifest_name, folder, config, predict_subset = DATASETS[dataset]
    manifest_path = REPO / "data_manifests" / manifest_name
    root = data_root / folder
    work = out / dataset / architecture
    plans = plan_dataset(manifest_path, data_root=root, out=work / "plans.json", architecture=architecture)
    manifest = load_manifest(manifest_path, data_root=root)
    cfg = plans["configurations"][config]
    network = build_network(cfg, in_channels=len(plans["normalization"]), out_channels=manifest.labels.num_classes)
    parameters = sum(p.numel() for p in network.parameters())
    del network
    result = train(
        manifest, plans=plans, config=config, fold=0, out_dir=work / "run", time_limit_min=budget_min, progress=False
    )
    if not (work / "run" / "checkpoint_best.pt").is_file():
        raise SystemExit(f"{dataset} / {architecture}: no iteration fitted into {budget_min} min; raise --budget-min")
    if predict_subset == "training":
        cases = list(manifest.fold(0)[1])
    else:
        cases = [c for c in manifest.cases if c.subset == predict_subset]
    cases = cases[:max_cases] if max_cases else cases
    segmenter = Segmenter.from_checkpoint(work / "run", device="cpu", tta=True)
    predictions = work / "predictions"
    predictions.mkdir(parents=True, exist_ok=True)
    clock = time.perf_counter()
    for case in cases:
        image = read_volume(case.images[0]) if len(case.images) == 1 else manifest.read_image(case)
        write_volume(segmenter.predict(image), predictions / Path(case.images[0]).name)
    predict_s = (time.perf_counter() - clock) / max(len(cases), 1)
    evaluation = evaluate(manifest, predictions, subset=predict_subset, out=work / "evaluation")
    ids = {c.case_id for c in cases}
    per_case = evaluation.per_case[evaluation.per_case["case_id"].isin(ids)]
    row: dict[str, Any] = {
        "dataset": dataset,
        "architecture": architecture,
        "config": config,
        "patch_size": cfg["patch_size"],
        "parameters": parameters,
        "iterations": result["iterations"],
        "iterations_per_s": round(result["iterations"] / max(result["elapsed_s"], 1e-9), 3),
        "best_val_dice": round(result["best_dice"], 4),
        "predicted_cases": len(cases),
        "predict_s_per_case": round(predict_s, 2),
        "torch": torch.__version__,
    }
    for structure, dice in per_case.groupby("structure")["dice"].mean().items():
        row[f"dice_{structure}"] = round(float(dice), 4)
    if not evaluation.per_rater.empty:
        rater = evaluation.per_rater[evaluation.per_rater["case_id"].isin(ids)]
        for name, dice in rater.groupby("rater")["dice"].mean().items():
            row[f"dice_vs_{name}"] = round(float(dice), 4)
    if not evaluation.inter_rater.empty:
        inter = evaluation.inter_rater[evaluation.inter_rater["case_id"].isin(ids)]
        row["human_baseline_dice"] = round(float(inter["dice"].mean()), 4)
    pd.DataFrame([row]).to_csv(work / "row.csv", index=False)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-min", type=float, default=10.0, help="Training wall time per architecture.")
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--max-predict-cases", type=int, default=None, help="Predict only this many cases.")
    parser.add_argument("--out", type=Path, default=Path("bench_architectures"))
    args = parser.parse_args()
    rows = []
    for dataset in args.datasets:
        for architecture in args.architectures:
            print(f"{dataset} / {architecture}: {args.budget_min} min", flush=True)
            rows.append(
                run_one(
                    dataset,
                    architecture,
                    data_root=args.data_root,
                    out=args.out,
                    budget_min=args.budget_min,
                    max_cases=args.max_predict_cases,
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    first = ["dataset", "architecture"]
    columns = first + sorted({k for r in rows for k in r} - set(first))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [r.get(c, "") for c in columns]
        lines.append("| " + " | ".join("" if isinstance(v, float) and math.isnan(v) else str(v) for v in cells) + " |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
