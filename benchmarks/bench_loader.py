"""Benchmark: training iterations/s with the batches made on the training thread or in background workers.

The same data, plans, seed and wall-clock budget are trained once per loader setting
(``loader_workers=0``: sampling, augmentation and preprocessing of uncached cases on the training
thread; ``1``: in a background MONAI ``DataLoader`` process that prepares the next batches while the
network trains), and the throughput is read from each run's ``history.csv``: iterations over the
summed epoch times (validation excluded), overall and after the first epoch (start-up excluded).
On CUDA the peak GPU memory of each run is printed too.

Usage (from the repository root; run it alone on the machine, it is a timing)::

    python benchmarks/bench_loader.py --data-root ../shared/data/msd_hippocampus \\
        --time-limit-min 3 --out runs/bench_loader

A quick smoke run without data: ``python benchmarks/bench_loader.py --synthetic 6 --time-limit-min 0.2
--base-features 4 --out /tmp/bench_loader``. The same comparison on the command line is
``medseg train ... --time-limit-min 3 --loader-workers 0`` against ``--loader-workers 1``.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data-root", type=Path, help="data root of --manifest (e.g. ../shared/data/msd_hippocampus)")
    data.add_argument("--synthetic", type=int, metavar="N", help="instead: N synthetic training cases (smoke runs)")
    parser.add_argument("--manifest", type=Path, default=REPO / "data_manifests" / "msd_hippocampus.json")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_loader"), help="a new folder")
    parser.add_argument("--time-limit-min", type=float, default=3.0, help="training budget of each run")
    parser.add_argument("--loader-workers", default="0,1", help="settings to compare, comma-separated")
    parser.add_argument("--config", default="3d", choices=["3d", "2d"])
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch CPU threads")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-features", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the plans'")
    parser.add_argument("--iterations-per-epoch", type=int, default=25, help="short epochs: several fit the budget")
    args = parser.parse_args(argv)
    settings = [int(w) for w in args.loader_workers.split(",")]
    if args.out.exists():
        parser.error(f"{args.out} exists; give a new --out folder")

    import torch

    from medseg.data.manifest import load_manifest
    from medseg.io.files import write_json
    from medseg.planning import fingerprint_dataset, make_plans
    from medseg.training import train

    torch.set_num_threads(args.threads)
    if args.synthetic:
        from medseg.apps.demo import make_synthetic_dataset

        manifest = load_manifest(make_synthetic_dataset(args.out / "data", num_training=args.synthetic, num_test=0))
    else:
        manifest = load_manifest(args.manifest, data_root=args.data_root)
    plans = make_plans(fingerprint_dataset(manifest, workers=args.threads), base_features=args.base_features)
    if args.batch_size:
        plans["configurations"][args.config]["batch_size"] = args.batch_size
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(plans, args.out / "plans.json")
    cfg = plans["configurations"][args.config]

    results = []
    for workers in settings:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        started = time.monotonic()
        run = args.out / f"loader_workers_{workers}"
        result = train(
            manifest,
            plans=plans,
            config=args.config,
            fold=args.fold,
            out_dir=run,
            time_limit_min=args.time_limit_min,
            device=args.device,
            seed=args.seed,
            num_threads=args.threads,
            loader_workers=workers,
            iterations_per_epoch=args.iterations_per_epoch,
            validate_every=10**6,  # only the final validation, outside the timed epochs
            progress=False,
        )
        with open(run / "history.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        iterations = [int(r["iteration"]) for r in rows]
        seconds = [float(r["epoch_time_s"]) for r in rows]
        steady_iterations = iterations[-1] - iterations[0] if len(rows) > 1 else 0
        results.append(
            {
                "workers": workers,
                "epochs": len(rows),
                "iterations": iterations[-1] if rows else 0,
                "train_s": sum(seconds),
                "it_s": iterations[-1] / sum(seconds) if rows else float("nan"),
                "steady_it_s": steady_iterations / sum(seconds[1:]) if steady_iterations else float("nan"),
                "gpu_gib": torch.cuda.max_memory_allocated() / 1024**3 if torch.cuda.is_available() else None,
                "device": result["device"],
                "wall_s": time.monotonic() - started,
            }
        )

    print()
    print(
        f"{manifest.name}, fold {args.fold}, config {args.config}, device {results[0]['device']}, "
        f"{args.threads} torch threads, {len(os.sched_getaffinity(0))} cores; patch {cfg['patch_size']}, "
        f"batch {cfg['batch_size']}, filters {cfg['network']['filters']}; {args.time_limit_min} min per run"
    )
    header = f"{'loader workers':>15}{'epochs':>8}{'iterations':>12}{'train s':>9}{'it/s':>8}{'it/s after epoch 1':>20}"
    print(header + (f"{'peak GPU GiB':>14}" if results[0]["gpu_gib"] is not None else ""))
    for r in results:
        line = (
            f"{r['workers']:>15}{r['epochs']:>8}{r['iterations']:>12}{r['train_s']:>9.1f}"
            f"{r['it_s']:>8.2f}{r['steady_it_s']:>20.2f}"
        )
        print(line + (f"{r['gpu_gib']:>14.2f}" if r["gpu_gib"] is not None else ""))
    if len(results) > 1 and results[0]["it_s"] > 0:
        for r in results[1:]:
            print(
                f"loader workers {r['workers']} vs {results[0]['workers']}: {r['it_s'] / results[0]['it_s']:.2f}x it/s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
