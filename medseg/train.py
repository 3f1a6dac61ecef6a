"""The training loop: seeded, resumable, validated, checkpointed, bounded in wall time.

One fold of one configuration trains as follows (:func:`train`):

1. Checks: the manifest has labelled training cases, the fold exists, the plans were made for
   this dataset, label ids are contiguous, and every label map holds only the manifest's ids.
2. The fold's training and validation cases are preprocessed once (:mod:`medseg.transforms`) and
   kept in memory within ``cache_budget_gb`` (cases beyond it are preprocessed on each use).
3. Every iteration draws ``batch_size`` cases (numpy ``default_rng((seed, epoch))``), and a random
   foreground-oversampled, augmented patch of each (2D: a random slice first).
4. Loss: MONAI ``DiceCELoss`` (softmax, batch Dice, background excluded from Dice) through
   ``DeepSupervisionLoss`` (weights 1, 1/2, 1/4, ...). Optimiser from the plans: AdamW (lr 3e-3,
   the CPU-friendly default, see :mod:`medseg.plan`) or SGD with Nesterov momentum 0.99 (nnU-Net);
   weight decay 3e-5, gradient norm clipped at 12 (nnU-Net). Learning rate: poly,
   ``lr0 * (1 - progress) ** 0.9`` with ``progress = max(iteration / total_iterations,
   elapsed / time_limit)``, so a wall-clock budget compresses the whole schedule into it.
5. Every ``validate_every`` epochs and at the end: sliding-window prediction
   (:mod:`medseg.sliding`) of every validation case on the preprocessed grid, per-structure Dice
   (labels and regions; ``2TP / (2TP + FP + FN)``, NaN when both are empty), mean over cases.
6. ``checkpoint_last.pt`` after every epoch, ``checkpoint_best.pt`` when the mean validation Dice
   improves, ``history.csv`` and ``resolved_config.json`` in the run folder, all written atomically.

Reproducibility: on the CPU the same seed gives the same weights, and ``resume=True`` continues
exactly where ``checkpoint_last.pt`` stopped, because every epoch reseeds the case sampler, the
augmentation and torch from ``(seed, epoch)``. With a ``time_limit_min`` the schedule depends on
the wall clock, so such runs (and their resumption) are not bit-reproducible.

Example:
    >>> result = train("data_manifests/msd_hippocampus.json", data_root="../shared/data/msd_hippocampus",
    ...                plans="plans.json", config="3d", fold=0, out_dir="runs/hippo",
    ...                time_limit_min=30)                                          # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from medseg.checkpoint import load_checkpoint, medseg_version, save_checkpoint
from medseg.errors import LabelValueError, ManifestError, MedsegUserError
from medseg.io import atomic_path
from medseg.manifest import Case, Manifest, load_manifest
from medseg.plan import check_plans_match, load_plans, save_json

__all__ = ["train", "train_fold", "dice_per_structure", "select_device"]

_GRAD_CLIP = 12.0


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def select_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MedsegUserError("device 'cuda' asked for, but torch sees no CUDA GPU")
    if device != "cpu" and not device.startswith("cuda"):
        raise MedsegUserError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    return torch.device(device)


def dice_per_structure(
    reference: np.ndarray, prediction: np.ndarray, *, structures: Sequence[tuple[str, Sequence[int]]]
) -> dict[str, float]:
    """Dice ``2TP / (2TP + FP + FN)`` of each structure (a set of label ids); NaN when both empty."""
    result = {}
    for name, ids in structures:
        ref = np.isin(reference, ids)
        pred = np.isin(prediction, ids)
        tp = int(np.count_nonzero(ref & pred))
        denominator = int(np.count_nonzero(ref)) + int(np.count_nonzero(pred))
        result[name] = float("nan") if denominator == 0 else 2.0 * tp / denominator
    return result


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _optimizer(network: torch.nn.Module, settings: Mapping[str, Any], lr0: float) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (default, nnU-Net) or AdamW, from the plans' ``training`` section."""
    name = str(settings.get("optimizer", "sgd")).lower()
    weight_decay = float(settings.get("weight_decay", 3e-5))
    if name == "sgd":
        return torch.optim.SGD(
            network.parameters(), lr=lr0, momentum=float(settings.get("momentum", 0.99)),
            nesterov=bool(settings.get("nesterov", True)), weight_decay=weight_decay,
        )
    if name == "adamw":
        return torch.optim.AdamW(network.parameters(), lr=lr0, weight_decay=weight_decay)
    raise MedsegUserError(f"plans: training.optimizer must be 'sgd' or 'adamw', got {name!r}")


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
class _CaseCache:
    """Preprocessed cases in memory up to a byte budget; the rest are preprocessed on use."""

    def __init__(self, cases: Sequence[Case], chain: Any, *, label_ids: Sequence[int],
                 budget_bytes: float, workers: int) -> None:
        self.cases = list(cases)
        self.chain = chain
        self.label_ids = set(int(i) for i in label_ids)
        self.items: dict[int, dict[str, Any]] = {}
        used = 0.0
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for index, item in enumerate(pool.map(self._load, range(len(self.cases)))):
                size = sum(v.numel() * v.element_size() for v in item.values() if isinstance(v, torch.Tensor))
                if used + size <= budget_bytes:
                    self.items[index] = item
                    used += size
        self.cached_bytes = used

    def _load(self, index: int) -> dict[str, Any]:
        case = self.cases[index]
        data = self.chain({"image": list(case.images), "label": case.label})
        label = data["label"]
        values = set(int(v) for v in torch.unique(label).tolist())
        unknown = sorted(values - self.label_ids)
        if unknown:
            raise LabelValueError(
                f"{case.label}: label values {unknown} are not in the manifest's labels {sorted(self.label_ids)}"
            )
        item: dict[str, Any] = {"case_id": case.case_id}
        for key, value in data.items():
            if isinstance(value, torch.Tensor):
                value = value.as_tensor() if hasattr(value, "as_tensor") else value
                item[key] = value.to(torch.uint8) if key == "label" else value
            elif key.endswith("_indices"):
                item[key] = torch.as_tensor(np.asarray(value))
        return item

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items.get(index)
        return item if item is not None else self._load(index)


