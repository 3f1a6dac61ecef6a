"""The training loop: seeded, resumable, validated, checkpointed, bounded in wall time.

One fold of one configuration trains as follows (:func:`train`):

1. Checks: the manifest has labelled training cases, the fold exists, the plans were made for
   this dataset, and every label map holds only the manifest's ids (which become class indices
   0..n-1 in sorted order, so DRIVE's {0, 255} trains as two classes).
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

Several processes (``ranks``, from ``torchrun``; :mod:`medseg.training.distributed`) train one
model with ``DistributedDataParallel``: each rank draws its own ``batch_size`` patches per
iteration (seeded from ``(seed, epoch, rank)``), so an iteration sees ``world_size * batch_size``
patches; gradients are averaged over the ranks; rank 0 decides the wall-clock schedule and the
stop, validates, and writes the checkpoints and history while the others wait. A resumed run
needs the same number of processes (and, on several nodes, a run folder every node can read).

Example:
    >>> result = train("data_manifests/msd_hippocampus.json", data_root="../shared/data/msd_hippocampus",
    ...                plans="plans.json", config="3d", fold=0, out_dir="runs/hippo",
    ...                time_limit_min=30)                                          # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from medseg import __version__
from medseg.data.manifest import Manifest, load_manifest
from medseg.errors import ManifestError, MedsegUserError
from medseg.io.files import write_json
from medseg.model.checkpoint import load_checkpoint, save_checkpoint
from medseg.model.device import autocast_dtype, select_device
from medseg.planning.plans import check_plans_match, load_plans, validate_plans
from medseg.training.data import CaseCache, EpochBatches, epoch_batches, epoch_seed
from medseg.training.distributed import (
    Ranks,
    agree,
    barrier,
    data_parallel,
    mean_over_ranks,
    process_group,
    rank_device,
)
from medseg.training.ema import WeightAverage
from medseg.training.options import TrainOptions
from medseg.training.state import loader_workers as choose_loader_workers
from medseg.training.state import make_optimizer, restore_run, run_snapshot, write_history
from medseg.training.validation import estimate_validation_seconds, validate

__all__ = ["train", "train_fold"]

_GRAD_CLIP = 12.0


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
def train(
    manifest: Manifest | str | os.PathLike[str],
    *,
    plans: Mapping[str, Any] | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    fold: int | str = 0,
    data_root: str | os.PathLike[str] | None = None,
    ranks: Ranks | None = None,
    **options: Any,
) -> dict[str, Any] | list[dict[str, Any]]:
    """Train one fold (``fold="all"``: every training case; ``"all-cv"``: every fold, into ``out_dir/fold_K``).

    Args:
        manifest: a Manifest, or a manifest path (with ``data_root``).
        plans: plans dict or ``plans.json`` path (from :func:`medseg.planning.plan_dataset`).
        out_dir: run folder (checkpoints, history.csv, resolved_config.json, plans.json).
        fold: fold index; ``"all"`` to train on every labelled training case with no validation
            (nnU-Net's fold "all": a final model once the recipe is chosen); ``"all-cv"`` to train
            every cross-validation fold in turn (an ensemble).
        data_root: data root for a manifest path.
        ranks: this process's place among several training one model (``torchrun``; see
            :class:`~medseg.training.distributed.Ranks`); None: a single process.
        **options: the fields of :class:`~medseg.training.options.TrainOptions` (``config``,
            ``epochs``, ``time_limit_min``, ``device``, ``resume``, ``seed``, ``batch_size``,
            ``iterations_per_epoch``, ``validate_every``, ``learning_rate``, ``ema_decay``, ``precision``,
            ``max_epochs_this_run``, ``num_threads``, ``workers``, ``progress``).

    Returns:
        A summary dict per fold: ``out_dir``, ``epochs``, ``iterations``, ``elapsed_s``,
        ``best_dice`` (mean), ``final_dice`` (per structure), ``best_epoch`` (validation
        results on rank 0 only).

    Raises:
        ManifestError: no labelled training cases, or the fold does not exist.
        LabelValueError: a label map holds ids the manifest does not list.
        MedsegUserError: plans from another dataset, a run folder in use,
            an unknown or invalid option.
    """
    unknown = sorted(set(options) - set(TrainOptions.__dataclass_fields__))
    if unknown:
        raise TypeError(f"train() got unknown options {unknown}")
    run_options = TrainOptions(**options)
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest, data_root=data_root)
    plans_dict = load_plans(plans) if not isinstance(plans, Mapping) else dict(plans)  # validated per fold
    if isinstance(fold, str) and fold not in ("all", "all-cv"):
        if not fold.isdigit():
            raise ManifestError(f"{manifest.name}: fold must be a number, 'all' or 'all-cv', got {fold!r}")
        fold = int(fold)
    threads_before = torch.get_num_threads()
    try:
        with process_group(ranks, device=rank_device(select_device(run_options.device), ranks)):
            if fold == "all-cv":
                if not manifest.folds:
                    raise ManifestError(f"{manifest.name}: no labelled training cases to split into folds")
                return [
                    train_fold(
                        manifest,
                        plans=plans_dict,
                        fold=k,
                        out_dir=Path(out_dir) / f"fold_{k}",
                        options=run_options,
                        ranks=ranks,
                    )
                    for k in range(len(manifest.folds))
                ]
            return train_fold(
                manifest, plans=plans_dict, fold=fold, out_dir=Path(out_dir), options=run_options, ranks=ranks
            )
    finally:
        torch.set_num_threads(threads_before)  # a run's --threads must not outlive it


def train_fold(
    manifest: Manifest,
    *,
    plans: Mapping[str, Any],
    fold: int | str,
    out_dir: Path,
    options: TrainOptions = TrainOptions(),
    ranks: Ranks | None = None,
) -> dict[str, Any]:
    """Train one fold with ``options`` (see :func:`train`); ``torch.set_num_threads`` is the caller's to restore.

    With ``ranks``, the process group must be initialised (:func:`~medseg.training.distributed.process_group`).
    """
    from monai.transforms import Compose
    from tqdm.auto import tqdm

    from medseg.model.networks import build_network
    from medseg.model.objectives import make_objective
    from medseg.model.transforms import (
        default_workers,
        preprocessing,
        training_augmentation,
        training_cache_transforms,
    )

    config, epochs, time_limit_min = options.config, options.epochs, options.time_limit_min
    seed, resume = options.seed, options.resume
    main = ranks is None or ranks.is_main  # rank 0 validates, writes and reports
    progress = options.progress and main
    world_size = ranks.world_size if ranks is not None else 1
    sampling_rank = ranks.rank if ranks is not None and ranks.world_size > 1 else None
    max_epochs_this_run = options.max_epochs_this_run
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
        raise MedsegUserError(
            f"{out_dir}: run folder already holds a checkpoint; pass resume=True or use another folder"
        )
    validate_plans(plans, source=last_path if resume else "plans")  # every key, before any case is read
    check_plans_match(plans, manifest)
    if config not in plans["configurations"]:
        raise MedsegUserError(f"plans have no configuration {config!r} (known: {sorted(plans['configurations'])})")
    cfg = plans["configurations"][config]
    settings = dict(plans.get("training", {}))
    lr0 = float(options.learning_rate if options.learning_rate is not None else settings.get("learning_rate", 0.01))
    batch = int(options.batch_size or cfg["batch_size"])
    per_epoch = int(options.iterations_per_epoch or settings.get("iterations_per_epoch", 100))
    val_every = int(options.validate_every or settings.get("validate_every", 5))
    ema_decay = float(options.ema_decay if options.ema_decay is not None else settings.get("ema_decay", 0.0))
    if epochs is None and time_limit_min is None:
        epochs = int(settings.get("epochs", 1000))
    total_iterations = epochs * per_epoch if epochs is not None else None
    time_limit_s = time_limit_min * 60.0 if time_limit_min is not None else None
    if options.num_threads is not None:
        torch.set_num_threads(int(options.num_threads))
    workers = options.workers or default_workers()
    torch_device = rank_device(select_device(options.device), ranks)
    loader_workers = choose_loader_workers(options.loader_workers, device=torch_device)
    # autocast where the hardware computes it natively (--precision auto): float16 with a gradient
    # scaler on CUDA, bfloat16 on CPUs with AMX / AVX512-BF16 (hippocampus: 0.30 vs 0.59 s per
    # iteration here); weights, optimiser state and the loss stay float32
    precision = options.precision or ("auto" if torch_device.type == "cuda" else "float32")
    amp_dtype = autocast_dtype(torch_device, precision)
    amp = amp_dtype == torch.float16
    resolved = {
        "manifest": manifest.to_json(),
        "fold": fold,
        "config": config,
        "out_dir": str(out_dir),
        "epochs": epochs,
        "time_limit_min": time_limit_min,
        "device": str(torch_device),
        "resume": resume,
        "seed": seed,
        "batch_size": batch,
        "world_size": world_size,
        "patches_per_iteration": batch * world_size,
        "iterations_per_epoch": per_epoch,
        "validate_every": val_every,
        "learning_rate": lr0,
        "ema_decay": ema_decay,
        "max_epochs_this_run": max_epochs_this_run,
        "num_threads": torch.get_num_threads(),
        "workers": workers,
        "loader_workers": loader_workers,
        "amp": amp,
        "autocast_dtype": str(amp_dtype).replace("torch.", "") if amp_dtype is not None else "float32",
        "options": options.to_json(),
        "medseg_version": __version__,
        "torch_version": torch.__version__,
        "train_cases": [c.case_id for c in train_cases],
        "validation_cases": [c.case_id for c in val_cases],
    }
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(resolved, out_dir / "resolved_config.json")
        write_json(plans, out_dir / "plans.json")

    # -- data -----------------------------------------------------------------------------------
    # the fold's cases preprocessed once, within the cache budget: 80 % for training, 20 % for validation
    budget = float(settings.get("cache_budget_gb", 4.0)) * 1024**3
    cache = partial(CaseCache, label_ids=manifest.labels.ids, workers=workers)
    train_cache = cache(train_cases, training_cache_transforms(plans, config), budget_bytes=budget * 0.8)
    val_cache = cache(val_cases, Compose(preprocessing(plans, config)), budget_bytes=budget * 0.2)
    # the cached labels hold class indices (the i-th smallest label id -> i; see CaseCache)
    class_of = {label_id: index for index, label_id in enumerate(manifest.labels.ids)}
    structures = [(s.name, tuple(class_of[i] for i in s.label_ids)) for s in manifest.labels.structures()]
    oversample = float(plans.get("foreground_oversample", 1.0 / 3.0))

    # -- model ----------------------------------------------------------------------------------
    torch.manual_seed(seed)
    network = build_network(
        cfg,
        in_channels=len(plans["normalization"]),  # image channels: an RGB image is one manifest channel
        out_channels=manifest.labels.num_classes,
        backbone_weights=checkpoint is None,
    )
    network.to(torch_device)
    memory_format = torch.channels_last_3d if int(cfg["spatial_dims"]) == 3 else torch.channels_last
    # channels-last is faster for oneDNN on the CPU (~15% per iteration here) as well as for AMP on CUDA
    network.to(memory_format=memory_format)
    optimizer = make_optimizer(network, settings, lr0)
    objective = make_objective(network, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    epoch, iteration, elapsed_before = 0, 0, 0.0
    best_dice, best_epoch = -1.0, -1
    history: list[dict[str, Any]] = []
    average = WeightAverage(network, decay=ema_decay) if ema_decay > 0 else None
    if checkpoint is not None:
        resumed = restore_run(
            checkpoint,
            network=network,
            optimizer=optimizer,
            scaler=scaler if amp else None,
            average=average,
            seed=seed,
            world_size=world_size,
            path=last_path,
        )
        epoch, iteration, elapsed_before = resumed["epoch"], resumed["iteration"], resumed["elapsed_s"]
        best_dice, best_epoch, history = resumed["best_dice"], resumed["best_epoch"], resumed["history"]
    # every rank starts from the same weights (DDP broadcasts rank 0's) and averages its gradients
    model = data_parallel(network, ranks=ranks, device=torch_device)
    poly = float(settings.get("poly_exponent", 0.9))
    run_clock = time.monotonic()

    def elapsed() -> float:
        return elapsed_before + time.monotonic() - run_clock

    def decide_stop_and_rate(stop: bool) -> tuple[bool, float]:
        """Stop now? and the learning rate: rank 0's answer on every rank when the wall clock decides."""
        rate = lr0 * (1.0 - progress_fraction()) ** poly
        if time_limit_s:  # clocks differ between ranks: one rank must not stop while another trains on
            stop_flag, rate = agree([float(stop), rate], ranks=ranks, device=torch_device)
            stop = stop_flag > 0.5
        return stop, rate

    def progress_fraction() -> float:
        fractions = [0.0]
        if total_iterations:
            fractions.append(iteration / total_iterations)
        if time_limit_s:
            # the final validation is inside the budget: the schedule ends where training must stop
            fractions.append(elapsed() / max(time_limit_s - val_seconds, 1e-3))
        return min(1.0, max(fractions))

    def snapshot() -> dict[str, Any]:
        counters = dict(epoch=epoch, iteration=iteration, elapsed_s=elapsed(), best_dice=best_dice)
        counters.update(best_epoch=best_epoch, history=history, seed=seed, world_size=world_size)
        facts = dict(plans=plans, config=config, labels=manifest.labels.to_json(), channels=list(manifest.channels))
        facts["fold"] = fold
        return run_snapshot(network, optimizer, scaler if amp else None, average, counters=counters, facts=facts)

    bar = tqdm(
        total=epochs,
        initial=epoch,
        disable=not progress,
        desc=f"fold {fold} {config}",
        unit="epoch",
        dynamic_ncols=True,
    )
    last_val: dict[str, float] = {}
    val_seconds = 0.0
    reserve_s = 0.0  # of the wall-clock budget, kept for the final validation
    if time_limit_s and len(val_cache) and main:
        # reserve the final validation inside the budget
        val_seconds = estimate_validation_seconds(
            network,
            val_cache,
            cfg=cfg,
            device=torch_device,
            amp_dtype=amp_dtype,
            num_classes=manifest.labels.num_classes,
        )
        reserve_s = val_seconds
        if iteration == 0 and elapsed() + val_seconds >= time_limit_s:
            raise MedsegUserError(
                f"--time-limit-min {time_limit_min:g} leaves no time to train: the final validation of "
                f"{len(val_cache)} cases alone takes about {val_seconds / 60:.1f} min here; give more time"
            )
    epochs_this_run = 0
    finished = False
    while not finished:
        epoch_start = time.monotonic()
        this_seed = epoch_seed(seed, epoch, rank=sampling_rank)
        torch.manual_seed(this_seed)
        stream = EpochBatches(
            train_cache,
            partial(training_augmentation, plans, config),
            seed=this_seed,
            batch_size=batch,
            iterations=per_epoch,
            cfg=cfg,
            oversample=oversample,
        )
        batches = epoch_batches(stream, loader_workers=loader_workers)
        model.train()
        losses = []
        for _ in range(per_epoch):
            stop, lr = decide_stop_and_rate(
                bool(total_iterations and iteration >= total_iterations)
                or bool(time_limit_s and elapsed() + val_seconds >= time_limit_s)
            )
            if stop:
                finished = True
                break
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, labels = next(batches)
            images, labels = images.to(torch_device), labels.to(torch_device)
            images = images.contiguous(memory_format=memory_format)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(
                device_type=torch_device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
            ):
                loss = objective(model, images, labels)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(network.parameters(), _GRAD_CLIP)
            scaler.step(optimizer)
            scaler.update()
            if average is not None:
                average.update(network)
            losses.append(float(loss.detach()))
            iteration += 1
        if not losses:
            break
        epoch += 1
        epochs_this_run += 1
        if (epochs is not None and epoch >= epochs) or (total_iterations and iteration >= total_iterations):
            finished = True
        if time_limit_s:
            finished = decide_stop_and_rate(finished or elapsed() + val_seconds >= time_limit_s)[0]
        row: dict[str, Any] = {
            "epoch": epoch,
            "iteration": iteration,
            "learning_rate": lr,
            "train_loss": mean_over_ranks(float(np.mean(losses)), ranks=ranks, device=torch_device),
            "epoch_time_s": round(time.monotonic() - epoch_start, 3),
        }
        if not main:  # rank 0 validates and writes; the others wait for it
            barrier(ranks)
            if max_epochs_this_run is not None and epochs_this_run >= max_epochs_this_run:
                break
            continue
        if val_cases and (epoch % val_every == 0 or finished):
            val_start = time.monotonic()
            with average.applied(network) if average is not None else nullcontext():
                last_val = validate(
                    network,
                    val_cache,
                    cfg=cfg,
                    structures=structures,
                    device=torch_device,
                    amp_dtype=amp_dtype,
                    num_classes=manifest.labels.num_classes,
                )
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
        write_history(history, out_dir / "history.csv")
        postfix = {"loss": f"{row['train_loss']:.3f}"}
        if last_val:
            postfix["dice"] = f"{last_val['mean']:.3f}"
        if time_limit_s:
            postfix["eta"] = f"{max(0.0, time_limit_s - elapsed()) / 60:.1f}min"
        bar.set_postfix(postfix)
        bar.update(1)
        barrier(ranks)
        if max_epochs_this_run is not None and epochs_this_run >= max_epochs_this_run:
            break
    bar.close()
    if main and not best_path.exists() and last_path.exists():
        # no validation (no validation cases): the last checkpoint is the best we know.
        save_checkpoint(load_checkpoint(last_path), best_path)
    barrier(ranks)
    return {
        "out_dir": str(out_dir),
        "fold": fold,
        "config": config,
        "device": str(torch_device),
        "world_size": world_size,
        "rank": ranks.rank if ranks is not None else 0,
        "epochs": epoch,
        "iterations": iteration,
        "elapsed_s": round(elapsed(), 1),
        "wall_s": round(time.monotonic() - start_clock, 1),
        "best_dice": best_dice,
        "best_epoch": best_epoch,
        "validation_reserve_s": round(reserve_s, 3),
        "final_dice": last_val,
        "cached_cases": train_cache.cached_cases,
        "cache_bytes": train_cache.cached_bytes,
    }
