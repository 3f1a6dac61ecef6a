"""Benchmark: U-Net alone vs U-Net + SAM refinement behind the quality gate (hippocampus, BraTS).

For each dataset with a trained U-Net run (``medseg train``, fold ``--fold``):

1. ``train-sam`` fine-tunes SAM (from ``--sam-start``: ``tiny`` or a SAM/MedSAM checkpoint) on the
   fold's training cases (skipped when ``OUT/sam_<dataset>/config.json`` exists; ``--retrain-sam``);
2. the U-Net predicts the fold's validation cases; the even-numbered ones fit the gate
   (:func:`medseg.refine.fit.fit_cases`, the same code as ``medseg refine fit``), the odd-numbered
   ones are **held out**: refined with the accepted settings (``medseg predict --sam``'s code) and
   scored against the U-Net alone with medseg's evaluation (Dice, HD95, NSD at 1 mm);
3. seconds per held-out case on this machine: U-Net, SAM encoder, SAM decoder, refinement total;
4. the cost of a ViT-B-sized SAM (random weights, ``SamConfig()`` defaults) per 1024 x 1024 slice
   embedding and per decoded prompt.

Structures: hippocampus Anterior and Posterior; BraTS tumour core and enhancing tumour (regions).
Writes ``OUT/bench_refine.json`` and ``OUT/bench_refine.md`` and prints the tables.

Usage (from the repository root; the U-Net runs come from ``medseg plan`` + ``medseg train``)::

    python benchmarks/bench_refine.py --hippo-run runs/hippo/fold_0 --brats-run runs/brats/fold_0 \\
        --sam-start tiny --sam-minutes 20 --out runs/bench_refine --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DATASETS = {
    "hippocampus": {
        "manifest": REPO / "data_manifests" / "msd_hippocampus.json",
        "data_root": SHARED / "msd_hippocampus",
        "structures": ["Anterior", "Posterior"],
    },
    "brats": {
        "manifest": REPO / "data_manifests" / "brats2013.json",
        "data_root": SHARED / "brats2013_deepmedic",
        "structures": ["tumour_core", "enhancing_tumour"],
    },
}


def _mean(values: list[float]) -> float:
    import numpy as np

    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def bench_dataset(name: str, run: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train SAM, fit the gate on half of the fold's validation cases, measure on the other half."""
    from medseg.data.manifest import load_manifest
    from medseg.inference.segmenter import Segmenter
    from medseg.refine.apply import SamRefiner
    from medseg.refine.fit import ValidationCase, fit_cases, sam_fingerprint, score_structure
    from medseg.refine.gate import GateCriteria
    from medseg.refine.loading import load_sam
    from medseg.refine.refine import CostMeter, RefineSetting, refine_case, structure_by_name
    from medseg.refine.train_sam import TrainSamOptions, train_sam

    spec = DATASETS[name]
    manifest = getattr(args, f"{name}_manifest") or spec["manifest"]
    data_root = getattr(args, f"{name}_data_root") or spec["data_root"]
    loaded = load_manifest(manifest, data_root=data_root)
    structures = spec["structures"]
    sam_dir = args.out / f"sam_{name}"
    if args.retrain_sam or not (sam_dir / "config.json").is_file():
        options = TrainSamOptions(
            steps=args.sam_steps,
            time_limit_min=args.sam_minutes,
            max_train_slices=args.sam_slices,
            max_val_slices=args.sam_val_slices,
            device=args.device,
        )
        trained = train_sam(
            args.sam_start,
            manifest=manifest,
            data_root=data_root,
            fold=args.fold,
            out=sam_dir,
            structures=structures,
            options=options,
            progress=False,
        )
        print(
            f"[{name}] train-sam: {trained['steps_done']} steps, {trained['elapsed_s']:.0f} s, slice Dice "
            f"{trained['val_dice_before']:.3f} -> {trained['val_dice_after']:.3f}",
            flush=True,
        )
    backend = load_sam(sam_dir, device=args.device)
    segmenter = Segmenter.from_checkpoint(run, device=args.device, tta=args.tta)
    _, validation = loaded.fold(args.fold)
    validation = validation[: args.max_cases] if args.max_cases else validation
    cases, unet_s = [], {}
    for case in validation:
        image = loaded.read_image(case)
        clock = time.perf_counter()
        unet = segmenter.predict(image)
        unet_s[case.case_id] = time.perf_counter() - clock
        cases.append(ValidationCase(case.case_id, image, loaded.read_label(case), unet))
    fit_half, held_out = cases[0::2], cases[1::2]
    print(f"[{name}] {len(cases)} validation cases: {len(fit_half)} fit the gate, {len(held_out)} held out", flush=True)
    decisions = fit_cases(
        fit_half, labels=segmenter.labels, backend=backend, structures=structures, criteria=GateCriteria()
    )
    refiner = SamRefiner(
        {"structures": decisions, "max_change_fraction": 0.5, "sam": sam_fingerprint(sam_dir)},
        backend,
        labels=segmenter.labels,
    )
    rows: dict[str, dict[str, list[float]]] = {s: {} for s in structures}
    timings = []
    statuses: dict[str, dict[str, str]] = {}
    for case in held_out:
        clock = time.perf_counter()
        refined, status = refiner(case.image, case.unet)
        applied_s = time.perf_counter() - clock
        # SAM's cost whether or not the gate accepted: one default setting on every structure
        meter = CostMeter()
        clock, cpu = time.perf_counter(), time.process_time()
        plan = {s: RefineSetting() for s in structures}
        refine_case(case.image, case.unet, labels=segmenter.labels, plan=plan, backend=backend, meter=meter)
        timings.append(
            {
                "case_id": case.case_id,
                "unet_s": unet_s[case.case_id],
                "encoder_s": meter.encoder_s,
                "decoder_s": meter.decoder_s,
                "refine_total_s": time.perf_counter() - clock,
                "refine_cpu_s": time.process_time() - cpu,
                "slices": meter.slices_embedded,
                "prompts": meter.prompts_decoded,
                "applied_refinement_s": applied_s,
            }
        )
        statuses[case.case_id] = {s: status.get(s, "") for s in structures}
        for structure_name in structures:
            structure = structure_by_name(segmenter.labels, structure_name)
            for label, array in (("unet", case.unet.array[0]), ("refined", refined.array[0])):
                score = score_structure(
                    case.reference, array, structure, case_id=case.case_id, nsd_tolerance_mm=1.0
                ).worst_case_values()
                for metric, value in zip(("dice", "hd95_mm", "nsd"), score):
                    rows[structure_name].setdefault(f"{metric}_{label}", []).append(value)
    table = []
    for structure_name in structures:
        decision = decisions[structure_name]
        values = rows[structure_name]
        table.append(
            {
                "dataset": name,
                "structure": structure_name,
                "gate": decision["decision"],
                "setting_or_reason": decision.get("setting") or decision.get("reason", ""),
                "fit_delta_dice": decision.get("delta_dice", {}).get("mean")
                if decision["decision"] == "accepted"
                else decision.get("best", {}).get("delta_dice", {}).get("mean"),
                "n_held_out": len(held_out),
                **{f"{k}": _mean(v) for k, v in values.items()},
            }
        )
    return {"table": table, "timings": timings, "statuses": statuses, "decisions": decisions}