def _sample_2d(item: Mapping[str, Any], *, slice_axis: int, rng: np.random.Generator, oversample: float) -> dict:
    """One slice of a cached 3D case: with probability ``oversample`` one that holds foreground."""
    label = item["label"]
    axis = slice_axis + 1
    foreground = torch.nonzero((label[0] > 0).movedim(slice_axis, 0).flatten(1).any(1)).flatten()
    if foreground.numel() and rng.random() < oversample:
        index = int(foreground[rng.integers(foreground.numel())])
    else:
        index = int(rng.integers(label.shape[axis]))
    return {"image": item["image"].select(axis, index), "label": label.select(axis, index).float()}


def _plain(value: Any) -> torch.Tensor:
    """A plain tensor (MetaTensor's per-op metadata tracking would slow the network down)."""
    value = torch.as_tensor(value)
    return value.as_tensor() if hasattr(value, "as_tensor") else value


def _batch(cache: _CaseCache, augment: Any, indices: Sequence[int], *, cfg: Mapping[str, Any],
           rng: np.random.Generator, oversample: float) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for index in indices:
        item = cache[int(index)]
        if int(cfg["spatial_dims"]) == 2:
            data = _sample_2d(item, slice_axis=int(cfg["slice_axis"]), rng=rng, oversample=oversample)
        else:
            data = {k: (v.float() if k == "label" else v) for k, v in item.items() if k != "case_id"}
        out = augment(data)
        if isinstance(out, list):
            out = out[0]
        images.append(_plain(out["image"]).float())
        labels.append(_plain(out["label"]).round().long())
    return torch.stack(images), torch.stack(labels)


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
def _validate(network, cache: _CaseCache, *, cfg, structures, device, amp) -> dict[str, float]:
    from medseg.sliding import predict_probabilities

    scores: dict[str, list[float]] = {name: [] for name, _ in structures}
    for index in range(len(cache)):
        item = cache[index]
        probabilities = predict_probabilities(network, item["image"], plans_config=cfg, device=device, amp=amp,
                                              sw_batch_size=int(cfg.get("batch_size", 2)))
        prediction = probabilities.argmax(0).numpy()
        reference = item["label"][0].numpy()
        for name, value in dice_per_structure(reference, prediction, structures=structures).items():
            scores[name].append(value)
    result = {}
    for name, values in scores.items():
        finite = [v for v in values if not math.isnan(v)]
        result[name] = float(np.mean(finite)) if finite else float("nan")
    finite = [v for v in result.values() if not math.isnan(v)]
    result["mean"] = float(np.mean(finite)) if finite else float("nan")
    return result


