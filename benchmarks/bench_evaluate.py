"""Benchmark: medseg's per-structure evaluation suite against MONAI's metric functions.

Builds a synthetic CT-like label volume (default 512 x 512 x 300 voxels at 0.8 x 0.8 x 1.5 mm) with 20
non-overlapping, irregular ellipsoids of organ-like sizes, and a prediction in which structures are dilated, eroded,
shifted, partly over-segmented, one has a false-positive island far away and the last one is missing. Then:

1. medseg, in a fresh subprocess (so its peak RSS is its own): one confusion-matrix pass
   (:func:`medseg.metrics.overlap.confusion_matrix`) + Dice / IoU / volumes per structure + HD, HD95, ASSD and NSD
   (1 mm) for every structure (:func:`medseg.metrics.surface.surface_metrics_multi`). Best of ``--repeats`` runs,
   then one more run under ``tracemalloc`` for the peak of numpy allocations.
2. MONAI (``compute_dice``, ``compute_iou``, ``compute_hausdorff_distance`` (plain and ``percentile=95``),
   ``compute_average_surface_distance(symmetric=True)``, ``compute_surface_dice(use_subvoxels=True)``) on one-hot
   boolean channels (``(1, 1, *shape)`` per structure: what MONAI's own per-channel loop sees), on
   ``--monai-structures`` structures spread over the size range plus the one with the false-positive island; the
   total for all structures is extrapolated (island structure as measured + the mean of the others times the
   remaining count) and the printout says so. ``--monai-structures 0`` runs MONAI on every structure.
3. Agreement of every value on the structures MONAI ran.

4. With ``--cli``: the whole ``medseg evaluate`` command as a user runs it, in a fresh process each time (imports,
   reading the two NIfTI files, scoring, the tables, ``summary.json`` and ``report.html``; and once more with
   ``--no-report``), best wall time of ``--repeats``, against MONAI's Dice + HD95 + NSD functions on the same pair
   (every structure unless ``--monai-structures`` says otherwise), and their ratio.

Usage::

    python benchmarks/bench_evaluate.py --cli                # 320 x 320 x 200, 16 structures, whole CLI vs MONAI
    python benchmarks/bench_evaluate.py                      # default volume, MONAI on 5 structures
    python benchmarks/bench_evaluate.py --size 256,256,120 --structures 10 --monai-structures 0
    python benchmarks/bench_evaluate.py --skip-monai
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage

SPACING = (0.8, 0.8, 1.5)
NSD_TOLERANCE_MM = 1.0
KEYS = ("dice", "iou", "hd_mm", "hd95_mm", "assd_mm", "nsd")


# --------------------------------------------------------------------------- synthetic data
def make_case(
    shape: tuple[int, int, int], n_structures: int, *, seed: int = 0, spacing: tuple[float, ...] = SPACING
) -> tuple[np.ndarray, np.ndarray]:
    """Reference and prediction label maps (uint8) with ``n_structures`` irregular ellipsoids."""
    rng = np.random.default_rng(seed)
    sp = np.asarray(spacing)
    dims = np.asarray(shape)
    ref = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    taken: list[tuple[np.ndarray, np.ndarray]] = []
    shapes: list[tuple[int, tuple[slice, ...], np.ndarray]] = []
    # organ-like semi-axes in mm, largest first (liver, spleen-sized, kidney-sized, vessels/glands, small nodes)
    classes = [(95, 75, 80), (75, 60, 65)] + [(45, 40, 50)] * 4 + [(30, 28, 32)] * 6 + [(12, 10, 14)] * 8
    classes = (classes * (n_structures // len(classes) + 1))[:n_structures]
    scale = min(1.0, float(min(dims * sp)) / 410.0)
    for label in range(1, n_structures + 1):
        for _attempt in range(2000):
            semi_mm = np.asarray(classes[label - 1]) * scale * rng.uniform(0.85, 1.15, size=3)
            semi = np.minimum(semi_mm / sp, dims / 2 - 6)
            centre = np.array([rng.uniform(semi[i] + 5, dims[i] - semi[i] - 5) for i in range(3)])
            lo = np.maximum(np.floor(centre - 1.2 * semi).astype(int) - 4, 0)
            hi = np.minimum(np.ceil(centre + 1.2 * semi).astype(int) + 5, dims)
            if all(np.any(hi <= a) or np.any(lo >= b) for a, b in taken):
                break
        else:
            raise RuntimeError(f"could not place structure {label}; use fewer structures or a larger --size")
        taken.append((lo, hi))
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        grid = np.ogrid[box]
        rel = [(g - c) / s for g, c, s in zip(grid, centre, semi)]
        radius = np.sqrt(rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2)
        theta = np.arctan2(rel[1], rel[0])
        phi = np.arccos(np.clip(rel[2] / np.maximum(radius, 1e-9), -1.0, 1.0))
        k1, k2 = rng.integers(2, 5, size=2)
        wobble = 1 + rng.uniform(0.05, 0.15) * np.sin(k1 * theta + rng.uniform(0, 6)) * np.sin(k2 * phi)
        mask = radius <= wobble
        ref[box][mask] = label
        shapes.append((label, box, mask))
    for label, box, mask in shapes:
        if label == n_structures:
            continue  # missing structure
        kind = label % 5
        if kind == 0:
            predicted = ndimage.binary_dilation(mask)
        elif kind == 1:
            predicted = ndimage.binary_erosion(mask)
        elif kind == 2:
            predicted = np.roll(mask, 2, axis=0)
        elif kind == 3:
            predicted = np.roll(mask, (1, -1, 1), axis=(0, 1, 2))
        else:
            predicted = mask.copy()
            third = mask.shape[2] // 3
            predicted[..., :third] = ndimage.binary_dilation(mask[..., :third], iterations=2)
        pred[box][predicted] = label
    if n_structures >= 3:  # a false-positive island of structure 3 in the first free corner
        for corner in ((0, 0, 0), (1, 1, 1), (0, 1, 1), (1, 0, 0)):
            start = np.where(corner, dims - 12, 2)
            island = tuple(slice(int(s), int(s) + 8) for s in start)
            if not ref[island].any() and not pred[island].any():
                pred[island] = 3
                break
    return ref, pred


# --------------------------------------------------------------------------- medseg (subprocess)
def run_medseg(ref: np.ndarray, pred: np.ndarray, labels: list[int]) -> dict[int, dict[str, float]]:
    """The evaluation suite as evaluate.py runs it: one confusion pass + all surface metrics."""
    from medseg.metrics.overlap import confusion_matrix, overlap_from_counts
    from medseg.metrics.surface import surface_metrics_multi

    num_classes = max(int(ref.max()), int(pred.max()), max(labels)) + 1
    cm = confusion_matrix(ref, pred, num_classes=num_classes)
    voxel_ml = float(np.prod(SPACING)) / 1000.0
    rows: dict[int, dict[str, float]] = {}
    ok = []
    for label in labels:
        tp = int(cm[label, label])
        row = overlap_from_counts(
            tp=tp, fp=int(cm[:, label].sum()) - tp, fn=int(cm[label].sum()) - tp, voxel_volume_ml=voxel_ml
        )
        rows[label] = dict(row)
        if row["status"] == "ok":
            ok.append(label)
    surfaces = surface_metrics_multi(ref, pred, labels=ok, spacing_mm=SPACING, nsd_tolerance_mm=NSD_TOLERANCE_MM)
    for label in labels:
        rows[label].update(surfaces.get(label, dict.fromkeys(("hd_mm", "hd95_mm", "assd_mm", "nsd"), math.nan)))
    return rows


def _status_mib(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` (peak RSS of this process image) from /proc/self/status, in MiB.

    ``getrusage().ru_maxrss`` is not used: Linux carries the parent's peak over fork + exec into it.
    """
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return math.nan


