"""Benchmark: dynunet, fcn, deeplabv3plus and maskrcnn side by side, each with the same wall-clock budget and fold.

For every dataset x architecture: ``plan_dataset(..., architecture=NAME)`` (the plans as planned,
nothing tuned per architecture), ``train`` fold 0 for ``--budget-min`` minutes of wall time
(``time_limit_min``: the schedule is compressed into it, the final validation included), then
prediction (mirroring TTA on, the run's best checkpoint) and ``medseg`` evaluation:

* ``hippocampus-3d`` / ``hippocampus-2d``: MSD Hippocampus, configuration ``3d`` and the
  slice-wise ``2d``; fold 0's validation cases; Dice per structure.
* ``drive``: DRIVE retina (2D RGB photographs), trained on fold 0 of the 20 training images,
  predicted on the 20 labelled test images, Dice against observer 1 and against observer 2,
  beside observer 2 against observer 1 (the human baseline).

* ``ms-lesions``: the 3 MS-lesion cases (leave one case out: fold 0 trains on two and predicts the
  third), ``dynunet`` (``3d``; instances = connected components, scored for AP by their mean
  probability) against ``maskrcnn`` (``2d`` slice by slice, its own instances linked across slices
  and scored by the detector): lesion-wise F1, PQ, AP50 and AP75 (``--lesion-architectures``).

Reported per row: parameters, iterations, iterations/s, best validation Dice (training's own,
on the preprocessed grid), Dice per structure in the input geometry, predict seconds per case.

The real run needs ``--budget-min 10`` or more (3 architectures x 3 datasets and 2 on MS lesions:
~1.9 h of training plus prediction on 2 CPU cores); run it alone on the machine. Smoke run (minutes)::

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
    "ms-lesions": ("ms_lesions.json", "ms_lesions_lesjak", "", "fold 0 validation"),
}
ARCHITECTURES = ("dynunet", "fcn", "deeplabv3plus")
LESION_ARCHITECTURES = {"dynunet": "3d", "maskrcnn": "2d"}  # maskrcnn plans 2D only: slice by slice
REPO = Path(__file__).resolve().parents[1]


def _plan_and_train(
    dataset: str, architecture: str, config: str, *, data_root: Path, out: Path, budget_min: float
) -> dict[str, Any]:
    """Plan a dataset's manifest for one architecture (as planned, nothing tuned) and train fold 0."""
    from medseg.data.manifest import load_manifest
    from medseg.model.networks import build_network
    from medseg.planning import plan_dataset
    from medseg.training import train

    manifest_name, folder, _, _ = DATASETS[dataset]
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
    if not (work / "run" / "checkpoint_last.pt").is_file():
        raise SystemExit(f"{dataset} / {architecture}: no iteration fitted into {budget_min} min; raise --budget-min")
    return {
        "manifest_path": manifest_path,
        "root": root,
        "work": work,
        "manifest": manifest,
        "cfg": cfg,
        "parameters": parameters,
        "result": result,
    }


def _row(
    dataset: str, architecture: str, config: str, trained: dict[str, Any], *, cases: int, predict_s: float
) -> dict[str, Any]:
    """The columns every row has: the network, the training and the prediction time."""
    import torch

    result = trained["result"]
    return {
        "dataset": dataset,
        "architecture": architecture,
        "config": config,
        "patch_size": trained["cfg"]["patch_size"],
        "parameters": trained["parameters"],
        "iterations": result["iterations"],
        "iterations_per_s": round(result["iterations"] / max(result["elapsed_s"], 1e-9), 3),
        "best_val_dice": round(result["best_dice"], 4),
        "predicted_cases": cases,
        "predict_s_per_case": round(predict_s, 2),
        "torch": torch.__version__,
    }


