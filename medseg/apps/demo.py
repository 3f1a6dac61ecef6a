"""`medseg demo`: the whole pipeline in a few minutes on a laptop CPU, on synthetic or real data.

Without a manifest, :func:`run_demo` first writes a small synthetic MRI-like dataset
(:func:`make_synthetic_dataset`): T1-like 3D volumes holding an elongated structure split into two
adjacent labels (``anterior`` / ``posterior``, like the hippocampus head and body) beside a dark
ventricle-like blob, on textured tissue, with partial-volume blur, a smooth multiplicative bias
field and Rician noise, written as NIfTI with an MSD-style ``dataset.json``. Then, on that dataset
or on the manifest given:

1. plan (:func:`medseg.planning.plan_dataset`) -> ``plans.json``;
2. train fold 0 of the 3D configuration under a wall-clock budget (:func:`medseg.training.train`;
   AdamW at 3e-3 instead of nnU-Net's SGD, because it converges in the few hundred iterations a
   CPU manages in minutes; U-Net with 8 base features on synthetic data);
3. predict the held-out cases (the labelled ``test`` cases, else fold 0's validation cases) with
   :func:`medseg.inference.predict_batch`;
4. evaluate them (:func:`medseg.evaluation.evaluate`) and write ``per_case.csv``,
   ``summary.json`` and ``report.html`` (:func:`medseg.evaluation.write_outputs`).

Example:
    >>> result = run_demo("medseg_demo", train_minutes=2)    # doctest: +SKIP
    >>> result.dice                                          # doctest: +SKIP
    {'anterior': 0.905, 'posterior': 0.853}
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

from medseg.core.volume import Volume
from medseg.errors import MedsegUserError
from medseg.io.files import write_json
from medseg.io.volumes import write_volume

__all__ = ["DemoResult", "make_synthetic_case", "make_synthetic_dataset", "run_demo"]

SYNTHETIC_LABELS = {"0": "background", "1": "anterior", "2": "posterior"}


def _rotation(rng: np.random.Generator, max_angle_rad: float) -> np.ndarray:
    ax, ay, az = rng.uniform(-max_angle_rad, max_angle_rad, 3)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_synthetic_case(
    rng: np.random.Generator,
    *,
    shape: Sequence[int] = (36, 44, 36),
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
    noise: float = 0.05,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic T1-like image and its label map (0 background, 1 anterior, 2 posterior).

    The structure is a curved, rotated ellipsoid (semi-axes about 6 x 16 x 6 mm) cut across its
    long axis at a random position into two labels of different brightness; a dark
    ellipsoid touches it (a ventricle); tissue texture, partial-volume blur, a smooth bias field
    (up to about +-30 %) and Rician noise (``noise`` x the structure's intensity) complete it.

    Returns:
        ``(image, label)``: float32 and uint8 arrays of ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    spacing = np.asarray(spacing_mm, dtype=float)
    axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # mm, centred
    centre = rng.uniform(-3.0, 3.0, 3)
    rotation = _rotation(rng, 0.35)
    local = (points - centre) @ rotation  # coordinates in the structure's frame
    semi = np.array([rng.uniform(5.0, 7.0), rng.uniform(14.0, 18.0), rng.uniform(5.0, 7.0)])
    bend = rng.uniform(-0.03, 0.03)
    local_x = local[..., 0] - bend * local[..., 1] ** 2  # a gentle curve along the long axis
    radius = (local_x / semi[0]) ** 2 + (local[..., 1] / semi[1]) ** 2 + (local[..., 2] / semi[2]) ** 2
    structure = radius <= 1.0
    cut = rng.uniform(-3.0, 3.0)
    label = np.zeros(shape, dtype=np.uint8)
    label[structure & (local[..., 1] >= cut)] = 1
    label[structure & (local[..., 1] < cut)] = 2
    ventricle_centre = np.array([semi[0] + rng.uniform(2.0, 4.0), rng.uniform(-6.0, 6.0), rng.uniform(-2.0, 2.0)])
    ventricle_semi = np.array([rng.uniform(2.0, 3.5), rng.uniform(8.0, 12.0), rng.uniform(3.0, 5.0)])
    ventricle = (((local - ventricle_centre) / ventricle_semi) ** 2).sum(-1) <= 1.0
    ventricle &= ~structure
    texture = ndimage.gaussian_filter(rng.normal(size=shape), sigma=3.0 / spacing)
    texture /= max(float(texture.std()), 1e-6)
    image = 0.52 + 0.04 * texture  # white/grey matter-like tissue
    image[label == 1] = 0.82 + rng.uniform(-0.03, 0.03)
    image[label == 2] = 0.68 + rng.uniform(-0.03, 0.03)
    image[ventricle] = 0.18
    image = ndimage.gaussian_filter(image, sigma=0.6 / spacing)  # partial volume
    unit = [np.linspace(-1.0, 1.0, n) for n in shape]
    grid = np.meshgrid(*unit, indexing="ij")
    coefficients = rng.normal(0.0, 0.12, 6)
    log_bias = (
        coefficients[0] * grid[0]
        + coefficients[1] * grid[1]
        + coefficients[2] * grid[2]
        + coefficients[3] * grid[0] * grid[1]
        + coefficients[4] * grid[1] ** 2
        + coefficients[5] * grid[2] ** 2
    )
    image = image * np.exp(log_bias)
    sigma = noise * 0.8
    image = np.sqrt((image + rng.normal(0.0, sigma, shape)) ** 2 + rng.normal(0.0, sigma, shape) ** 2)
    scale = rng.uniform(300.0, 1200.0)  # scanners differ in their intensity scale
    return (image * scale).astype(np.float32), label


def make_synthetic_dataset(
    root: str | os.PathLike[str],
    *,
    num_training: int = 20,
    num_test: int = 6,
    shape: Sequence[int] = (36, 44, 36),
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
    seed: int = 0,
) -> Path:
    """Write a synthetic dataset (``imagesTr``, ``labelsTr``, ``imagesTs``, ``labelsTs``, ``dataset.json``).

    The ``test`` cases carry labels, so they can be evaluated after prediction.

    Returns:
        The path of ``dataset.json`` (the manifest; its data root is ``root``).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    affine = np.diag([*spacing_mm, 1.0])
    affine[:3, 3] = [-90.0, -126.0, -72.0]
    entries: dict[str, list[dict[str, str]]] = {"training": [], "test": []}
    for subset, count, folder in (("training", num_training, "Tr"), ("test", num_test, "Ts")):
        for index in range(count):
            image, label = make_synthetic_case(rng, shape=shape, spacing_mm=spacing_mm)
            name = f"synth_{subset[:2]}{index:03d}.nii.gz"
            volume = Volume(image[None], affine)
            write_volume(volume, root / f"images{folder}" / name)
            write_volume(volume.with_array(label[None], kind="label"), root / f"labels{folder}" / name)
            entries[subset].append({"image": f"./images{folder}/{name}", "label": f"./labels{folder}/{name}"})
    manifest = {
        "name": "medseg_synthetic",
        "description": "Synthetic T1-like volumes: two adjacent structures, bias field, Rician noise (medseg demo)",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": SYNTHETIC_LABELS,
        "numTraining": num_training,
        "numTest": num_test,
        **entries,
    }
    path = root / "dataset.json"
    write_json(manifest, path)
    return path


