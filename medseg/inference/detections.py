"""Instances of a detection network (Mask R-CNN): windows -> detections -> per-slice instance maps ->
3D instances linked across slices -> the input grid, with a score per instance.

For one image, preprocessed by the model's plans (a 2D configuration; a 2D image is one slice):

1. Each slice along the configuration's ``slice_axis`` is covered by patch-sized windows (half a
   patch apart, the last one flush with the edge; a slice smaller than the patch is padded with
   zeros, the mean of the z-scored image). Every fold's detector runs on every window; there is no
   test-time augmentation.
2. A slice's detections (all windows, all folds) are placed in slice coordinates and merged by
   non-maximum suppression of their boxes per class (IoU 0.5). Those scoring at least the plans'
   ``score_threshold`` become the slice's instances in descending score order; a pixel is an
   instance's where its mask probability exceeds ``mask_threshold`` and no higher-scoring
   instance took it first; an instance left with no pixel is dropped.
3. Instances of consecutive slices are one 3D instance when they have the same class and share
   at least half of the smaller one's pixels; pairs are linked best overlap first, each instance
   to at most one in the slice before. A 3D instance's score is the area-weighted mean of its
   slices' scores.
4. The instance map is carried onto the input grid by nearest-neighbour lookup through the same
   voxel mapping the labels use (:func:`medseg.inference.invert.ids_to_input_grid`) and renumbered
   1..N by descending score (an instance that no input voxel keeps is dropped).

The table has one row per instance: ``instance_id, label, structure, score, voxels, volume_ml``;
``medseg evaluate --scores`` reads it for AP50/AP75.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from medseg.core.labels import LabelSet

__all__ = [
    "SliceInstances",
    "detect_slice",
    "instance_table",
    "link_slices",
    "panoptic_from_instances",
    "renumber_by_score",
    "window_starts",
    "write_instance_table",
]


@dataclass
class SliceInstances:
    """The instances of one 2D slice: an int32 map (ids 1..N), and the score and class index of each id."""

    instance_map: np.ndarray
    scores: list[float]
    classes: list[int]


def window_starts(length: int, patch: int) -> list[int]:
    """First index of each window along an axis: half a patch apart, the last flush with the end."""
    if length <= patch:
        return [0]
    step = max(1, patch // 2)
    starts = list(range(0, length - patch + 1, step))
    if starts[-1] != length - patch:
        starts.append(length - patch)
    return starts


@torch.no_grad()
def detect_slice(
    detectors: Sequence[torch.nn.Module],
    image: torch.Tensor,
    *,
    patch_size: Sequence[int],
    score_threshold: float,
    mask_threshold: float,
    device: torch.device,
    windows_per_batch: int = 4,
) -> SliceInstances:
    """Steps 1-2 of the module docstring on one ``(C, H, W)`` preprocessed slice."""
    from torchvision.ops import batched_nms

    channels, height, width = image.shape
    patch_h, patch_w = (int(p) for p in patch_size)
    padded = torch.zeros((channels, max(height, patch_h), max(width, patch_w)), dtype=torch.float32)
    padded[:, :height, :width] = image
    origins = [(r, c) for r in window_starts(padded.shape[1], patch_h) for c in window_starts(padded.shape[2], patch_w)]
    boxes, scores, classes, masks, offsets = [], [], [], [], []
    for detector in detectors:
        detector.eval()
        for first in range(0, len(origins), windows_per_batch):
            group = origins[first : first + windows_per_batch]
            windows = [padded[:, r : r + patch_h, c : c + patch_w].to(device) for r, c in group]
            for (r, c), found in zip(group, detector(windows)):
                keep = found["scores"] >= score_threshold
                if not bool(keep.any()):
                    continue
                shift = torch.tensor([c, r, c, r], dtype=torch.float32)
                boxes.append(found["boxes"][keep].float().cpu() + shift)
                scores.append(found["scores"][keep].float().cpu())
                classes.append(found["labels"][keep].cpu())
                masks.extend(m[0].float().cpu() for m in found["masks"][keep])
                offsets.extend([(r, c)] * int(keep.sum()))
    instance_map = np.zeros((height, width), dtype=np.int32)
    if not boxes:
        return SliceInstances(instance_map, [], [])
    all_scores, all_classes = torch.cat(scores), torch.cat(classes)
    kept = batched_nms(torch.cat(boxes), all_scores, all_classes, 0.5)  # indices by descending score
    kept_scores: list[float] = []
    kept_classes: list[int] = []
    for index in kept.tolist():
        r, c = offsets[index]
        mask = masks[index].numpy() > mask_threshold
        rows, cols = min(patch_h, height - r), min(patch_w, width - c)  # the window part inside the slice
        if rows <= 0 or cols <= 0:
            continue
        region = instance_map[r : r + rows, c : c + cols]
        pixels = mask[:rows, :cols] & (region == 0)
        if not pixels.any():
            continue
        kept_scores.append(float(all_scores[index]))
        kept_classes.append(int(all_classes[index]))
        region[pixels] = len(kept_scores)
    return SliceInstances(instance_map, kept_scores, kept_classes)


def link_slices(slices: Sequence[SliceInstances]) -> tuple[list[np.ndarray], dict[int, dict[str, Any]]]:
    """Step 3 of the module docstring: per-slice maps with 3D ids, and ``{id: {"class", "score"}}``."""
    linked: list[np.ndarray] = []
    totals: dict[int, list[float]] = {}  # id -> [class, sum of score x area, area]
    previous: np.ndarray | None = None
    previous_global: dict[int, int] = {}
    previous_info: SliceInstances | None = None
    next_id = 1
    for current in slices:
        count = len(current.scores)
        areas = np.bincount(current.instance_map.ravel(), minlength=count + 1)
        global_of: dict[int, int] = {}
        if previous is not None and previous_info is not None and count and previous_global:
            both = (previous > 0) & (current.instance_map > 0)
            pairs = previous[both].astype(np.int64) * (count + 1) + current.instance_map[both]
            shared = np.bincount(pairs, minlength=(len(previous_info.scores) + 1) * (count + 1))
            previous_areas = np.bincount(previous.ravel(), minlength=len(previous_info.scores) + 1)
            taken: set[int] = set()
            for pair in np.argsort(-shared, kind="stable"):
                overlap = int(shared[pair])
                if overlap == 0:
                    break
                before, now = divmod(int(pair), count + 1)
                if before in taken or now in global_of:
                    continue
                if previous_info.classes[before - 1] != current.classes[now - 1]:
                    continue
                if overlap * 2 >= min(int(previous_areas[before]), int(areas[now])):
                    global_of[now] = previous_global[before]
                    taken.add(before)
        for local in range(1, count + 1):
            if local not in global_of:
                global_of[local] = next_id
                totals[next_id] = [float(current.classes[local - 1]), 0.0, 0.0]
                next_id += 1
            entry = totals[global_of[local]]
            entry[1] += current.scores[local - 1] * float(areas[local])
            entry[2] += float(areas[local])
        lookup = np.zeros(count + 1, dtype=np.int32)
        for local, global_id in global_of.items():
            lookup[local] = global_id
        linked.append(lookup[current.instance_map])
        previous, previous_global, previous_info = current.instance_map, global_of, current
    info = {
        global_id: {"class": int(cls), "score": (weighted / area) if area else 0.0}
        for global_id, (cls, weighted, area) in totals.items()
    }
    return linked, info


def renumber_by_score(
    instances: np.ndarray, info: Mapping[int, Mapping[str, Any]]
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Step 4's renumbering: ids 1..N by descending score among the ids present; their class and score in order."""
    present = [int(i) for i in np.unique(instances) if i != 0]
    order = sorted(present, key=lambda i: (-info[i]["score"], i))
    lookup = np.zeros(int(instances.max(initial=0)) + 1, dtype=np.int32)
    rows = []
    for new_id, old_id in enumerate(order, start=1):
        lookup[old_id] = new_id
        rows.append({"instance_id": new_id, "class": info[old_id]["class"], "score": float(info[old_id]["score"])})
    return lookup[instances], rows


