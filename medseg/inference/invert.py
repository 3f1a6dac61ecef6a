"""Mapping network output on the preprocessed grid back onto the input image's grid.

The inversion does not replay MONAI's inverse transforms: it maps every input voxel through
``inverse(preprocessed_affine) @ input_affine`` into the preprocessed grid and interpolates the
probabilities there (``torch.nn.functional.grid_sample``), slab by slab of about 2M input voxels.
This is exact by construction for any chain that keeps its MetaTensor affine right (reorientation,
resampling, cropping, padding; oblique and anisotropic inputs alike); voxels outside the
preprocessed grid (cut away by the foreground crop) are background. When the two grids coincide no
interpolation happens at all. Argmax and the class-index -> label-id mapping happen per slab, so
the full-resolution probabilities are only kept when asked for.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ids_to_input_grid", "probabilities_to_input_grid"]

_SLAB_VOXELS = 1 << 21  # input-grid voxels resampled at a time


def probabilities_to_input_grid(
    probs: torch.Tensor,
    pre_affine: np.ndarray,
    in_affine: np.ndarray,
    in_shape: tuple[int, ...],
    *,
    label_ids: Sequence[int],
    keep_probabilities: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resample probabilities onto the input grid slab by slab; argmax -> label ids.

    Args:
        probs: ``(classes, *spatial)`` probabilities on the preprocessed grid (3 spatial axes, or
            2 for a 2D preprocessed grid).
        pre_affine: 4x4 affine of the preprocessed grid.
        in_affine: 4x4 affine of the input grid.
        in_shape: spatial shape of the input grid (3 axes).
        label_ids: label id of each class index.
        keep_probabilities: also return the resampled probabilities.

    Returns:
        ``(labels, probabilities)`` on the input grid; ``probabilities`` is None unless kept.
    """
    num_classes = probs.shape[0]
    if probs.ndim == 3:  # 2D preprocessed grid: a z axis of size 1
        probs = probs[..., None]
    ids = np.asarray(label_ids, dtype=np.int64)
    label_dtype = np.uint8 if ids.max() < 256 else (np.int16 if ids.max() < 32768 else np.int32)
    lookup = torch.as_tensor(ids)
    labels = np.zeros(in_shape, dtype=label_dtype)
    out_probs = np.zeros((num_classes, *in_shape), dtype=np.float32) if keep_probabilities else None
    mapping = np.linalg.solve(pre_affine, in_affine)  # input voxel -> preprocessed voxel
    pre_shape = tuple(probs.shape[1:])
    if pre_shape == tuple(in_shape) and np.allclose(mapping, np.eye(4), atol=1e-6):
        for k0 in range(0, in_shape[2], max(1, _SLAB_VOXELS // max(1, in_shape[0] * in_shape[1]))):
            k1 = min(in_shape[2], k0 + max(1, _SLAB_VOXELS // max(1, in_shape[0] * in_shape[1])))
            slab = probs[..., k0:k1].float()
            labels[..., k0:k1] = lookup[slab.argmax(0).cpu()].numpy().astype(label_dtype)
            if out_probs is not None:
                out_probs[..., k0:k1] = slab.cpu().numpy()
        return labels, out_probs
    device = probs.device
    source = probs[None]
    if source.dtype != torch.float32 and device.type == "cpu":
        source = source.float()  # grid_sample on CPU has no float16 kernel
    sizes = torch.tensor(pre_shape, dtype=torch.float64, device=device)
    linear = torch.as_tensor(mapping[:3, :3], dtype=torch.float64, device=device)
    offset = torch.as_tensor(mapping[:3, 3], dtype=torch.float64, device=device)
    step = max(1, _SLAB_VOXELS // max(1, in_shape[0] * in_shape[1]))
    i = torch.arange(in_shape[0], dtype=torch.float64, device=device)
    j = torch.arange(in_shape[1], dtype=torch.float64, device=device)
    background = torch.zeros(num_classes, dtype=source.dtype, device=device)
    background[0] = 1.0
    for k0 in range(0, in_shape[2], step):
        k = torch.arange(k0, min(in_shape[2], k0 + step), dtype=torch.float64, device=device)
        coords = (
            linear[:, 0].view(3, 1, 1, 1) * i.view(1, -1, 1, 1)
            + linear[:, 1].view(3, 1, 1, 1) * j.view(1, 1, -1, 1)
            + linear[:, 2].view(3, 1, 1, 1) * k.view(1, 1, 1, -1)
            + offset.view(3, 1, 1, 1)
        )
        # within one preprocessed voxel of its outermost centres: resampling rounds the grid's
        # extent, so the input's edge voxels may sit just beyond it; farther out is background
        inside = ((coords >= -1.0) & (coords <= sizes.view(3, 1, 1, 1))).all(0)
        scale = torch.where(sizes > 1, 2.0 / (sizes - 1).clamp(min=1), torch.zeros_like(sizes))
        normalized = coords * scale.view(3, 1, 1, 1) - (sizes > 1).double().view(3, 1, 1, 1)
        grid = normalized.flip(0).permute(1, 2, 3, 0)[None].to(source.dtype)  # (1, i, j, k, [z, y, x])
        del coords, normalized
        slab = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=True)[0]
        del grid
        slab = torch.where(inside[None], slab, background.view(-1, 1, 1, 1))
        labels[..., k0 : k0 + k.numel()] = lookup[slab.argmax(0).cpu()].numpy().astype(label_dtype)
        if out_probs is not None:
            out_probs[..., k0 : k0 + k.numel()] = slab.float().cpu().numpy()
    return labels, out_probs


def ids_to_input_grid(
    ids: np.ndarray, pre_affine: np.ndarray, in_affine: np.ndarray, in_shape: tuple[int, ...]
) -> np.ndarray:
    """An integer map (instance ids) on the preprocessed grid, carried onto the input grid by nearest neighbour.

    Every input voxel takes the id of the preprocessed voxel nearest to its centre (the voxel
    mapping of :func:`probabilities_to_input_grid`); voxels beyond the preprocessed grid by more
    than half a voxel are 0. ``ids`` has 3 spatial axes, or 2 for a 2D preprocessed grid.
    """
    if ids.ndim == 2:
        ids = ids[..., None]
    mapping = np.linalg.solve(pre_affine, in_affine)  # input voxel -> preprocessed voxel
    if ids.shape == tuple(in_shape) and np.allclose(mapping, np.eye(4), atol=1e-6):
        return np.ascontiguousarray(ids, dtype=np.int32)
    out = np.zeros(in_shape, dtype=np.int32)
    step = max(1, _SLAB_VOXELS // max(1, in_shape[0] * in_shape[1]))
    grid_i, grid_j = np.meshgrid(np.arange(in_shape[0]), np.arange(in_shape[1]), indexing="ij")
    for k0 in range(0, in_shape[2], step):
        k = np.arange(k0, min(in_shape[2], k0 + step))
        points = np.stack(
            [
                np.broadcast_to(grid_i[..., None], (*grid_i.shape, k.size)),
                np.broadcast_to(grid_j[..., None], (*grid_j.shape, k.size)),
                np.broadcast_to(k, (*grid_i.shape, k.size)),
            ]
        ).reshape(3, -1)
        source = np.rint(mapping[:3, :3] @ points + mapping[:3, 3:4]).astype(np.int64)
        inside = np.all((source >= 0) & (source < np.asarray(ids.shape)[:, None]), axis=0)
        values = np.zeros(points.shape[1], dtype=np.int32)
        values[inside] = ids[source[0, inside], source[1, inside], source[2, inside]]
        out[..., k0 : k0 + k.size] = values.reshape(in_shape[0], in_shape[1], k.size)
    return out