def vit_b_cost(*, repeats: int, device: str) -> dict[str, float]:
    """Seconds per 1024 x 1024 slice embedding and per decoded box of a ViT-B SAM with random weights."""
    import numpy as np
    import torch
    import transformers

    from medseg.model.device import select_device
    from medseg.refine.backends import ImageTransform, SamImageBackend
    from medseg.refine.protocol import SlicePrompt

    torch.manual_seed(0)
    model = transformers.SamModel(transformers.SamConfig())
    backend = SamImageBackend(
        model, kind="sam", transform=ImageTransform(size=1024, mode="longest_side"), device=select_device(device)
    )
    rgb = (np.random.default_rng(0).random((256, 256, 3)) * 255).astype(np.uint8)
    embedding = backend.embed(rgb)  # warm-up
    clock = time.perf_counter()
    for _ in range(repeats):
        embedding = backend.embed(rgb)
    encoder = (time.perf_counter() - clock) / repeats
    prompt = SlicePrompt(box_rc=(60.0, 70.0, 150.0, 170.0))
    backend.decode(embedding, prompt)
    clock = time.perf_counter()
    for _ in range(repeats * 5):
        backend.decode(embedding, prompt)
    decoder = (time.perf_counter() - clock) / (repeats * 5)
    parameters = sum(p.numel() for p in model.vision_encoder.parameters())
    return {"encoder_s_per_slice": encoder, "decoder_s_per_prompt": decoder, "encoder_parameters": parameters}