def _write_history(history: list[dict[str, Any]], path: Path) -> None:
    columns: list[str] = []
    for row in history:
        columns += [c for c in row if c not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(history)
    with atomic_path(path) as temporary:
        temporary.write_text(buffer.getvalue(), encoding="utf-8")


def train(
    manifest: Manifest | str | os.PathLike[str],
    *,
    plans: Mapping[str, Any] | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: str = "3d",
    fold: int | str = 0,
    data_root: str | os.PathLike[str] | None = None,
    epochs: int | None = None,
    time_limit_min: float | None = None,
    device: str = "auto",
    resume: bool = False,
    seed: int = 0,
    batch_size: int | None = None,
    iterations_per_epoch: int | None = None,
    validate_every: int | None = None,
    learning_rate: float | None = None,
    max_epochs_this_run: int | None = None,
    num_threads: int | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any] | list[dict[str, Any]]:
    """Train one fold (or every fold, ``fold="all"``, into ``out_dir/fold_K``) of a configuration.

    Args:
        manifest: a Manifest, or a manifest path (with ``data_root``).
        plans: plans dict or ``plans.json`` path (from :func:`medseg.plan.plan_dataset`).
        out_dir: run folder (checkpoints, history.csv, resolved_config.json, plans.json).
        config: ``"3d"`` or ``"2d"`` (a key of ``plans["configurations"]``).
        fold: fold index, or ``"all"`` to run every fold in turn.
        data_root: data root for a manifest path.
        epochs: epochs; default the plans' ``training.epochs``, or unbounded with a time limit.
        time_limit_min: wall-clock training budget (minutes); the schedule is compressed into it.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        resume: continue from ``out_dir/checkpoint_last.pt``.
        seed: seed of sampling, augmentation and initialisation.
        batch_size, iterations_per_epoch, validate_every, learning_rate: override the plans.
        max_epochs_this_run: stop after this many epochs in this call (the schedule still spans
            ``epochs``); resume later to continue.
        num_threads: torch CPU threads (``torch.set_num_threads``); default unchanged.
        workers: threads preprocessing cases; default the CPUs available (at most 8).
        progress: show a tqdm progress bar.

    Returns:
        A summary dict per fold: ``out_dir``, ``epochs``, ``iterations``, ``elapsed_s``,
        ``best_dice`` (mean), ``final_dice`` (per structure), ``best_epoch``.

    Raises:
        ManifestError: no labelled training cases, or the fold does not exist.
        LabelValueError: a label map holds ids the manifest does not list.
        MedsegUserError: plans from another dataset, non-contiguous label ids, run folder in use.
    """
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest, data_root=data_root)
    plans_dict = load_plans(plans) if not isinstance(plans, Mapping) else dict(plans)
    options = dict(
        config=config, epochs=epochs, time_limit_min=time_limit_min, device=device, resume=resume,
        seed=seed, batch_size=batch_size, iterations_per_epoch=iterations_per_epoch,
        validate_every=validate_every, learning_rate=learning_rate,
        max_epochs_this_run=max_epochs_this_run, num_threads=num_threads, workers=workers,
        progress=progress,
    )
    if isinstance(fold, str) and fold != "all":
        if not fold.isdigit():
            raise ManifestError(f"{manifest.name}: fold must be a number or 'all', got {fold!r}")
        fold = int(fold)
    if fold == "all":
        if not manifest.folds:
            raise ManifestError(f"{manifest.name}: no labelled training cases to split into folds")
        return [
            train_fold(manifest, plans=plans_dict, fold=k, out_dir=Path(out_dir) / f"fold_{k}", **options)
            for k in range(len(manifest.folds))
        ]
    return train_fold(manifest, plans=plans_dict, fold=int(fold), out_dir=Path(out_dir), **options)