def medseg_worker(data: Path, repeats: int) -> None:
    """Subprocess entry: load the arrays, time the suite, measure memory, print JSON on stdout."""
    import tracemalloc

    ref = np.load(data / "ref.npy")
    pred = np.load(data / "pred.npy")
    labels = [int(v) for v in np.load(data / "labels.npy")]
    import medseg.metrics.overlap  # noqa: F401  (imports outside the timing)
    import medseg.metrics.surface  # noqa: F401

    rss_before = _status_mib("VmRSS")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        rows = run_medseg(ref, pred, labels)
        times.append(time.perf_counter() - start)
    peak_rss = _status_mib("VmHWM")
    tracemalloc.start()
    run_medseg(ref, pred, labels)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # split timing of the two stages (one more run, outside the best-of)
    from medseg.metrics.overlap import confusion_matrix
    from medseg.metrics.surface import surface_metrics_multi

    start = time.perf_counter()
    confusion_matrix(ref, pred, num_classes=max(labels) + 1)
    t_confusion = time.perf_counter() - start
    start = time.perf_counter()
    surface_metrics_multi(ref, pred, labels=labels, spacing_mm=SPACING, nsd_tolerance_mm=NSD_TOLERANCE_MM)
    t_surface = time.perf_counter() - start
    json.dump(
        {
            "times_s": times,
            "confusion_s": t_confusion,
            "surface_s": t_surface,
            "rss_before_mib": rss_before,
            "peak_rss_mib": peak_rss,
            "traced_peak_mib": traced_peak / 2**20,
            "rows": {str(k): v for k, v in rows.items()},
        },
        sys.stdout,
    )