def instance_table(
    instances: np.ndarray, rows: Sequence[Mapping[str, Any]], *, labels: LabelSet, voxel_volume_ml: float
) -> list[dict[str, Any]]:
    """The per-instance table (see the module docstring) of a renumbered instance map."""
    voxels = np.bincount(instances.ravel(order="K"), minlength=len(rows) + 1)
    table = []
    for row in rows:
        label_id = int(labels.ids[row["class"]])
        table.append(
            {
                "instance_id": row["instance_id"],
                "label": label_id,
                "structure": labels.name_of(label_id),
                "score": round(row["score"], 6),
                "voxels": int(voxels[row["instance_id"]]),
                "volume_ml": round(float(voxels[row["instance_id"]]) * voxel_volume_ml, 6),
            }
        )
    return table


def panoptic_from_instances(
    label_array: np.ndarray, instances: np.ndarray, table: Sequence[Mapping[str, Any]], *, divisor: int
) -> np.ndarray | None:
    """``label x divisor`` everywhere, and ``label x divisor + k`` on the k-th instance of each label
    (k = 1, 2, ... in the table's order); an instance's voxels take its own label. None when a label
    has ``divisor`` instances or more, which the encoding cannot number."""
    per_label: dict[int, int] = {}
    for row in table:
        per_label[int(row["label"])] = per_label.get(int(row["label"]), 0) + 1
    if any(count >= divisor for count in per_label.values()):
        return None
    panoptic = label_array.astype(np.int32) * divisor
    count: dict[int, int] = {}
    for row in table:
        label = int(row["label"])
        count[label] = count.get(label, 0) + 1
        panoptic[instances == row["instance_id"]] = label * divisor + count[label]
    return panoptic


def write_instance_table(table: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """The per-instance table as CSV, written atomically (columns as :func:`instance_table`)."""
    import csv
    import io

    from medseg.io.files import write_text

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["instance_id", "label", "structure", "score", "voxels", "volume_ml"])
    writer.writeheader()
    writer.writerows(table)
    return write_text(buffer.getvalue(), path)
