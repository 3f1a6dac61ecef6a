"""Training data: preprocessed cases cached by MONAI, and the epoch's stream of augmented patch batches.

* :class:`CaseCache`: the cases preprocessed once (:func:`medseg.model.transforms.training_cache_transforms`)
  by MONAI's ``CacheDataset`` with ``workers`` threads, within a byte budget (sized from the first
  case); cases beyond it are preprocessed again on each use -- in the background loader when there
  is one, not on the training thread.
* :class:`EpochBatches`: every iteration draws ``batch_size`` cases with a numpy generator seeded
  from ``(seed, epoch)`` and one foreground-oversampled, augmented patch of each (2D: a random
  slice first). The stream depends only on ``(seed, epoch)`` (and the rank, when several processes
  train one model: :func:`epoch_seed`), so a run is reproducible on the CPU
  and resumable exactly, whether the batches are made on the training thread or in one background
  worker process (``loader_workers=1``, MONAI's ``DataLoader``), which then prepares the next
  batches while the network trains on the current one.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterator
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from monai.transforms import Compose, MapTransform
from torch.utils.data import IterableDataset

from medseg.data.manifest import Case
from medseg.errors import LabelValueError, MedsegUserError

__all__ = ["CaseCache", "EpochBatches", "epoch_batches", "epoch_seed", "sample_batch"]


def epoch_seed(seed: int, epoch: int, *, rank: int | None = None) -> int:
    """The seed of one epoch's case sampling and augmentation: ``SeedSequence([seed, epoch])``.

    With several training processes each rank draws its own patches: ``SeedSequence([seed, epoch,
    rank])`` (``rank`` is given only when there is more than one process, so a single process
    draws the same batches with or without torchrun).
    """
    entropy = [seed, epoch] if rank is None else [seed, epoch, rank]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


class _CacheItemd(MapTransform):
    """Last step of the cache chain: check label values, keep plain tensors (uint8 labels).

    Label ids become class indices (the i-th smallest id -> i), so a network trains on ids such
    as DRIVE's {0, 255}; prediction maps class indices back to ids. Contiguous ids are unchanged.
    """

    def __init__(self, label_ids: Sequence[int]) -> None:
        super().__init__(("image", "label"), allow_missing_keys=True)
        self.label_ids = {int(i) for i in label_ids}
        self.class_of = torch.zeros(max(self.label_ids) + 1, dtype=torch.uint8)
        self.class_of[sorted(self.label_ids)] = torch.arange(len(self.label_ids), dtype=torch.uint8)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        label = data["label"]
        unknown = sorted({int(v) for v in torch.unique(label).tolist()} - self.label_ids)
        if unknown:
            where = label.meta.get("filename_or_obj", "label") if hasattr(label, "meta") else "label"
            raise LabelValueError(
                f"{where}: label values {unknown} are not in the manifest's labels {sorted(self.label_ids)}"
            )
        item: dict[Hashable, Any] = {"case_id": data.get("case_id")}
        for key, value in data.items():
            if isinstance(value, torch.Tensor):
                value = value.as_tensor() if hasattr(value, "as_tensor") else value
                item[key] = self.class_of[value.round().long()] if key == "label" else value
            elif isinstance(key, str) and key.endswith("_indices"):
                item[key] = torch.as_tensor(np.asarray(value))
        return item


def _item_bytes(item: Mapping[Hashable, Any]) -> int:
    return sum(v.numel() * v.element_size() for v in item.values() if isinstance(v, torch.Tensor))


class CaseCache:
    """Preprocessed cases (MONAI ``CacheDataset``) in memory up to a byte budget.

    Args:
        cases: the cases, in order.
        chain: the deterministic preprocessing ``Compose``.
        label_ids: the manifest's label ids (any other value in a label map is a LabelValueError).
        budget_bytes: memory for cached cases; the number cached is ``budget // size of the first``.
        workers: threads preprocessing cases.
    """

    def __init__(
        self, cases: Sequence[Case], chain: Compose, *, label_ids: Sequence[int], budget_bytes: float, workers: int
    ) -> None:
        self.cases = list(cases)
        self.chain = Compose([*chain.transforms, _CacheItemd(label_ids)])
        data = [{"image": list(c.images), "label": c.label, "case_id": c.case_id} for c in self.cases]
        self.cached_cases, self.cached_bytes = 0, 0
        if not data:
            self.dataset: CacheDataset | None = None
            return
        first = _unwrapped(self.chain, dict(data[0]))
        size = max(_item_bytes(first), 1)
        self.cached_cases = int(min(len(data), max(0, budget_bytes // size)))
        # copy_cache=False: batches never modify cached tensors in place (augmentations return new ones)
        self.dataset = _unwrapped(
            CacheDataset,
            data,
            transform=self.chain,
            cache_num=self.cached_cases,
            num_workers=max(1, workers),
            progress=False,
            copy_cache=False,
        )
        self.cached_bytes = sum(_item_bytes(self.dataset[i]) for i in range(self.cached_cases))  # no copies
        # cases beyond the budget are checked now (label values), not when a batch first needs them
        for case in self.cases[self.cached_cases :]:
            _check_label_values(case, self.chain.transforms[-1].label_ids)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.dataset is None:
            raise IndexError(index)
        return _unwrapped(self.dataset.__getitem__, int(index))


def _unwrapped(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``function``; a user error that MONAI's ``Compose`` wrapped in a RuntimeError is re-raised as it was."""
    try:
        return function(*args, **kwargs)
    except RuntimeError as error:
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, MedsegUserError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None