def markdown(result: dict[str, Any]) -> str:
    """The result as markdown tables."""
    lines = [
        "| dataset | structure | gate (on fit half) | Dice U-Net | Dice +SAM | HD95 U-Net | HD95 +SAM | NSD@1mm U-Net | "
        "NSD@1mm +SAM | held-out cases |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, data in result["datasets"].items():
        for row in data["table"]:
            gate = f"accepted: {row['setting_or_reason']}" if row["gate"] == "accepted" else "rejected"
            lines.append(
                f"| {name} | {row['structure']} | {gate} | {row['dice_unet']:.4f} | {row['dice_refined']:.4f} | "
                f"{row['hd95_mm_unet']:.2f} | {row['hd95_mm_refined']:.2f} | {row['nsd_unet']:.4f} | "
                f"{row['nsd_refined']:.4f} | {row['n_held_out']} |"
            )
    lines += [
        "",
        "SAM cost per held-out case with one setting on every structure (whether or not the gate accepted it), "
        "and the refinement actually applied after the gate:",
        "",
        "| dataset | U-Net s/case | SAM encoder s | SAM decoder s | SAM total s (CPU s) | slices | prompts | applied s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, data in result["datasets"].items():
        t = data["timings"]
        if t:
            lines.append(
                f"| {name} | {_mean([x['unet_s'] for x in t]):.2f} | {_mean([x['encoder_s'] for x in t]):.2f} | "
                f"{_mean([x['decoder_s'] for x in t]):.2f} | {_mean([x['refine_total_s'] for x in t]):.2f} "
                f"({_mean([x['refine_cpu_s'] for x in t]):.2f}) | {_mean([x['slices'] for x in t]):.1f} | "
                f"{_mean([x['prompts'] for x in t]):.1f} | {_mean([x['applied_refinement_s'] for x in t]):.2f} |"
            )
    if result.get("vit_b"):
        v = result["vit_b"]
        lines += [
            "",
            f"ViT-B SAM (random weights, {v['encoder_parameters'] / 1e6:.0f} M encoder parameters): "
            f"{v['encoder_s_per_slice']:.2f} s per 1024x1024 slice embedding, "
            f"{v['decoder_s_per_prompt'] * 1000:.0f} ms per decoded prompt ({result['device']}, {result['threads']} threads)",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hippo-run", type=Path, help="trained U-Net run folder of the hippocampus fold")
    parser.add_argument("--brats-run", type=Path, help="trained U-Net run folder of the BraTS fold")
    parser.add_argument("--hippocampus-manifest", type=Path, default=None)
    parser.add_argument("--hippocampus-data-root", type=Path, default=None)
    parser.add_argument("--brats-manifest", type=Path, default=None)
    parser.add_argument("--brats-data-root", type=Path, default=None)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_refine"))
    parser.add_argument("--sam-start", default="tiny", help="'tiny' or a SAM/MedSAM checkpoint to fine-tune")
    parser.add_argument("--sam-steps", type=int, default=2000)
    parser.add_argument("--sam-minutes", type=float, default=20.0)
    parser.add_argument("--sam-slices", type=int, default=1000)
    parser.add_argument("--sam-val-slices", type=int, default=100)
    parser.add_argument("--retrain-sam", action="store_true")
    parser.add_argument("--max-cases", type=int, default=None, help="validation cases per dataset (default: all)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--vit-b-repeats", type=int, default=3, help="0: skip the ViT-B timing")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args(argv)
    if not args.hippo_run and not args.brats_run:
        parser.error("give --hippo-run and/or --brats-run (U-Net runs from `medseg train`)")

    import torch

    from medseg.io.files import write_json, write_text

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"device": args.device, "threads": args.threads, "fold": args.fold, "datasets": {}}
    for name, run in (("hippocampus", args.hippo_run), ("brats", args.brats_run)):
        if run is not None:
            result["datasets"][name] = bench_dataset(name, run, args)
    if args.vit_b_repeats > 0:
        result["vit_b"] = vit_b_cost(repeats=args.vit_b_repeats, device=args.device)
    write_json(result, args.out / "bench_refine.json")
    text = markdown(result)
    write_text(text, args.out / "bench_refine.md")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