def run_one(
    dataset: str, architecture: str, *, data_root: Path, out: Path, budget_min: float, max_cases: int | None
) -> dict[str, Any]:
    """Plan, train, predict and evaluate one dataset with one architecture; one result row."""
    import pandas as pd

    from medseg.evaluation import evaluate
    from medseg.inference import Segmenter
    from medseg.io import read_volume, write_volume

    _, _, config, predict_subset = DATASETS[dataset]
    trained = _plan_and_train(dataset, architecture, config, data_root=data_root, out=out, budget_min=budget_min)
    manifest, work = trained["manifest"], trained["work"]
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
    row = _row(dataset, architecture, config, trained, cases=len(cases), predict_s=predict_s)
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


def run_lesions(
    architecture: str, *, data_root: Path, out: Path, budget_min: float, max_cases: int | None
) -> dict[str, Any]:
    """MS lesions with one architecture: plan, train fold 0, predict fold 0's validation case with
    ``predict_batch`` (instances and their scores, as ``medseg predict`` writes them), score lesions."""
    from medseg.evaluation import evaluate
    from medseg.inference.batch import predict_batch

    config = LESION_ARCHITECTURES[architecture]
    trained = _plan_and_train("ms-lesions", architecture, config, data_root=data_root, out=out, budget_min=budget_min)
    manifest, manifest_path, root, work = (trained[k] for k in ("manifest", "manifest_path", "root", "work"))
    cases = list(manifest.fold(0)[1])[: max_cases or None]
    # a manifest of the validation cases alone (same data root, the case ids kept), for predict_batch
    content = json.loads(manifest_path.read_text())
    wanted = {c.case_id: c for c in cases}
    entries = []
    for entry in content["training"]:
        image = (root / entry["image"]).resolve()
        case_id = next((i for i, c in wanted.items() if Path(c.images[0]).resolve() == image), None)
        if case_id is not None:
            entries.append({**entry, "id": case_id})
    subset_manifest = work / "validation_manifest.json"
    subset_manifest.write_text(json.dumps({**content, "training": entries, "test": [], "folds": None}))
    predictions = work / "predictions"
    clock = time.perf_counter()
    predict_batch(
        work / "run",
        subset_manifest,
        predictions,
        data_root=root,
        device="cpu",
        tta=True,
        save_probabilities=architecture != "maskrcnn",
        progress=False,
    )
    predict_s = (time.perf_counter() - clock) / max(len(cases), 1)
    scores = {"scores": predictions / "instances"} if architecture == "maskrcnn" else {}
    probabilities = {"probabilities": predictions / "probabilities"} if architecture != "maskrcnn" else {}
    evaluation = evaluate(
        subset_manifest, predictions, data_root=root, out=work / "evaluation", **scores, **probabilities
    )
    lesions = evaluation.lesion_summary
    row = _row("ms-lesions", architecture, config, trained, cases=len(cases), predict_s=predict_s)
    row["dice_white-matter lesion"] = round(float(evaluation.per_case["dice"].mean()), 4)
    for key in ("lesion_f1", "pq", "ap50", "ap75", "tp", "fp", "fn"):
        if key in lesions:
            row[key] = (
                round(float(lesions[key].mean()), 4) if key not in ("tp", "fp", "fn") else int(lesions[key].sum())
            )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-min", type=float, default=10.0, help="Training wall time per architecture.")
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument(
        "--lesion-architectures",
        nargs="+",
        default=list(LESION_ARCHITECTURES),
        choices=list(LESION_ARCHITECTURES),
        help="Architectures of the ms-lesions rows.",
    )
    parser.add_argument("--max-predict-cases", type=int, default=None, help="Predict only this many cases.")
    parser.add_argument("--out", type=Path, default=Path("bench_architectures"))
    args = parser.parse_args()
    rows = []
    options = dict(data_root=args.data_root, out=args.out, budget_min=args.budget_min, max_cases=args.max_predict_cases)
    for dataset in args.datasets:
        lesions = dataset == "ms-lesions"
        for architecture in args.lesion_architectures if lesions else args.architectures:
            print(f"{dataset} / {architecture}: {args.budget_min} min", flush=True)
            rows.append(run_lesions(architecture, **options) if lesions else run_one(dataset, architecture, **options))
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
