"""Training data: preprocessed cases held in memory, and batches of augmented patches drawn from them.

Cases are preprocessed once (:func:`medseg.model.transforms.training_cache_transforms`) by a pool
of threads and kept in memory within a byte budget; cases beyond it are preprocessed again on each
use. Every iteration draws ``batch_size`` cases with a numpy generator seeded from
``(seed, epoch)`` and one foreground-oversampled, augmented patch of each (2D: a random slice
first), so a run is reproducible on the CPU and resumable exactly.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from medseg.data.manifest import Case
from medseg.errors import LabelValueError

__all__ = ["CaseCache", "epoch_seed", "sample_batch"]


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class CaseCache:
    """Preprocessed cases in memory up to a byte budget; the rest are preprocessed on use."""

    def __init__(
        self, cases: Sequence[Case], chain: Any, *, label_ids: Sequence[int], budget_bytes: float, workers: int
    ) -> None:
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


def sample_batch(
    cache: CaseCache,
    augment: Any,
    indices: Sequence[int],
    *,
    cfg: Mapping[str, Any],
    rng: np.random.Generator,
    oversample: float,
) -> tuple[torch.Tensor, torch.Tensor]:
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