@dataclass
class DemoResult:
    """Where the demo put everything, and how well it did.

    Attributes:
        out: the demo folder.
        manifest: the manifest used; ``data_root`` its data root.
        run_dir: the training run (checkpoints, history.csv, plans.json).
        predictions: the predicted label maps (and ``medseg_predict.json``).
        evaluation: per_case.csv, summary.json, report.html.
        dice: mean Dice per structure over the held-out cases.
        num_heldout: number of held-out cases evaluated.
        seconds: wall time per stage.
    """

    out: Path
    manifest: Path
    data_root: Path
    run_dir: Path
    predictions: Path
    evaluation: Path
    report: Path
    dice: dict[str, float] = field(default_factory=dict)
    num_heldout: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _heldout_manifest(manifest_path: Path, data_root: Path, out: Path) -> tuple[Path, str | None, int]:
    """The held-out cases: the labelled test cases, else fold 0's validation cases (a manifest written to out)."""
    from medseg.data.manifest import load_manifest

    manifest = load_manifest(manifest_path, data_root=data_root)
    test = [c for c in manifest.labelled_cases if c.subset == "test"]
    if test:
        return manifest_path, "test", len(test)
    _, validation = manifest.fold(0)
    root = manifest.data_root
    content = json.loads(manifest_path.read_text(encoding="utf-8"))
    content.pop("folds", None)
    content["case_lists"] = ["heldout"]
    content["training"], content["test"] = [], []
    content["heldout"] = [
        {
            "id": c.case_id,
            "image": [os.path.relpath(p, root) for p in c.images]
            if len(c.images) > 1
            else os.path.relpath(c.images[0], root),
            "label": os.path.relpath(c.label, root),
        }
        for c in validation
    ]
    path = out / "heldout_manifest.json"
    write_json(content, path)
    return path, "heldout", len(validation)


