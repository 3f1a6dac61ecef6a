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
* ``nnunet``: nnU-Net v2's ``nnUNetPredictor.predict_single_npy_array`` on the same hippocampus cases
  with a PlainConvUNet of the same stages, features, kernels and strides (random weights), run with
  the Python of a separate environment (``--nnunet-python``, e.g. /tmp/nnunet-venv/bin/python with
  ``pip install nnunetv2 -c constraints.txt``). Without it, the benchmark says why.

Example::

    python benchmarks/bench_predict.py --data-root ../shared/data/msd_hippocampus --cases 5 \\
        --nnunet-python /tmp/nnunet-venv/bin/python
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


def _segmenter(plans: dict, *, tta: bool, overlap: float, model: str | None):
    import torch

    from medseg.core.labels import LabelSet
    from medseg.inference import Segmenter
    from medseg.model.networks import build_network

    if model:
        return Segmenter.from_checkpoint(model, device="cpu", tta=tta, overlap=overlap)
    labels = LabelSet.from_manifest(plans["dataset"]["labels"])
    torch.manual_seed(0)
    network = build_network(
        plans["configurations"]["3d"], in_channels=len(plans["normalization"]), out_channels=labels.num_classes
    )
    return Segmenter([network], plans=plans, config="3d", labels=labels, device="cpu", tta=tta, overlap=overlap)


def child_hippocampus(args: argparse.Namespace) -> dict:
    from medseg.io import read_volume

    plans, cases = _hippocampus_plans(args.data_root)
    seg = _segmenter(plans, tta=args.tta, overlap=args.overlap, model=args.model)
    seconds = []
    for case in cases[: args.cases]:
        clock = time.perf_counter()
        seg.predict(read_volume(case.images[0]))
        seconds.append(time.perf_counter() - clock)
    cfg = plans["configurations"]["3d"]
    return {
        "scenario": f"medseg hippocampus tta={args.tta}",
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
    from medseg.planning.rules import _filters, network_topology

    array, affine = synthetic_ct(args.ct_shape, args.ct_spacing)
    volume = Volume(array, affine)
    del array
    kernels, strides, patch = network_topology(args.ct_patch, args.ct_target_spacing)
    plans = {
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
    seg = _segmenter(plans, tta=args.tta, overlap=args.overlap, model=None)
    clock = time.perf_counter()
    result = seg.predict_full(volume)
    seconds = time.perf_counter() - clock
    assert result.labels.spatial_shape == tuple(args.ct_shape)
    return {
        "scenario": f"medseg CT {'x'.join(map(str, args.ct_shape))} @ {args.ct_spacing} mm -> "
        f"{args.ct_target_spacing} mm, tta={args.tta}, overlap={args.overlap}",
        "cases": 1,
        "s_per_case": seconds,
        "peak_rss_mb": _peak_rss_mb(),
        "timings_s": result.timings_s,
        "network": f"DynUNet filters {plans['configurations']['3d']['network']['filters']} patch {patch}",
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
    parser.add_argument(
        "--memory-shape",
        type=int,
        nargs=3,
        default=None,
        help="also predict a CT of this shape at its own spacing (memory check, e.g. 512 512 400)",
    )
    parser.add_argument("--memory-overlap", type=float, default=0.0)
    parser.add_argument("--nnunet-python", default=None)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads in every scenario (default torch's)"
    )
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["hippocampus", "ct", "memory", "nnunet"],
        default=["hippocampus", "ct", "memory", "nnunet"],
        help="scenarios to run",
    )
    parser.add_argument("--child", choices=["hippocampus", "ct", "nnunet"], default=None)
    parser.add_argument("--tta", type=int, default=0)
    parser.add_argument("--nnunet-spec", default=None)
    args = parser.parse_args()
    if args.child:
        args.tta = bool(args.tta)
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
        f"load average at start {open('/proc/loadavg').read().split()[:3]}"
    )
    threads = ["--threads", str(args.threads)] if args.threads else []
    common = ["--data-root", args.data_root, "--cases", str(args.cases), "--overlap", str(args.overlap), *threads]
    if args.model:
        common += ["--model", args.model]
    results = []
    for tta in (0, 1) if "hippocampus" in args.only else ():
        results.append(_run_child(sys.executable, ["--child", "hippocampus", "--tta", str(tta), *common], args.timeout))
    ct = [
        "--ct-shape",
        *map(str, args.ct_shape),
        "--ct-spacing",
        *map(str, args.ct_spacing),
        "--ct-target-spacing",
        *map(str, args.ct_target_spacing),
        "--ct-patch",
        *map(str, args.ct_patch),
        *threads,
    ]
    for tta in ((0, 1) if args.ct_tta == "both" else (0,)) if "ct" in args.only else ():
        results.append(
            _run_child(
                sys.executable, ["--child", "ct", "--tta", str(tta), "--overlap", str(args.overlap), *ct], args.timeout
            )
        )
    if args.memory_shape and "memory" in args.only:
        memory = [
            "--ct-shape",
            *map(str, args.memory_shape),
            "--ct-spacing",
            *map(str, args.ct_spacing),
            "--ct-target-spacing",
            *map(str, args.ct_spacing),
            "--ct-patch",
            *map(str, args.ct_patch),
            *threads,
        ]
        results.append(
            _run_child(
                sys.executable,
                ["--child", "ct", "--tta", "0", "--overlap", str(args.memory_overlap), *memory],
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
    print(f"{'scenario':<78} {'s/case':>8} {'peak RSS MB':>12}  network")
    for result in results:
        if "error" in result:
            print(f"{result.get('scenario', '?'):<78} {'-':>8} {'-':>12}  {result['error']}")
            continue
        print(
            f"{result['scenario']:<78} {result['s_per_case']:>8.2f} {result['peak_rss_mb']:>12.0f}  {result['network']}"
        )
        if "timings_s" in result:
            print(f"{'':<78} stages: {result['timings_s']}")
    print(
        "s/case: mean over cases after the first (warm-up) when there are several; reading from disk included for"
        " hippocampus, the synthetic CT is held in memory. Weights are random unless --model is given."
    )


if __name__ == "__main__":
    main()
