"""Prediction speed and memory on CPU: MSD Hippocampus cases and a synthetic CT, with and without TTA.

Each scenario runs in its own child process, which reports its wall time per case and its own peak
resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``), so the numbers do not mix.

* ``hippocampus``: the first ``--cases`` cases of ``data_manifests/msd_hippocampus.json``, read from
  disk, predicted by medseg with the network planned for the dataset (plans from the first 20
  cases' fingerprint). Without ``--model`` the network is randomly initialised: timings and memory
  do not depend on the weights.
* ``ct``: a synthetic CT-like volume (``--ct-shape``, ``--ct-spacing``; body, organs, noise) held in
  memory, predicted with a 3D DynUNet planned for ``--ct-target-spacing`` and ``--ct-patch``
  (nnU-Net's topology rules, 16 base features).
* ``fast``: the same synthetic CT predicted with the plans ``medseg plan --fast`` makes for it
  (:mod:`medseg.planning.fast`: 3 mm spacing, the planner's patch and topology at 3 mm, TTA off
  unless ``--fast-tta``), as TotalSegmentator's ``--fast``.
* ``--runtime torch torch-float32 onnx`` (default all three): every medseg scenario runs once per
  runtime: PyTorch at medseg's default precision (bfloat16 autocast on CPUs that compute it natively,
  AMX / AVX512-BF16; float32 elsewhere), PyTorch in float32 (nnU-Net's CPU precision), and the
  exported network in onnxruntime (:mod:`medseg.model.onnx_export`; the one-off export is timed
  apart, ``export_s``), and the table ends with the ratios nnU-Net / medseg per runtime.
* ``nnunet``: nnU-Net v2's ``nnUNetPredictor.predict_single_npy_array`` on the same hippocampus cases
  with a PlainConvUNet of the same stages, features, kernels and strides (random weights), run with
  the Python of a separate environment (``--nnunet-python``, e.g. /tmp/nnunet-venv/bin/python with
  ``pip install nnunetv2 -c constraints.txt``). Without it, the benchmark says why.

Example::

    python benchmarks/bench_predict.py --data-root ../shared/data/msd_hippocampus --cases 5 \\
        --nnunet-python /tmp/nnunet-venv/bin/python --threads 2 --runtime torch onnx \\
        --only hippocampus nnunet fast --memory-shape 512 512 400
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _hippocampus_plans(data_root: str) -> tuple[dict, list]:
    from medseg.data.manifest import load_manifest
    from medseg.planning import fingerprint_dataset, make_plans

    manifest = load_manifest(ROOT / "data_manifests" / "msd_hippocampus.json", data_root=data_root)
    cases = [c for c in manifest.labelled_cases if c.subset == "training"]
    plans = make_plans(fingerprint_dataset(manifest, cases=cases[:20]))
    return plans, cases


def _segmenter(plans: dict, *, tta: bool, overlap: float, model: str | None, runtime: str = "torch", threads=None):
    """The Segmenter of a scenario and the seconds a first-use ONNX export took (0 for torch or a cached export)."""
    import torch

    from medseg.core.labels import LabelSet
    from medseg.inference import Segmenter
    from medseg.model.networks import build_network

    # "torch" runs at the default precision (bfloat16 autocast on CPUs with AMX / AVX512-BF16), "torch-float32" in float32
    precision = "float32" if runtime == "torch-float32" else "auto"
    runtime = "torch" if runtime == "torch-float32" else runtime
    if model:
        clock = time.perf_counter()
        seg = Segmenter.from_checkpoint(
            model, device="cpu", tta=tta, overlap=overlap, runtime=runtime, threads=threads, precision=precision
        )
        return seg, time.perf_counter() - clock if runtime == "onnx" else 0.0
    labels = LabelSet.from_manifest(plans["dataset"]["labels"])
    torch.manual_seed(0)
    cfg = plans["configurations"]["3d"]
    network = build_network(cfg, in_channels=len(plans["normalization"]), out_channels=labels.num_classes)
    export_s = 0.0
    if runtime == "onnx":
        from medseg.model.onnx_export import OnnxNetwork, export_network

        clock = time.perf_counter()
        model_bytes, _ = export_network(network, plans_config=cfg, in_channels=len(plans["normalization"]))
        network, export_s = OnnxNetwork(model_bytes, threads=threads), time.perf_counter() - clock
    seg = Segmenter(
        [network],
        plans=plans,
        config="3d",
        labels=labels,
        device="cpu",
        tta=tta,
        overlap=overlap,
        runtime=runtime,
        precision=precision,
    )
    return seg, export_s


def child_hippocampus(args: argparse.Namespace) -> dict:
    from medseg.io import read_volume

    plans, cases = _hippocampus_plans(args.data_root)
    seg, export_s = _segmenter(
        plans, tta=args.tta, overlap=args.overlap, model=args.model, runtime=args.runtime, threads=args.threads
    )
    seconds = []
    for case in cases[: args.cases]:
        clock = time.perf_counter()
        seg.predict(read_volume(case.images[0]))
        seconds.append(time.perf_counter() - clock)
    cfg = plans["configurations"]["3d"]
    return {
        "scenario": f"medseg {args.runtime} hippocampus tta={args.tta}",
        "kind": "hippocampus",
        "runtime": args.runtime,
        "tta": args.tta,
        "export_s": round(export_s, 2),
        "cases": len(seconds),
        "s_per_case": sum(seconds[1:] or seconds) / len(seconds[1:] or seconds),
        "first_case_s": seconds[0],
        "peak_rss_mb": _peak_rss_mb(),
        "network": f"DynUNet filters {cfg['network']['filters']} patch {cfg['patch_size']}",
    }


def synthetic_ct(shape, spacing):
    import numpy as np

    rng = np.random.default_rng(0)
    x = (np.arange(shape[0]) - shape[0] / 2) * spacing[0]
    y = (np.arange(shape[1]) - shape[1] / 2) * spacing[1]
    body = (x[:, None] / 170.0) ** 2 + (y[None, :] / 120.0) ** 2 <= 1.0
    organ = ((x[:, None] - 40) / 70.0) ** 2 + ((y[None, :] + 10) / 50.0) ** 2 <= 1.0
    array = np.full(shape, -1000.0, np.float32)
    for k in range(shape[2]):
        plane = np.where(body, 20.0, -1000.0).astype(np.float32)
        if shape[2] * 0.3 < k < shape[2] * 0.7:
            plane[organ] = 60.0
        array[:, :, k] = plane + rng.normal(0.0, 15.0, shape[:2]).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    return array[None], affine


def child_ct(args: argparse.Namespace) -> dict:
    from medseg.core.volume import Volume
    from medseg.planning.rules import network_topology

    array, affine = synthetic_ct(args.ct_shape, args.ct_spacing)
    volume = Volume(array, affine)
    del array
    kernels, strides, patch = network_topology(args.ct_patch, args.ct_target_spacing)
    if args.fast:
        plans = _fast_ct_plans(args.ct_shape, args.ct_spacing)
        patch = plans["configurations"]["3d"]["patch_size"]
    else:
        plans = _ct_plans(args, kernels, strides, patch)
    seg, export_s = _segmenter(
        plans, tta=args.tta, overlap=args.overlap, model=None, runtime=args.runtime, threads=args.threads
    )
    clock = time.perf_counter()
    result = seg.predict_full(volume)
    seconds = time.perf_counter() - clock
    assert result.labels.spatial_shape == tuple(args.ct_shape)
    target = plans["configurations"]["3d"]["spacing_mm"]
    return {
        "scenario": f"medseg {args.runtime} {'fast ' if args.fast else ''}CT {'x'.join(map(str, args.ct_shape))} @ "
        f"{args.ct_spacing} mm -> {target} mm, tta={args.tta}, overlap={args.overlap}",
        "kind": args.kind or ("fast" if args.fast else "ct"),
        "runtime": args.runtime,
        "tta": args.tta,
        "export_s": round(export_s, 2),
        "cases": 1,
        "s_per_case": seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "timings_s": result.timings_s,
        "network": f"DynUNet filters {plans['configurations']['3d']['network']['filters']} patch {patch}",
    }


def _fast_ct_plans(shape, spacing) -> dict:
    """The plans ``medseg plan --fast`` makes for a dataset of this one CT (3 mm, nnU-Net's rules)."""
    from medseg.planning.fast import fast_fingerprint
    from medseg.planning.rules import make_plans

    fingerprint = {
        "dataset": {
            "name": "synthetic_ct",
            "labels": {"0": "background", "1": "body", "2": "organ"},
            "channels": ["CT"],
        },
        "spacings_mm": [list(spacing)],
        "shapes": [list(shape)],
        "intensity": [
            {"channel": "CT", "percentile_00_5": -1000.0, "percentile_99_5": 1000.0, "mean": 30.0, "sd": 200.0}
        ],
    }
    plans = make_plans(fast_fingerprint(fingerprint))
    plans["configurations"]["3d"]["network"]["deep_supervision"] = False
    return plans


def _ct_plans(args: argparse.Namespace, kernels, strides, patch) -> dict:
    from medseg.planning.rules import _filters

    return {
        "format_version": 1,
        "dataset": {
            "name": "synthetic_ct",
            "labels": {"0": "background", "1": "body", "2": "organ"},
            "channels": ["CT"],
        },
        "normalization": [{"channel": "CT", "scheme": "ct", "clip": [-1000.0, 1000.0], "mean": 30.0, "sd": 200.0}],
        "configurations": {
            "3d": {
                "spatial_dims": 3,
                "spacing_mm": list(args.ct_target_spacing),
                "patch_size": patch,
                "batch_size": 2,
                "network": {
                    "architecture": "DynUNet",
                    "filters": _filters(len(strides), 16, 320),
                    "kernel_size": kernels,
                    "strides": strides,
                    "deep_supervision": False,
                },
            }
        },
    }


def child_nnunet(args: argparse.Namespace) -> dict:
    """Runs inside the nnU-Net environment: no medseg imports."""
    import numpy as np
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    spec = json.loads(args.nnunet_spec)
    cfg = spec["config"]
    flip = lambda values: [list(v)[::-1] for v in values]  # noqa: E731 - RAS (x, y, z) -> ITK (z, y, x)
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": len(cfg["network"]["strides"]),
            "features_per_stage": cfg["network"]["filters"],
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": flip(cfg["network"]["kernel_size"]),
            "strides": flip(cfg["network"]["strides"]),
            "n_conv_per_stage": [2] * len(cfg["network"]["strides"]),
            "n_conv_per_stage_decoder": [2] * (len(cfg["network"]["strides"]) - 1),
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    spacing = list(cfg["spacing_mm"])[::-1]
    resample = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    plans = {
        "dataset_name": "Dataset004_Hippocampus",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": spacing,
        "original_median_shape_after_transp": [36, 50, 35],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "3d_fullres": {
                "data_identifier": "bench",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": list(cfg["patch_size"])[::-1],
                "median_image_size_in_voxels": [36, 50, 35],
                "spacing": spacing,
                "normalization_schemes": ["ZScoreNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": resample,
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_seg_kwargs": {**resample, "is_seg": True, "order": 1},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {**resample, "order": 1},
                "architecture": arch,
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": 1.0,
                "mean": 0.0,
                "median": 0.0,
                "min": 0.0,
                "percentile_00_5": 0.0,
                "percentile_99_5": 1.0,
                "std": 1.0,
            }
        },
    }
    dataset_json = {
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
        "numTraining": 1,
        "file_ending": ".nii.gz",
    }
    manager = PlansManager(plans)
    configuration = manager.get_configuration("3d_fullres")
    torch.manual_seed(0)
    network = get_network_from_plans(
        configuration.network_arch_class_name,
        configuration.network_arch_init_kwargs,
        configuration.network_arch_init_kwargs_req_import,
        1,
        3,
        deep_supervision=False,
    )
    predictor = nnUNetPredictor(
        tile_step_size=1.0 - args.overlap,
        use_gaussian=True,
        use_mirroring=args.tta,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        allow_tqdm=False,
    )
    predictor.manual_initialization(
        network, manager, configuration, [network.state_dict()], dataset_json, "nnUNetTrainer", (0, 1, 2)
    )
    seconds = []
    for path in spec["images"]:
        clock = time.perf_counter()
        data, properties = SimpleITKIO().read_images([path])
        segmentation = predictor.predict_single_npy_array(data, properties, None, None, False)
        seconds.append(time.perf_counter() - clock)
        assert np.asarray(segmentation).shape == data.shape[1:]
    from importlib.metadata import version

    return {
        "scenario": f"nnU-Net v2 {version('nnunetv2')} hippocampus tta={args.tta}",
        "kind": "nnunet",
        "tta": args.tta,
        "cases": len(seconds),
        "s_per_case": sum(seconds[1:] or seconds) / len(seconds[1:] or seconds),
        "first_case_s": seconds[0],
        "peak_rss_mb": _peak_rss_mb(),
        "network": f"PlainConvUNet features {cfg['network']['filters']} patch {cfg['patch_size']}",
    }


def _run_child(python: str, argv: list[str], timeout: float) -> dict:
    command = [python, str(Path(__file__).resolve()), *argv]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(done.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {done.returncode}: {' | '.join(tail)[:400]}"}


def _ratio_lines(results: list[dict]) -> list[str]:
    """nnU-Net's seconds per hippocampus case over medseg's, per runtime and TTA setting (> 1: medseg faster)."""
    lines = []
    for tta in (False, True):
        nnunet = [r for r in results if r.get("kind") == "nnunet" and r.get("tta") == tta and "s_per_case" in r]
        if not nnunet:
            continue
        for result in results:
            if result.get("kind") == "hippocampus" and result.get("tta") == tta and "s_per_case" in result:
                ratio = nnunet[0]["s_per_case"] / result["s_per_case"]
                lines.append(
                    f"hippocampus tta={tta}: nnU-Net {nnunet[0]['s_per_case']:.2f} s / medseg {result['runtime']} "
                    f"{result['s_per_case']:.2f} s = {ratio:.2f}x"
                )
    by_key = {(r.get("kind"), r.get("tta"), r.get("runtime")): r for r in results if "s_per_case" in r}
    for (kind, tta, runtime), result in sorted(by_key.items(), key=str):
        torch_result = by_key.get((kind, tta, "torch"))
        if runtime == "onnx" and torch_result is not None:
            lines.append(
                f"{kind} tta={tta}: medseg torch {torch_result['s_per_case']:.2f} s / onnx {result['s_per_case']:.2f} s "
                f"= {torch_result['s_per_case'] / result['s_per_case']:.2f}x"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "msd_hippocampus"))
    parser.add_argument("--model", default=None, help="a trained run folder (default: random weights)")
    parser.add_argument("--cases", type=int, default=5)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--ct-shape", type=int, nargs=3, default=[512, 512, 300])
    parser.add_argument("--ct-spacing", type=float, nargs=3, default=[0.78, 0.78, 1.5])
    parser.add_argument("--ct-target-spacing", type=float, nargs=3, default=[1.5, 1.5, 1.5])
    parser.add_argument("--ct-patch", type=int, nargs=3, default=[128, 128, 128])
    parser.add_argument("--ct-tta", choices=["no", "both"], default="no", help="CT with TTA too (8x the network time)")
    parser.add_argument("--fast-tta", action="store_true", help="the fast CT scenario with mirroring TTA")
    parser.add_argument(
        "--memory-shape",
        type=int,
        nargs=3,
        default=None,
        help="also predict a CT of this shape at its own spacing (memory check, e.g. 512 512 400)",
    )
    parser.add_argument("--memory-overlap", type=float, default=0.0)
    parser.add_argument("--memory-fast", action="store_true", help="the memory check with the fast (3 mm) plans")
    parser.add_argument("--nnunet-python", default=None)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch / onnxruntime CPU threads in every scenario (default theirs)"
    )
    parser.add_argument(
        "--runtime",
        nargs="+",
        choices=["torch", "torch-float32", "onnx"],
        default=["torch", "torch-float32", "onnx"],
        help="medseg runtimes to measure (each medseg scenario runs once per runtime); torch runs at the default "
        "precision (bfloat16 autocast where the CPU computes it natively), torch-float32 in float32",
    )
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["hippocampus", "ct", "fast", "memory", "nnunet"],
        default=["hippocampus", "ct", "fast", "memory", "nnunet"],
        help="scenarios to run",
    )
    parser.add_argument("--child", choices=["hippocampus", "ct", "nnunet"], default=None)
    parser.add_argument("--tta", type=int, default=0)
    parser.add_argument("--fast", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--nnunet-spec", default=None)
    args = parser.parse_args()
    if args.child:
        args.tta = bool(args.tta)
        args.runtime = args.runtime[0]
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        result = {"hippocampus": child_hippocampus, "ct": child_ct, "nnunet": child_nnunet}[args.child](args)
        print(json.dumps(result))
        return

    import platform

    import torch

    print(
        f"bench_predict: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} CPUs, "
        f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads, CPU only; "
        f"runtimes {args.runtime}; load average at start {open('/proc/loadavg').read().split()[:3]}"
    )
    threads = ["--threads", str(args.threads)] if args.threads else []
    common = ["--data-root", args.data_root, "--cases", str(args.cases), "--overlap", str(args.overlap), *threads]
    if args.model:
        common += ["--model", args.model]
    results = []
    for tta in (0, 1) if "hippocampus" in args.only else ():
        for runtime in args.runtime:
            results.append(
                _run_child(
                    sys.executable,
                    ["--child", "hippocampus", "--tta", str(tta), "--runtime", runtime, *common],
                    args.timeout,
                )
            )

    def ct_args(shape, spacing, target) -> list[str]:
        return [
            "--ct-shape",
            *map(str, shape),
            "--ct-spacing",
            *map(str, spacing),
            "--ct-target-spacing",
            *map(str, target),
            "--ct-patch",
            *map(str, args.ct_patch),
            *threads,
        ]

    ct = ct_args(args.ct_shape, args.ct_spacing, args.ct_target_spacing)
    for tta in ((0, 1) if args.ct_tta == "both" else (0,)) if "ct" in args.only else ():
        for runtime in args.runtime:
            results.append(
                _run_child(
                    sys.executable,
                    ["--child", "ct", "--tta", str(tta), "--overlap", str(args.overlap), "--runtime", runtime, *ct],
                    args.timeout,
                )
            )
    for runtime in args.runtime if "fast" in args.only else ():
        fast = ["--child", "ct", "--fast", "--tta", str(int(args.fast_tta)), "--overlap", str(args.overlap)]
        results.append(_run_child(sys.executable, [*fast, "--runtime", runtime, *ct], args.timeout))
    if args.memory_shape and "memory" in args.only:
        memory = ct_args(args.memory_shape, args.ct_spacing, args.ct_spacing)
        for runtime in args.runtime:
            results.append(
                _run_child(
                    sys.executable,
                    [
                        "--child",
                        "ct",
                        "--kind",
                        "memory",
                        *(["--fast"] if args.memory_fast else []),
                        "--tta",
                        "0",
                        "--overlap",
                        str(args.memory_overlap),
                        "--runtime",
                        runtime,
                        *memory,
                    ],
                    args.timeout,
                )
            )
    if "nnunet" not in args.only:
        pass
    elif args.nnunet_python:
        plans, cases = _hippocampus_plans(args.data_root)
        spec = json.dumps(
            {"config": plans["configurations"]["3d"], "images": [str(c.images[0]) for c in cases[: args.cases]]}
        )
        for tta in (0, 1):
            results.append(
                _run_child(
                    args.nnunet_python,
                    [
                        "--child",
                        "nnunet",
                        "--tta",
                        str(tta),
                        "--overlap",
                        str(args.overlap),
                        "--nnunet-spec",
                        spec,
                        *threads,
                    ],
                    args.timeout,
                )
            )
    else:
        results.append(
            {
                "scenario": "nnU-Net v2",
                "error": "not run: pass --nnunet-python PATH of an environment with nnunetv2 installed",
            }
        )
    print(f"{'scenario':<90} {'s/case':>8} {'peak RSS MB':>12}  network")
    for result in results:
        if "error" in result:
            print(f"{result.get('scenario', '?'):<90} {'-':>8} {'-':>12}  {result['error']}")
            continue
        print(
            f"{result['scenario']:<90} {result['s_per_case']:>8.2f} {result['peak_rss_mb']:>12.0f}  {result['network']}"
        )
        if "timings_s" in result:
            print(f"{'':<90} stages: {result['timings_s']}")
        if result.get("export_s"):
            print(f"{'':<90} one-off ONNX export + check: {result['export_s']:.1f} s (not in s/case)")
    for line in _ratio_lines(results):
        print(f"ratio  {line}")
    print(
        "s/case: mean over cases after the first (warm-up) when there are several; reading from disk included for"
        " hippocampus, the synthetic CT is held in memory. Weights are random unless --model is given."
    )


if __name__ == "__main__":
    main()