def _check_label_values(case: Case, label_ids: set[int]) -> None:
    from medseg.io.volumes import read_volume

    values = {int(v) for v in np.unique(read_volume(case.label, kind="label").array)}
    unknown = sorted(values - label_ids)
    if unknown:
        raise LabelValueError(
            f"{case.label}: label values {unknown} are not in the manifest's labels {sorted(label_ids)}"
        )


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


def sample_batch(
    cache: CaseCache | Sequence[Mapping[str, Any]],
    augment: Any,
    indices: Sequence[int],
    *,
    cfg: Mapping[str, Any],
    rng: np.random.Generator,
    oversample: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch ``(images (B, C, *patch), labels (B, 1, *patch))``: an augmented patch of each case."""
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


class EpochBatches(IterableDataset):
    """The batches of one epoch, a stream that depends only on ``(seed, epoch)``.

    Args:
        cache: the training cases.
        augment_factory: ``seed -> augmentation Compose`` (seeded per epoch).
        seed: the epoch's seed (:func:`epoch_seed`).
        batch_size: cases per batch.
        iterations: batches in the epoch.
        cfg: the plans' configuration.
        oversample: probability of a foreground-centred patch (2D: a slice with foreground).
    """

    def __init__(
        self,
        cache: CaseCache,
        augment_factory: Any,
        *,
        seed: int,
        batch_size: int,
        iterations: int,
        cfg: Mapping[str, Any],
        oversample: float,
    ) -> None:
        super().__init__()
        self.cache, self.augment_factory = cache, augment_factory
        self.seed, self.batch_size, self.iterations = seed, batch_size, iterations
        self.cfg, self.oversample = dict(cfg), oversample

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rng = np.random.default_rng(self.seed)
        augment = self.augment_factory(seed=self.seed % (2**32 - 1))
        for _ in range(self.iterations):
            indices = rng.integers(len(self.cache), size=self.batch_size)
            yield sample_batch(self.cache, augment, indices, cfg=self.cfg, rng=rng, oversample=self.oversample)


def _batch_as_is(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


def epoch_batches(stream: EpochBatches, *, loader_workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Iterate an epoch's batches on this thread (``loader_workers=0``) or in one background process.

    One worker (forked, so the cache is shared, not copied) runs the same stream; batches are
    identical either way. More workers would each need a share of one sequential random stream,
    so at most one is used.
    """
    if loader_workers <= 0:
        return iter(stream)
    loader = DataLoader(
        stream,
        batch_size=None,
        # the stream yields finished (images, labels) batches: MONAI's default collate would stack the
        # two into one tensor (which fails as soon as images have more channels than labels)
        collate_fn=_batch_as_is,
        num_workers=1,
        prefetch_factor=2,
        persistent_workers=False,
        multiprocessing_context="fork" if hasattr(os, "fork") else None,
    )
    return iter(loader)