def train_fold(
    manifest: Manifest,
    *,
    plans: Mapping[str, Any],
    fold: int,
    out_dir: Path,
    config: str = "3d",
    epochs: int | None = None,
    time_limit_min: float | None = None,
    device: str = "auto",
    resume: bool = False,
    seed: int = 0,
    batch_size: int | None = None,
    iterations_per_epoch: int | None = None,
    validate_every: int | None = None,
    learning_rate: float | None = None,
    max_epochs_this_run: int | None = None,
    num_threads: int | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one fold; see :func:`train` for the arguments."""
    from monai.losses import DeepSupervisionLoss, DiceCELoss
    from monai.transforms import Compose
    from tqdm.auto import tqdm

    from medseg.networks import build_network, deep_supervision_outputs
    from medseg.transforms import (
        augmentation_probabilities, default_workers, preprocessing, training_augmentation, training_cache_transforms,
    )

    start_clock = time.monotonic()
    # -- checks ---------------------------------------------------------------------------------
    if not manifest.labelled_cases or not manifest.folds:
        raise ManifestError(f"{manifest.name}: no labelled training cases to train on")
    train_cases, val_cases = manifest.fold(fold)
    if not train_cases:
        raise ManifestError(f"{manifest.name}: fold {fold} leaves no training cases")
    out_dir = Path(out_dir)
    last_path, best_path = out_dir / "checkpoint_last.pt", out_dir / "checkpoint_best.pt"
    checkpoint = None
    if resume:
        checkpoint = load_checkpoint(last_path)
        plans = checkpoint["plans"]
        config = checkpoint["config"]
    elif last_path.exists():
        raise MedsegUserError(f"{out_dir}: run folder already holds a checkpoint; pass resume=True or use another folder")
    check_plans_match(plans, manifest)
    if config not in plans["configurations"]:
        raise MedsegUserError(f"plans have no configuration {config!r} (known: {sorted(plans['configurations'])})")
    if not manifest.labels.is_contiguous:
        raise MedsegUserError(
            f"{manifest.name}: label ids {list(manifest.labels.ids)} are not 0..{manifest.labels.num_classes - 1}; "
            "a network needs contiguous ids (map them with 'label_value_map' in the manifest)"
        )
    augmentation_probabilities(plans)  # a bad augmentation section fails now, not after caching
    cfg = plans["configurations"][config]
    settings = dict(plans.get("training", {}))
    lr0 = float(learning_rate if learning_rate is not None else settings.get("learning_rate", 0.01))
    batch = int(batch_size or cfg["batch_size"])
    per_epoch = int(iterations_per_epoch or settings.get("iterations_per_epoch", 100))
    val_every = int(validate_every or settings.get("validate_every", 5))
    if epochs is None and time_limit_min is None:
        epochs = int(settings.get("epochs", 1000))
    total_iterations = epochs * per_epoch if epochs is not None else None
    if time_limit_min is not None and not time_limit_min > 0:
        raise MedsegUserError(f"time limit must be > 0 minutes, got {time_limit_min}")
    time_limit_s = time_limit_min * 60.0 if time_limit_min is not None else None
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    workers = workers or default_workers()
    torch_device = select_device(device)
    amp = torch_device.type == "cuda"
    resolved = {
        "manifest": manifest.to_json(), "fold": fold, "config": config, "out_dir": str(out_dir),
        "epochs": epochs, "time_limit_min": time_limit_min, "device": str(torch_device), "resume": resume,
        "seed": seed, "batch_size": batch, "iterations_per_epoch": per_epoch, "validate_every": val_every,
        "learning_rate": lr0, "max_epochs_this_run": max_epochs_this_run, "num_threads": torch.get_num_threads(),
        "workers": workers, "amp": amp, "medseg_version": medseg_version(), "torch_version": torch.__version__,
        "train_cases": [c.case_id for c in train_cases], "validation_cases": [c.case_id for c in val_cases],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_json(resolved, out_dir / "resolved_config.json")
    save_json(plans, out_dir / "plans.json")

    # -- data -----------------------------------------------------------------------------------
    budget = float(settings.get("cache_budget_gb", 4.0)) * 1024**3
    label_ids = manifest.labels.ids
    train_cache = _CaseCache(train_cases, training_cache_transforms(plans, config), label_ids=label_ids,
                             budget_bytes=budget * 0.8, workers=workers)
    val_cache = _CaseCache(val_cases, Compose(preprocessing(plans, config)),
                           label_ids=label_ids, budget_bytes=budget * 0.2, workers=workers)
    structures = [(s.name, s.label_ids) for s in manifest.labels.structures()]
    oversample = float(plans.get("foreground_oversample", 1.0 / 3.0))

    # -- model ----------------------------------------------------------------------------------
    torch.manual_seed(seed)
    network = build_network(cfg, in_channels=len(manifest.channels), out_channels=manifest.labels.num_classes)
    network.to(torch_device)
    memory_format = torch.channels_last_3d if int(cfg["spatial_dims"]) == 3 else torch.channels_last
    # channels-last is faster for oneDNN on the CPU (~15% per iteration here) as well as for AMP on CUDA
    network.to(memory_format=memory_format)
    optimizer = _optimizer(network, settings, lr0)
    loss_fn = DeepSupervisionLoss(
        DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True,
                   smooth_nr=1e-5, smooth_dr=1e-5),
        weight_mode="exp",
    )
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    epoch, iteration, elapsed_before = 0, 0, 0.0
    best_dice, best_epoch = -1.0, -1
    history: list[dict[str, Any]] = []
    if checkpoint is not None:
        network.load_state_dict(checkpoint["model"])
        state = checkpoint["training"]
        optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state and amp:
            scaler.load_state_dict(state["scaler"])
        epoch, iteration = int(state["epoch"]), int(state["iteration"])
        elapsed_before = float(state["elapsed_s"])
        best_dice, best_epoch = float(state["best_dice"]), int(state["best_epoch"])
        history = [dict(row) for row in state["history"]]
        _set_rng_state(state["rng"])
        saved_seed = state.get("seed")
        if saved_seed is not None and int(saved_seed) != int(seed):
            raise MedsegUserError(
                f"{last_path}: run was started with seed {int(saved_seed)}; resume with the same --seed "
                f"(got {seed}) or it would not continue the same run"
            )
    poly = float(settings.get("poly_exponent", 0.9))
    run_clock = time.monotonic()

    def elapsed() -> float:
        return elapsed_before + time.monotonic() - run_clock

    def progress_fraction() -> float:
        fractions = [0.0]
        if total_iterations:
            fractions.append(iteration / total_iterations)
        if time_limit_s:
            # the final validation is inside the budget: the schedule ends where training must stop
            fractions.append(elapsed() / max(time_limit_s - val_seconds, 1e-3))
        return min(1.0, max(fractions))

    def snapshot() -> dict[str, Any]:
        training_state = {
            "optimizer": optimizer.state_dict(), "epoch": epoch, "iteration": iteration,
            "elapsed_s": elapsed(), "best_dice": best_dice, "best_epoch": best_epoch,
            "history": history, "rng": _rng_state(), "seed": seed,
        }
        if amp:
            training_state["scaler"] = scaler.state_dict()
        return {
            "model": {k: v.detach().cpu() for k, v in network.state_dict().items()},
            "plans": plans, "config": config, "labels": manifest.labels.to_json(),
            "channels": list(manifest.channels), "fold": fold, "training": training_state,
        }

    bar = tqdm(total=epochs, initial=epoch, disable=not progress, desc=f"fold {fold} {config}", unit="epoch",
               dynamic_ncols=True)
    last_val: dict[str, float] = {}
    val_seconds = 0.0
    if time_limit_s and len(val_cache):
        # reserve the final validation inside the budget: time one case, scale to all of them
        from medseg.sliding import predict_probabilities

        for _ in range(2):  # the second call is timed: the first pays one-off start-up costs
            probe_start = time.monotonic()
            predict_probabilities(network, val_cache[0]["image"], plans_config=cfg, device=torch_device, amp=amp,
                                  sw_batch_size=int(cfg.get("batch_size", 2)))
        val_seconds = (time.monotonic() - probe_start) * len(val_cache) * 1.1
    epochs_this_run = 0
    finished = False
    while not finished:
        epoch_start = time.monotonic()
        epoch_seed = _epoch_seed(seed, epoch)
        rng = np.random.default_rng(epoch_seed)
        torch.manual_seed(epoch_seed)
        augment = training_augmentation(plans, config, seed=epoch_seed % (2**32 - 1))
        network.train()
        losses = []
        for _ in range(per_epoch):
            if (total_iterations and iteration >= total_iterations) or (
                time_limit_s and elapsed() + val_seconds >= time_limit_s
            ):
                finished = True
                break
            lr = lr0 * (1.0 - progress_fraction()) ** poly
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, labels = _batch(train_cache, augment, rng.integers(len(train_cache), size=batch),
                                    cfg=cfg, rng=rng, oversample=oversample)
            images, labels = images.to(torch_device), labels.to(torch_device)
            images = images.contiguous(memory_format=memory_format)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=torch_device.type, dtype=torch.float16, enabled=amp):
                outputs = deep_supervision_outputs(network(images), spatial_dims=int(cfg["spatial_dims"]))
                loss = loss_fn([o.float() for o in outputs], labels)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(network.parameters(), _GRAD_CLIP)
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
            iteration += 1
        if not losses:
            break
        epoch += 1
        epochs_this_run += 1
        if (epochs is not None and epoch >= epochs) or (total_iterations and iteration >= total_iterations):
            finished = True
        if time_limit_s and elapsed() + val_seconds >= time_limit_s:
            finished = True
        row: dict[str, Any] = {
            "epoch": epoch, "iteration": iteration, "learning_rate": lr,
            "train_loss": float(np.mean(losses)), "epoch_time_s": round(time.monotonic() - epoch_start, 3),
        }
        if val_cases and (epoch % val_every == 0 or finished):
            val_start = time.monotonic()
            last_val = _validate(network, val_cache, cfg=cfg, structures=structures, device=torch_device, amp=amp)
            val_seconds = time.monotonic() - val_start
            row.update({f"val_dice_{k}": v for k, v in last_val.items()})
            row["val_time_s"] = round(val_seconds, 3)
            if not math.isnan(last_val["mean"]) and last_val["mean"] > best_dice:
                best_dice, best_epoch = last_val["mean"], epoch
                row["elapsed_s"] = round(elapsed(), 3)
                history.append(row)
                save_checkpoint(snapshot(), best_path)
                history.pop()
        row["elapsed_s"] = round(elapsed(), 3)
        history.append(row)
        save_checkpoint(snapshot(), last_path)
        _write_history(history, out_dir / "history.csv")
        postfix = {"loss": f"{row['train_loss']:.3f}"}
        if last_val:
            postfix["dice"] = f"{last_val['mean']:.3f}"
        if time_limit_s:
            postfix["eta"] = f"{max(0.0, time_limit_s - elapsed()) / 60:.1f}min"
        bar.set_postfix(postfix)
        bar.update(1)
        if max_epochs_this_run is not None and epochs_this_run >= max_epochs_this_run:
            break
    bar.close()
    if not best_path.exists() and last_path.exists():
        # no validation (no validation cases): the last checkpoint is the best we know.
        save_checkpoint(load_checkpoint(last_path), best_path)
    return {
        "out_dir": str(out_dir), "fold": fold, "config": config, "device": str(torch_device), "epochs": epoch, "iterations": iteration,
        "elapsed_s": round(elapsed(), 1), "wall_s": round(time.monotonic() - start_clock, 1),
        "best_dice": best_dice, "best_epoch": best_epoch, "final_dice": last_val,
        "cached_cases": len(train_cache.items), "cache_bytes": train_cache.cached_bytes,
    }
