"""Benchmark: plan + train fold 0 of MSD Hippocampus on this machine under a wall-clock budget.

Prints per-structure validation Dice (fold 0 validation cases, mean over cases, on the
preprocessed 1 mm grid, which for this dataset is the original grid) beside nnU-Net's published
5-fold cross-validation Dice for ``3d_fullres``, with the time used and the throughput.

Usage (from the repository root)::

    python benchmarks/bench_hippocampus.py --data-root ../shared/data/msd_hippocampus \\
        --time-limit-min 30 --out runs/hippo_bench

The equivalent command lines are ``medseg plan`` then ``medseg train ... --config 3d --fold 0
--time-limit-min 30``; the benchmark only adds the plan edits given by its options (written to
``OUT/plans.json``, so the run can be reproduced with ``medseg train --plans OUT/plans.json``).

The honest protocol, on by default: the manifest's ``test_internal`` cases (for the hippocampus, the
41 cases of fold 4 of nnU-Net's 5-fold split of the 208 shared cases, fixed in
``data_manifests/msd_hippocampus.json``) are never planned on, trained on or validated on; planning,
training and every choice use only the ``training`` cases and their four folds. The final model
(``checkpoint_last``, mirroring TTA, no postprocessing) then predicts the untouched cases once, in
their own geometry, and the script prints their Dice per structure and the mean over structures
with a bootstrap 95 % CI (2000 resamples of cases), beside nnU-Net's 5-fold CV, with the wall time,
the iterations and the peak RSS. The README's recipe (``--fold all``: every training case, no
validation)::

    python benchmarks/bench_hippocampus.py --data-root ../shared/data/msd_hippocampus \
        --time-limit-min 30 --fold all --out runs/hippo_untouched

For a manifest without ``test_internal``, ``--untouched-fold K`` sets the validation cases of fold K
aside before anything else happens (``--fold`` must then differ from K).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import resource
import sys
import time
from pathlib import Path

NNUNET_3D_FULLRES_CV = {"Anterior": 0.8975, "Posterior": 0.8807}
REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, default=REPO / "data_manifests" / "msd_hippocampus.json")
    parser.add_argument("--out", type=Path, default=Path("runs/hippo_bench"))
    parser.add_argument("--time-limit-min", type=float, default=30.0)
    parser.add_argument(
        "--fold",
        default="0",
        help="fold index; 'all': train on every (non-untouched) case; 'all-cv': every fold in turn, each "
        "with --time-limit-min divided by the number of folds, predicted as an ensemble",
    )
    parser.add_argument("--config", default="3d", choices=["3d", "2d"])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-features", type=int, default=16)
    parser.add_argument("--augmentation", default=None, help="augmentation preset (default: medseg plan's)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the plans' batch size")
    parser.add_argument("--optimizer", default=None, choices=["sgd", "adamw"], help="default: the plans'")
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--ema-decay", type=float, default=None, help="EMA of the weights (default: the plans')")
    parser.add_argument(
        "--precision", default=None, choices=["auto", "mixed", "float32"], help="default: medseg train's"
    )
    parser.add_argument("--iterations-per-epoch", type=int, default=None)
    parser.add_argument("--validate-every", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument(
        "--untouched-fold",
        type=int,
        default=None,
        help="hold out this fold's validation cases from planning and training, and report Dice on them "
        "at the end (the honest protocol; see the module docstring)",
    )
    parser.add_argument(
        "--evaluate-tta",
        action="store_true",
        help="afterwards, predict the validation cases in their own geometry with and without "
        "mirroring TTA (as nnU-Net's validation does) and score them with medseg's evaluation",
    )
    args = parser.parse_args(argv)
    if args.fold not in ("all", "all-cv"):
        if not args.fold.isdigit():
            parser.error(f"--fold must be a number, 'all' or 'all-cv', got {args.fold!r}")
        args.fold = int(args.fold)

    import torch

    from medseg.data.manifest import load_manifest
    from medseg.io.files import write_json as save_json
    from medseg.planning import fingerprint_dataset, load_plans, make_plans
    from medseg.training import train

    torch.set_num_threads(args.threads)
    manifest = load_manifest(args.manifest, data_root=args.data_root)
    untouched: tuple = tuple(case for case in manifest.cases if case.subset == "test_internal" and case.label)
    if untouched and args.untouched_fold is not None:
        parser.error(f"{args.manifest.name} fixes its untouched split (test_internal): drop --untouched-fold")
    if untouched:
        print(
            f"untouched split: the manifest's {len(untouched)} test_internal cases; planning and training use its "
            f"{sum(case.subset == 'training' for case in manifest.cases)} training cases",
            flush=True,
        )
    elif isinstance(args.fold, str):
        parser.error("--fold all/all-cv has no validation of its own: use it with an untouched split")
    if args.untouched_fold is not None:
        if args.untouched_fold == args.fold:
            parser.error("--fold must differ from --untouched-fold: its cases are never trained or validated on")
        untouched = manifest.fold(args.untouched_fold)[1]
        held_out = {case.case_id for case in untouched}
        manifest = manifest.select([case.case_id for case in manifest.cases if case.case_id not in held_out])
        if args.fold == "all-cv":  # the untouched fold is left empty: the ensemble has one fold fewer
            manifest = dataclasses.replace(manifest, folds=tuple(f for f in manifest.folds if f))
        print(
            f"untouched split: {len(untouched)} cases of fold {args.untouched_fold}; planning and training use "
            f"the other {len(manifest.cases)}",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    plans_path = args.out / "plans.json"
    start = time.monotonic()
    if args.resume and plans_path.is_file():
        plans = load_plans(plans_path)
    else:
        fingerprint = fingerprint_dataset(manifest, workers=args.threads)
        plans = make_plans(
            fingerprint,
            base_features=args.base_features,
            **({"augmentation": args.augmentation} if args.augmentation else {}),
        )
        if args.optimizer:
            plans["training"]["optimizer"] = args.optimizer
        if args.learning_rate is not None:
            plans["training"]["learning_rate"] = args.learning_rate
        if args.batch_size:
            plans["configurations"][args.config]["batch_size"] = args.batch_size
        save_json(fingerprint, args.out / "fingerprint.json")
        save_json(plans, plans_path)
    plan_s = time.monotonic() - start
    run_dir = args.out / f"fold_{args.fold}"
    time_limit_min = args.time_limit_min
    if args.fold == "all-cv":  # the same total budget, shared by the folds
        time_limit_min = args.time_limit_min / len(manifest.folds)
    results = train(
        manifest,
        plans=plans,
        config=args.config,
        fold=args.fold,
        out_dir=run_dir,
        time_limit_min=time_limit_min,
        device=args.device,
        seed=args.seed,
        resume=args.resume,
        iterations_per_epoch=args.iterations_per_epoch,
        validate_every=args.validate_every,
        ema_decay=args.ema_decay,
        precision=args.precision,
    )
    total_s = time.monotonic() - start
    # all-cv: the folds' figures summed (iterations, time) and the first fold's validation shown
    result = results[0] if isinstance(results, list) else results
    histories = [Path(r["out_dir"]) / "history.csv" for r in (results if isinstance(results, list) else [results])]
    per_run = [list(csv.DictReader(open(path))) for path in histories]
    rows = [row for run in per_run for row in run]
    epoch_times = [float(r["epoch_time_s"]) for r in rows]
    iterations = sum(int(run[-1]["iteration"]) for run in per_run if run)
    train_s = sum(epoch_times)
    cfg = plans["configurations"][args.config]
    print()
    print(
        f"MSD Hippocampus, fold {args.fold}, config {args.config}, device {result.get('device', args.device)}, "
        f"{torch.get_num_threads()} threads, precision {args.precision}"
    )
    print(
        f"patch {cfg['patch_size']}, batch {cfg['batch_size']}, filters {cfg['network']['filters']}, "
        f"optimizer {plans['training']['optimizer']} lr {plans['training']['learning_rate']}"
    )
    print(f"augmentation probabilities {plans.get('augmentation', 'nnU-Net defaults')}")
    if args.fold == "all":
        print("fold all: every training case, no validation of its own (the untouched split below scores it)")
    else:
        print(f"{'structure':<12}{'medseg':>10}{'nnU-Net 3d_fullres CV':>24}")
        final = result["final_dice"]
        for name, reference in NNUNET_3D_FULLRES_CV.items():
            print(f"{name:<12}{final.get(name, float('nan')):>10.4f}{reference:>24.4f}")
        reference_mean = sum(NNUNET_3D_FULLRES_CV.values()) / len(NNUNET_3D_FULLRES_CV)
        print(f"{'mean':<12}{final.get('mean', float('nan')):>10.4f}{reference_mean:>24.4f}")
        print(f"best mean validation Dice {result['best_dice']:.4f} at epoch {result['best_epoch']}")
    print(
        f"time: planning {plan_s:.0f} s, training budget {args.time_limit_min} min, training loop "
        f"{result['elapsed_s']:.0f} s, total {total_s:.0f} s; peak RSS of this process "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    )
    if iterations and train_s:
        per_epoch = args.iterations_per_epoch or plans["training"]["iterations_per_epoch"]
        print(
            f"throughput: {iterations} iterations (batch {cfg['batch_size']}) in {len(rows)} epochs of up to "
            f"{per_epoch}, {iterations / train_s:.2f} it/s ({train_s / iterations:.2f} s/it, "
            f"{per_epoch * train_s / iterations:.0f} s per full epoch, validation excluded)"
        )
    val_times = [float(r["val_time_s"]) for r in rows if r.get("val_time_s")]
    if val_times:
        print(f"validation: {len(val_times)} runs, {val_times[-1]:.0f} s each ({result.get('device')})")
    if untouched:
        started = time.monotonic()
        per_case = case_dice(run_dir, manifest, untouched, tta=True)
        print(
            f"\nuntouched split: {len(untouched)} cases never used for any choice, checkpoint_last"
            f"{' of every fold (ensemble)' if args.fold == 'all-cv' else ''}, TTA, "
            f"no postprocessing, input geometry ({time.monotonic() - started:.0f} s)"
        )
        print(f"{'structure':<12}{'medseg':>10}{'95% CI':>20}{'nnU-Net 3d_fullres CV':>24}")
        references = {**NNUNET_3D_FULLRES_CV, "mean": sum(NNUNET_3D_FULLRES_CV.values()) / len(NNUNET_3D_FULLRES_CV)}
        for name, (mean, low, high) in bootstrap_means(per_case).items():
            print(f"{name:<12}{mean:>10.4f}{f'[{low:.4f}, {high:.4f}]':>20}{references.get(name, float('nan')):>24.4f}")
    if args.evaluate_tta:
        for tta in (False, True):
            started = time.monotonic()
            scores = validation_dice(run_dir, manifest, fold=args.fold, tta=tta)
            print(
                f"final model, input geometry, medseg evaluation, {'with' if tta else 'without'} mirroring TTA: "
                + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
                + f" ({time.monotonic() - started:.0f} s)"
            )
    return 0


def case_dice(run_dir: Path, manifest, cases, *, tta: bool) -> dict[str, list[float]]:
    """Dice per structure and case of the run's final checkpoint, each case predicted in its own
    geometry and scored by the evaluation engine."""
    from medseg.evaluation import EvaluationSettings, evaluate_pair
    from medseg.inference import Segmenter
    from medseg.io import read_channels, read_volume

    segmenter = Segmenter.from_checkpoint(run_dir, which="last", tta=tta, postprocessing=None)
    settings = EvaluationSettings(labels=manifest.labels, include_regions=False)
    dice: dict[str, list[float]] = {}
    for case in cases:
        prediction = segmenter.predict(read_channels(case.images), postprocess=False)
        for row in evaluate_pair(read_volume(case.label), prediction, settings=settings, case_id=case.case_id).rows:
            dice.setdefault(row["structure"], []).append(float(row["dice"]))
    return dice


def bootstrap_means(per_case: dict[str, list[float]], *, resamples: int = 2000, seed: int = 0) -> dict:
    """``{structure or "mean": (mean, CI low, CI high)}``: the 95 % percentile bootstrap over cases;
    "mean" is the per-case mean over structures, resampled the same way."""
    import numpy as np

    table = np.array([per_case[name] for name in per_case], dtype=np.float64).T  # (cases, structures)
    columns = {name: table[:, k] for k, name in enumerate(per_case)}
    columns["mean"] = np.nanmean(table, axis=1)
    picks = np.random.default_rng(seed).integers(0, len(table), size=(resamples, len(table)))
    result = {}
    for name, values in columns.items():
        means = np.nanmean(values[picks], axis=1)
        result[name] = (float(np.nanmean(values)), *(float(q) for q in np.percentile(means, [2.5, 97.5])))
    return result


def validation_dice(run_dir: Path, manifest, *, fold: int, tta: bool) -> dict[str, float]:
    """Mean Dice per structure (and their mean) of the run's final checkpoint over the fold's
    validation cases, predicted in each image's own geometry and scored by the evaluation engine."""
    import numpy as np

    dice = case_dice(run_dir, manifest, manifest.fold(fold)[1], tta=tta)
    means = {name: float(np.nanmean(values)) for name, values in dice.items()}
    means["mean"] = float(np.mean(list(means.values())))
    return means


if __name__ == "__main__":
    sys.exit(main())