def run_demo(
    out: str | os.PathLike[str] = "medseg_demo",
    *,
    manifest: str | os.PathLike[str] | None = None,
    data_root: str | os.PathLike[str] | None = None,
    train_minutes: float = 2.0,
    num_training: int = 20,
    num_test: int = 6,
    shape: Sequence[int] = (32, 40, 32),
    spacing_mm: Sequence[float] = (1.25, 1.25, 1.25),
    base_features: int = 8,
    seed: int = 0,
    device: str = "auto",
    num_threads: int | None = 1,
    tta: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = _stderr,
) -> DemoResult:
    """Generate (or take) a dataset, plan, train briefly, predict held-out cases, evaluate, report.

    Args:
        out: the demo folder (created; must not already hold a demo run).
        manifest: a manifest to run on real data (with ``data_root``); default synthetic data.
        data_root: the manifest's data root.
        train_minutes: wall-clock training budget.
        num_training: synthetic training cases; ``num_test``: synthetic held-out cases.
        shape: voxel shape of the synthetic volumes; ``spacing_mm`` their voxel size.
        base_features: features of the U-Net's first stage (8 keeps a CPU demo within minutes;
            the planner's default is 16).
        seed: seed of the synthetic data and of training.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        num_threads: torch CPU threads for training and prediction; None keeps torch's default (one
            per core). The default 1 is deliberate: the demo's small network gains little from a second
            thread, while on a CPU shared with other jobs OpenMP oversubscription made 2 threads 10x
            slower per iteration (measured: 0.4 s vs 6.9 s forward+backward).
        tta: mirroring test-time augmentation when predicting.
        progress: progress bars.
        log: where the demo's messages go (stderr by default).

    Raises:
        MedsegUserError: ``out`` already holds a demo run, or the manifest is invalid.
    """
    from medseg.evaluation.batch import evaluate
    from medseg.evaluation.report import write_outputs
    from medseg.inference.batch import predict_batch
    from medseg.planning.plans import plan_dataset
    from medseg.training.loop import train

    if train_minutes <= 0:
        raise MedsegUserError(f"train_minutes must be > 0, got {train_minutes}")
    out = Path(out)
    run_dir = out / "run"
    if (run_dir / "checkpoint_last.pt").exists():
        raise MedsegUserError(f"{out}: already holds a demo run; choose another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    clock = time.monotonic()
    if manifest is None:
        root = out / "data"
        log(f"[1/5] writing a synthetic dataset ({num_training} training + {num_test} test volumes) to {root}")
        manifest_path = make_synthetic_dataset(
            root, num_training=num_training, num_test=num_test, shape=shape, spacing_mm=spacing_mm, seed=seed
        )
        data_root_path = root
    else:
        manifest_path = Path(manifest)
        data_root_path = Path(data_root) if data_root is not None else manifest_path.parent
        log(f"[1/5] using {manifest_path} (data root {data_root_path})")
    seconds["data"] = time.monotonic() - clock

    clock = time.monotonic()
    log("[2/5] planning (dataset fingerprint -> plans.json)")
    plans = plan_dataset(manifest_path, data_root=data_root_path, out=out / "plans.json", base_features=base_features)
    # a budget of minutes: AdamW converges in far fewer iterations than nnU-Net's SGD (kept in plans.json)
    plans["training"].update(optimizer="adamw", learning_rate=3e-3)
    write_json(plans, out / "plans.json")
    cfg = plans["configurations"]["3d"]
    log(
        f"      3d: spacing {cfg['spacing_mm']} mm, patch {cfg['patch_size']}, batch {cfg['batch_size']}, "
        f"{len(cfg['network']['strides'])} stages"
    )
    seconds["plan"] = time.monotonic() - clock

    clock = time.monotonic()
    log(f"[3/5] training fold 0 of the 3d configuration for {train_minutes:g} min")
    summary = train(
        manifest_path,
        data_root=data_root_path,
        plans=plans,
        out_dir=run_dir,
        config="3d",
        fold=0,
        time_limit_min=train_minutes,
        device=device,
        seed=seed,
        iterations_per_epoch=20,
        validate_every=3,
        num_threads=num_threads,
        progress=progress,
    )
    assert isinstance(summary, dict)
    log(
        f"      {summary['epochs']} epochs, {summary['iterations']} iterations, best validation Dice "
        f"{summary['best_dice']:.3f}"
    )
    seconds["train"] = time.monotonic() - clock

    clock = time.monotonic()
    heldout, subset, count = _heldout_manifest(manifest_path, data_root_path, out)
    log(f"[4/5] predicting {count} held-out cases")
    predictions = out / "predictions"
    batch = predict_batch(
        run_dir,
        heldout,
        predictions,
        data_root=data_root_path,
        subset=subset,
        device=device,
        tta=tta,
        progress=progress,
    )
    for case_id, message in batch.failed:
        log(f"      failed: {case_id}: {message}")
    seconds["predict"] = time.monotonic() - clock

    clock = time.monotonic()
    log("[5/5] evaluating")
    evaluation_dir = out / "evaluation"
    evaluation = evaluate(heldout, predictions, data_root=data_root_path, subset=subset, out=evaluation_dir)
    written = write_outputs(evaluation, evaluation_dir)
    per_case = evaluation.per_case
    scored = per_case[per_case["status"].isin(["ok", "ref_empty", "pred_empty"])]
    dice = {str(k): round(float(v), 4) for k, v in scored.groupby("structure", sort=False)["dice"].mean().items()}
    seconds["evaluate"] = time.monotonic() - clock
    result = DemoResult(
        out=out,
        manifest=manifest_path,
        data_root=data_root_path,
        run_dir=run_dir,
        predictions=predictions,
        evaluation=evaluation_dir,
        report=written["report"],
        dice=dice,
        num_heldout=count,
        seconds={k: round(v, 1) for k, v in seconds.items()},
    )
    log(
        f"done in {sum(seconds.values()) / 60:.1f} min: held-out Dice "
        + ", ".join(f"{k} {v:.3f}" for k, v in dice.items())
    )
    log(f"      data        {data_root_path}")
    log(f"      model       {run_dir}")
    log(f"      predictions {predictions}")
    log(f"      report      {result.report}")
    return result