# --------------------------------------------------------------------------- MONAI
def run_monai(ref: np.ndarray, pred: np.ndarray, label: int) -> tuple[dict[str, float], float]:
    """MONAI's functions on the one-hot channel of one structure; returns values and seconds (metrics only)."""
    import torch
    from monai.metrics import (
        compute_average_surface_distance,
        compute_dice,
        compute_hausdorff_distance,
        compute_iou,
        compute_surface_dice,
    )

    r = torch.from_numpy(ref == label)[None, None]
    p = torch.from_numpy(pred == label)[None, None]
    common = {"include_background": True}
    spacing = list(SPACING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        values = {
            "dice": compute_dice(p.float(), r.float(), **common).item(),
            "iou": compute_iou(p.float(), r.float(), **common).item(),
            "hd_mm": compute_hausdorff_distance(p, r, spacing=spacing, **common).item(),
            "hd95_mm": compute_hausdorff_distance(p, r, percentile=95, spacing=spacing, **common).item(),
            "assd_mm": compute_average_surface_distance(p, r, symmetric=True, spacing=spacing, **common).item(),
            "nsd": compute_surface_dice(p, r, [NSD_TOLERANCE_MM], spacing=spacing, use_subvoxels=True, **common).item(),
        }
        elapsed = time.perf_counter() - start
    return values, elapsed


# --------------------------------------------------------------------------- whole CLI
def run_monai_dice_hd95_nsd(ref: np.ndarray, pred: np.ndarray, label: int) -> float:
    """Seconds MONAI's ``compute_dice`` + ``compute_hausdorff_distance(percentile=95)`` + ``compute_surface_dice``
    take on one structure (one-hot boolean channels, as MONAI's per-channel loop sees them)."""
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    r = torch.from_numpy(ref == label)[None, None]
    p = torch.from_numpy(pred == label)[None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        compute_dice(p.float(), r.float(), include_background=True)
        compute_hausdorff_distance(p, r, percentile=95, spacing=list(SPACING), include_background=True)
        compute_surface_dice(
            p, r, [NSD_TOLERANCE_MM], spacing=list(SPACING), use_subvoxels=True, include_background=True
        )
        return time.perf_counter() - start


def cli_benchmark(args: argparse.Namespace, shape: tuple[int, int, int]) -> int:
    """Time ``medseg evaluate`` as whole processes on one NIfTI pair, and MONAI's three functions on it."""
    import nibabel as nib

    ref, pred = make_case(shape, args.structures, seed=args.seed)
    labels = list(range(1, args.structures + 1))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        affine = np.diag([*SPACING, 1.0])
        for name, array in (("ref", ref), ("pred", pred)):
            (root / name).mkdir()
            nib.save(nib.Nifti1Image(array, affine), root / name / "case_0001.nii.gz")
        names = {"0": "background", **{str(i): f"structure_{i:02d}" for i in labels}}
        (root / "labels.json").write_text(json.dumps({"name": "bench", "labels": names, "training": []}))
        medseg = Path(sys.executable).with_name("medseg")
        command = [str(medseg)] if medseg.exists() else [sys.executable, "-m", "medseg"]
        command += ["evaluate", "--reference", str(root / "ref"), "--prediction", str(root / "pred")]
        command += ["--labels", str(root / "labels.json")]
        timings: dict[str, list[float]] = {"with report.html": [], "--no-report": []}
        # as on a user's machine, Python's compiled bytecode is used: PYTHONDONTWRITEBYTECODE (set on some CI
        # machines) would make every process compile medseg's sources again (about 0.1 s); one untimed run
        # writes the bytecode first
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        subprocess.run(command + ["--out", str(root / "warm_up")], capture_output=True, text=True, env=env)
        for repeat in range(args.repeats):
            for variant, extra in (("with report.html", []), ("--no-report", ["--no-report"])):
                out = root / f"out_{repeat}_{len(extra)}"  # a fresh folder: no cached results
                start = time.perf_counter()
                proc = subprocess.run(command + ["--out", str(out), *extra], capture_output=True, text=True, env=env)
                timings[variant].append(time.perf_counter() - start)
                if proc.returncode != 0:
                    print(proc.stdout + proc.stderr, file=sys.stderr)
                    return proc.returncode
        report_kib = (root / "out_0_0" / "report.html").stat().st_size / 1024
    sizes_mib = (ref.nbytes + pred.nbytes) / 2**20
    print(
        f"pair {shape} uint8 ({sizes_mib:.0f} MiB as arrays), {args.structures} structures; load average "
        f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (other processes slow every timing)"
    )
    best = {variant: min(values) for variant, values in timings.items()}
    for variant, values in timings.items():
        print(
            f"  medseg evaluate ({variant}), whole process: best {best[variant]:.2f} s of "
            f"{', '.join(f'{v:.2f}' for v in values)}"
        )
    print(
        f"  report.html: {report_kib:.0f} KiB; the report's share: {best['with report.html'] - best['--no-report']:.2f} s"
    )
    if args.skip_monai:
        return 0
    picks = labels if args.monai_structures in (0, None) else labels[:: max(1, len(labels) // args.monai_structures)]
    monai_times = [run_monai_dice_hd95_nsd(ref, pred, label) for label in picks]
    monai_all = float(np.mean(monai_times)) * len(labels)
    measured = len(picks) == len(labels)
    print(
        f"  MONAI compute_dice + compute_hausdorff_distance(95) + compute_surface_dice on {len(picks)} structures: "
        f"{sum(monai_times):.1f} s" + ("" if measured else f"; extrapolated to {len(labels)}: {monai_all:.1f} s")
    )
    print(
        f"ratio MONAI's three metric functions / whole medseg process with report: "
        f"{monai_all / best['with report.html']:.1f}x ({'measured' if measured else 'MONAI extrapolated'})"
    )
    return 0


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="512,512,300", help="volume shape, e.g. 512,512,300")
    parser.add_argument("--structures", type=int, default=20, help="number of structures")
    parser.add_argument("--skip-monai", action="store_true", help="time medseg only")
    parser.add_argument(
        "--monai-structures",
        type=int,
        default=5,
        help="structures MONAI runs on (spread over sizes; the total is extrapolated); 0 = all",
    )
    parser.add_argument("--repeats", type=int, default=3, help="medseg timing repeats (best is reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cli",
        action="store_true",
        help="time the whole `medseg evaluate` process (default --size 320,320,200 --structures 16) against MONAI",
    )
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        medseg_worker(args.worker, args.repeats)
        return 0

    if args.cli:  # the case: a 320 x 320 x 200 pair with 16 structures, unless asked otherwise
        args.size = "320,320,200" if args.size == parser.get_default("size") else args.size
        args.structures = 16 if args.structures == parser.get_default("structures") else args.structures
        args.monai_structures = (
            0 if args.monai_structures == parser.get_default("monai_structures") else args.monai_structures
        )
    shape = tuple(int(v) for v in args.size.split(","))
    if len(shape) != 3 or min(shape) < 16:
        parser.error(f"--size must be three integers >= 16, got {args.size!r}")
    if args.cli:
        return cli_benchmark(args, shape)  # type: ignore[arg-type]
    start = time.perf_counter()
    ref, pred = make_case(shape, args.structures, seed=args.seed)  # type: ignore[arg-type]
    labels = list(range(1, args.structures + 1))
    sizes = np.bincount(ref.ravel(), minlength=args.structures + 1)[1:]
    print(
        f"volume {shape} uint8, spacing {SPACING} mm, {args.structures} structures "
        f"({sizes.min()}..{sizes.max()} voxels, {100 * (ref > 0).mean():.1f}% foreground), "
        f"built in {time.perf_counter() - start:.1f} s"
    )
    label_mib = (ref.nbytes + pred.nbytes) / 2**20
    print(
        f"the two label arrays: {label_mib:.0f} MiB; cpu cores: {os.cpu_count()}; "
        f"load average before timing: {os.getloadavg()[0]:.2f} (other processes slow every timing)"
    )

    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "ref.npy", ref)
        np.save(Path(tmp) / "pred.npy", pred)
        np.save(Path(tmp) / "labels.npy", np.asarray(labels))
        env = dict(os.environ)
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", tmp, "--repeats", str(args.repeats)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        return proc.returncode
    result = json.loads(proc.stdout)
    medseg_rows = {int(k): v for k, v in result["rows"].items()}
    best = min(result["times_s"])
    extra_rss = result["peak_rss_mib"] - result["rss_before_mib"]
    print(f"\nmedseg (subprocess; load average now {os.getloadavg()[0]:.2f})")
    print(
        f"  full suite, {args.structures} structures: best {best:.3f} s of {args.repeats} "
        f"({', '.join(f'{t:.3f}' for t in result['times_s'])})"
    )
    print(
        f"  of which confusion matrix {result['confusion_s']:.3f} s, surface metrics {result['surface_s']:.3f} s "
        "(separate run)"
    )
    print(
        f"  peak numpy allocations (tracemalloc): {result['traced_peak_mib']:.0f} MiB "
        f"= {result['traced_peak_mib'] / label_mib:.2f} x the label arrays"
    )
    print(
        f"  peak RSS {result['peak_rss_mib']:.0f} MiB, {extra_rss:.0f} MiB above the RSS after loading "
        f"({extra_rss / label_mib:.2f} x the label arrays)"
    )

    if args.skip_monai:
        return 0
    order = np.argsort(sizes)
    count = len(labels) if args.monai_structures in (0, None) else min(args.monai_structures, len(labels))
    spread = {int(order[i]) + 1 for i in np.linspace(0, len(labels) - 1, count).round().astype(int)}
    if count < len(labels) and args.structures >= 3:
        spread.add(3)  # the structure with the far-away false-positive island
    picks = sorted(spread)
    subset = "all" if len(picks) == len(labels) else "subset spread over sizes, plus structure 3 (FP island)"
    print(f"\nMONAI on structures {picks} ({subset})")
    monai_total = 0.0
    monai_times: dict[int, float] = {}
    worst = dict.fromkeys(KEYS, 0.0)
    for label in picks:
        values, elapsed = run_monai(ref, pred, label)
        monai_total += elapsed
        monai_times[label] = elapsed
        ours = medseg_rows[label]
        # with an empty mask medseg's distances / NSD are NaN by contract (the status says why); MONAI gives
        # inf / nan / 0 there, so only Dice and IoU are compared for such structures
        compared = KEYS if ours["status"] == "ok" else ("dice", "iou")
        for key in compared:
            diff = abs(float(ours[key]) - float(values[key]))
            worst[key] = diff if math.isnan(diff) else max(worst[key], diff)
        print(
            f"  structure {label:2d} ({sizes[label - 1]:7d} vox, {ours['status']:10s}) {elapsed:6.2f} s  "
            + "  ".join(f"{k}={ours[k]:.4f}/{values[k]:.4f}" for k in ("dice", "hd95_mm", "assd_mm", "nsd"))
        )
    extrapolated = len(picks) != len(labels)
    print(f"  MONAI time on {len(picks)} structures: {monai_total:.1f} s")
    if extrapolated:
        # the island structure is measured as itself; the others are extrapolated from the size-spread subset
        island = 3 if 3 in monai_times and len(monai_times) > 1 else None
        others = [monai_times[k] for k in picks if k != island]
        per_structure = float(np.mean(others))
        monai_all = per_structure * (len(labels) - (island is not None)) + (monai_times[3] if island else 0.0)
        how = f"{per_structure:.2f} s mean of the size-spread subset x {len(labels) - (island is not None)}"
        if island:
            how += f" + {monai_times[3]:.2f} s for structure 3"
        print(f"  MONAI extrapolated to {len(labels)} structures: {monai_all:.1f} s ({how}; not measured)")
    else:
        monai_all = monai_total
    print(f"\nspeed-up medseg vs MONAI ({'extrapolated' if extrapolated else 'measured'}): {monai_all / best:.0f}x")
    print("max |medseg - MONAI| on those structures: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    tolerances = {"dice": 1e-6, "iou": 1e-6, "hd_mm": 1e-3, "hd95_mm": 1e-3, "assd_mm": 1e-3, "nsd": 1e-3}
    failed = [k for k in KEYS if not worst[k] <= tolerances[k]]
    print(
        "agreement: "
        + ("OK" if not failed else f"FAILED for {failed}")
        + " (Dice/IoU 1e-6: MONAI computes in float32; distances 1e-3 mm; NSD 1e-3)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
