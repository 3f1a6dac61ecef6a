"""`Segmenter`: a trained network (or a fold ensemble) that segments a Volume in its own geometry.

Prediction of one image::

    Volume -> preprocessing (medseg.transforms: RAS, target spacing, foreground crop, normalisation)
           -> sliding window on the preprocessed grid (Gaussian blending of logits; mirroring TTA
              averages the logits of every flip of each window, as nnU-Net does)
           -> softmax per fold, mean over folds
           -> probabilities resampled onto the *input* grid (linear, through the two affines)
           -> argmax -> class index mapped to label id -> postprocessing (postprocessing.json)
           -> label Volume with exactly the input's spatial shape and affine

The inversion does not replay MONAI's inverse transforms: it maps every input voxel through
``inverse(preprocessed_affine) @ input_affine`` into the preprocessed grid and interpolates the
probabilities there (``torch.nn.functional.grid_sample``), slab by slab. This is exact by
construction for any chain that keeps its MetaTensor affine right (reorientation, resampling,
cropping, padding; oblique and anisotropic inputs alike); voxels outside the preprocessed grid
(cut away by the foreground crop) are background. When the two grids coincide no interpolation
happens at all.

Memory: the sliding window keeps one logit accumulator per fold on the preprocessed grid (float32,
or float16 when it would exceed 1 GiB) and one weight map; the inversion works on slabs of the
input grid: a 512x512x400 CT predicted at its own 0.78x0.78x1.5 mm spacing peaked at 4.0 GB RSS
on CPU (benchmarks/bench_predict.py). On CUDA the accumulators, blending,
softmax, resampling and argmax run on the GPU, with float16 autocast for the network.

2D configurations run the 2D network on every slice along the plans' ``slice_axis``; a 2D image
(e.g. a PNG) is one slice.

Example:
    >>> seg = Segmenter.from_checkpoint("runs/hippo/fold_0")                # doctest: +SKIP
    >>> label = seg.predict(read_volume("case.nii.gz"))                     # doctest: +SKIP
    >>> label.same_geometry(read_volume("case.nii.gz"))                     # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medseg.errors import CheckpointError, MedsegUserError
from medseg.labels import LabelSet
from medseg.volume import Volume

__all__ = ["Segmenter", "Prediction", "resolve_checkpoints", "file_sha256"]

_LARGE_ACCUMULATOR_BYTES = 1 << 30  # above this, logits are stitched in float16
_SLAB_VOXELS = 1 << 21  # input-grid voxels resampled at a time


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_checkpoints(
    model: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *, which: str = "best"
) -> list[Path]:
    """Checkpoint files of a model given as a file, a run folder, a folder of ``fold_K`` runs, or a list.

    Raises:
        CheckpointError: a path that is neither a checkpoint nor a run folder holding one.
    """
    items = [model] if isinstance(model, (str, os.PathLike)) else list(model)
    if not items:
        raise CheckpointError("no model given")
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_file():
            found.append(path)
        elif (path / f"checkpoint_{which}.pt").is_file():
            found.append(path / f"checkpoint_{which}.pt")
        elif path.is_dir():
            folds = sorted(p / f"checkpoint_{which}.pt" for p in path.glob("fold_*") if (p / f"checkpoint_{which}.pt").is_file())
            if not folds:
                raise CheckpointError(f"{path}: holds neither checkpoint_{which}.pt nor fold_*/checkpoint_{which}.pt")
            found += folds
        else:
            raise CheckpointError(f"{path}: checkpoint not found")
    return found


@dataclass
class Prediction:
    """Everything one prediction produced, on the input's grid.

    Attributes:
        labels: label Volume (label ids, postprocessed when rules are loaded).
        probabilities: ``(classes, *spatial)`` float32 Volume, or None when not asked for.
        timings_s: seconds per stage (preprocess, network, invert, postprocess).
    """

    labels: Volume
    probabilities: Volume | None = None
    timings_s: dict[str, float] = field(default_factory=dict)


def _select_device(device: str | torch.device) -> torch.device:
    from medseg.train import select_device

    return select_device(str(device))


def _scan_interval(image_size: Sequence[int], patch: Sequence[int], overlap: float) -> list[int]:
    """MONAI's sliding-window step: ``int(patch * (1 - overlap))`` (whole patch when it fits exactly)."""
    steps = []
    for size, roi in zip(image_size, patch):
        steps.append(roi if roi == size else max(int(roi * (1 - overlap)), 1))
    return steps


class Segmenter:
    """A loaded network or fold ensemble that predicts label maps in the input's geometry.

    Build it with :meth:`from_checkpoint`; the constructor takes already built networks (tests
    and custom models).

    Args:
        networks: one network per fold; all share ``plans`` and ``config``.
        plans: the plans the networks were trained with.
        config: configuration name in ``plans["configurations"]`` (``"3d"`` / ``"2d"``).
        labels: the label map; class index ``i`` of the network is label id ``labels.ids[i]``.
        things: structures predicted as instances (connected components).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        tta: mirroring test-time augmentation (every combination of flipped network axes).
        overlap: sliding-window overlap fraction in [0, 1).
        postprocessing: rules from :func:`medseg.postprocess.determine_postprocessing`, or None.
        sw_batch_size: windows per forward pass (default 2 for 3D, 8 for 2D networks).
        checkpoints: ``(path, sha256)`` of the files the networks came from (for provenance).
    """

    def __init__(
        self,
        networks: Sequence[torch.nn.Module],
        *,
        plans: Mapping[str, Any],
        config: str,
        labels: LabelSet,
        things: Sequence[str] = (),
        device: str | torch.device = "auto",
        tta: bool = True,
        overlap: float = 0.5,
        postprocessing: Mapping[str, Any] | None = None,
        sw_batch_size: int | None = None,
        checkpoints: Sequence[tuple[str, str]] = (),
    ) -> None:
        if not networks:
            raise ValueError("Segmenter needs at least one network")
        if not 0.0 <= overlap < 1.0:
            raise MedsegUserError(f"overlap must be in [0, 1), got {overlap}")
        if config not in plans.get("configurations", {}):
            raise MedsegUserError(f"plans have no configuration {config!r}")
        self.plans = dict(plans)
        self.config = config
        self.plans_config = dict(plans["configurations"][config])
        self.labels = labels
        self.things = tuple(things)
        self.device = _select_device(device)
        self.tta = bool(tta)
        self.overlap = float(overlap)
        self.postprocessing = dict(postprocessing) if postprocessing else None
        dims = int(self.plans_config["spatial_dims"])
        self.sw_batch_size = int(sw_batch_size or (2 if dims == 3 else 8))
        self.checkpoints = [tuple(c) for c in checkpoints]
        self.networks = [net.to(self.device).eval() for net in networks]
        self.amp = self.device.type == "cuda"

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls,
        model: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        which: str = "best",
        device: str = "auto",
        tta: bool = True,
        overlap: float = 0.5,
        postprocessing: str | os.PathLike[str] | Mapping[str, Any] | None = "auto",
        sw_batch_size: int | None = None,
    ) -> Segmenter:
        """Load a checkpoint, a run folder, a folder of ``fold_K`` runs, or several of them (an ensemble).

        Args:
            model: see :func:`resolve_checkpoints`.
            which: ``"best"`` or ``"last"`` checkpoint of a run folder.
            device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
            tta: mirroring test-time augmentation.
            overlap: sliding-window overlap.
            postprocessing: ``"auto"`` (``postprocessing.json`` of the run folder, or of the folder
                holding the fold runs, when present), a path, the rules themselves, or None.
            sw_batch_size: windows per forward pass.

        Raises:
            CheckpointError: not a checkpoint, truncated, newer format, or folds that disagree
                (plans, configuration or labels).
        """
        from medseg.checkpoint import load_checkpoint
        from medseg.networks import build_network

        paths = resolve_checkpoints(model, which=which)
        networks, hashes = [], []
        first: dict[str, Any] | None = None
        for path in paths:
            content = load_checkpoint(path)
            if first is None:
                first = content
            else:
                for key in ("plans", "config", "labels"):
                    if content[key] != first[key]:
                        raise CheckpointError(f"{path}: {key} differ from those of {paths[0]}; folds of one ensemble must share them")
            labels = LabelSet.from_manifest(content["labels"]["labels"], regions=content["labels"].get("regions"))
            cfg = content["plans"]["configurations"][content["config"]]
            network = build_network(cfg, in_channels=len(content["plans"]["normalization"]),
                                    out_channels=labels.num_classes)
            try:
                network.load_state_dict(content["model"])
            except RuntimeError as error:
                raise CheckpointError(f"{path}: weights do not fit the planned network ({str(error).splitlines()[0]})") from None
            networks.append(network)
            hashes.append((str(path), file_sha256(path)))
        assert first is not None
        labels = LabelSet.from_manifest(first["labels"]["labels"], regions=first["labels"].get("regions"))
        things = _things_from_runs(paths)
        rules = _load_postprocessing(postprocessing, paths)
        return cls(networks, plans=first["plans"], config=str(first["config"]), labels=labels, things=things,
                   device=device, tta=tta, overlap=overlap, postprocessing=rules, sw_batch_size=sw_batch_size,
                   checkpoints=hashes)

    # -- public API -------------------------------------------------------------------------------
    def predict(self, volume: Volume, *, postprocess: bool = True) -> Volume:
        """Label Volume with exactly ``volume``'s spatial shape and affine.

        Args:
            volume: the image (its channels in the order the model was trained with).
            postprocess: apply the run's postprocessing rules (when loaded).
        """
        return self.predict_full(volume, postprocess=postprocess).labels

    def predict_probabilities(self, volume: Volume) -> Volume:
        """``(classes, *spatial)`` float32 softmax (mean over folds) on ``volume``'s grid."""
        result = self.predict_full(volume, probabilities=True, postprocess=False)
        assert result.probabilities is not None
        return result.probabilities

    def predict_full(self, volume: Volume, *, probabilities: bool = False, postprocess: bool = True) -> Prediction:
        """Labels, optionally probabilities, and per-stage timings of one image."""
        timings: dict[str, float] = {}
        clock = time.perf_counter()
        image, pre_affine = self._preprocess(volume)
        timings["preprocess_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        probs = self._ensemble_probabilities(image)
        del image
        timings["network_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        in_affine = np.asarray(volume.affine, dtype=np.float64)
        in_shape = volume.spatial_shape + ((1,) if volume.spatial_ndim == 2 else ())
        label_array, prob_array = self._invert(probs, pre_affine, in_affine, in_shape, keep_probabilities=probabilities)
        del probs
        if volume.spatial_ndim == 2:
            label_array = label_array[..., 0]
            prob_array = prob_array[..., 0] if prob_array is not None else None
        timings["invert_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        if postprocess and self.postprocessing:
            from medseg.postprocess import apply_postprocessing

            label_array = apply_postprocessing(label_array, self.postprocessing, labels=self.labels,
                                               spacing_mm=volume.spacing_mm)
        timings["postprocess_s"] = time.perf_counter() - clock
        meta = _output_meta(volume)
        labels = Volume(label_array[None], volume.affine, kind="label", meta=meta)
        prob_volume = Volume(prob_array, volume.affine, kind="image", meta=meta) if prob_array is not None else None
        return Prediction(labels=labels, probabilities=prob_volume, timings_s={k: round(v, 4) for k, v in timings.items()})

    def describe(self) -> dict[str, Any]:
        """Plain JSON provenance: checkpoints and hashes, configuration, options, device."""
        return {
            "checkpoints": [{"path": p, "sha256": h} for p, h in self.checkpoints],
            "config": self.config,
            "labels": self.labels.to_json(),
            "things": list(self.things),
            "device": str(self.device),
            "tta": self.tta,
            "overlap": self.overlap,
            "amp": self.amp,
            "postprocessing": self.postprocessing,
        }

    def __repr__(self) -> str:
        return (f"Segmenter(folds={len(self.networks)}, config={self.config!r}, classes={self.labels.num_classes}, "
                f"device={str(self.device)!r}, tta={self.tta}, overlap={self.overlap})")

    # -- stages -----------------------------------------------------------------------------------
    def _preprocess(self, volume: Volume) -> tuple[torch.Tensor, np.ndarray]:
        from medseg.transforms import inference_transforms

        where = volume.meta.get("path", "image")
        spacing = list(self.plans_config["spacing_mm"])
        if volume.spatial_ndim == 2 and len(spacing) == 3:  # a 2D image through 3D plans: one z slice
            volume = Volume(volume.array[..., None], volume.affine, kind="image", meta=volume.meta)
        if volume.spatial_ndim != len(spacing):
            raise MedsegUserError(f"{where}: a {volume.spatial_ndim}D image, but the model was planned for {len(spacing)}D images")
        expected = len(self.plans["normalization"])
        if volume.num_channels != expected:
            raise MedsegUserError(f"{where}: {volume.num_channels} channel(s), but the model takes {expected}")
        if volume.kind != "image":
            volume = Volume(volume.array.astype(np.float32), volume.affine, kind="image", meta=volume.meta)
        data = inference_transforms(self.plans, self.config)({"image": volume})
        image = data["image"]
        affine = np.asarray(image.affine.detach().cpu().numpy(), dtype=np.float64)
        tensor = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
        return tensor.float().contiguous(), affine

    def _ensemble_probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Mean over folds of the softmax of the blended logits, ``(classes, *spatial)``."""
        num_classes = self.labels.num_classes
        if min(image.shape[1:], default=0) == 0:  # the foreground crop left nothing
            return torch.zeros((num_classes, *image.shape[1:]))
        total: torch.Tensor | None = None
        for network in self.networks:
            logits = self._sliding_logits(network, image)
            _softmax_inplace(logits)
            if total is None:
                total = logits
            else:
                total += logits
                del logits
        assert total is not None
        if len(self.networks) > 1:
            total /= len(self.networks)
        return total

    @torch.no_grad()
    def _sliding_logits(self, network: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
        """Gaussian-blended logits of one network over the whole preprocessed image."""
        from monai.data.utils import compute_importance_map, dense_patch_slices

        cfg = self.plans_config
        dims = int(cfg["spatial_dims"])
        patch = [int(p) for p in cfg["patch_size"]]
        spatial = list(image.shape[1:])
        if dims == len(spatial):
            net_axes = list(range(len(spatial)))
            slice_axis = None
        elif dims == 2 and len(spatial) == 3:
            slice_axis = int(cfg["slice_axis"])
            net_axes = [a for a in range(3) if a != slice_axis]
        else:
            raise MedsegUserError(f"a {dims}D network cannot segment a {len(spatial)}D image")
        # pad network axes up to the patch (symmetrically, zeros), as MONAI does
        pad_before = [0] * len(spatial)
        padded = list(spatial)
        for axis, roi in zip(net_axes, patch):
            if spatial[axis] < roi:
                pad_before[axis] = (roi - spatial[axis]) // 2
                padded[axis] = roi
        if padded != spatial:
            pads: list[int] = []
            for axis in reversed(range(len(spatial))):
                pads += [pad_before[axis], padded[axis] - spatial[axis] - pad_before[axis]]
            image = F.pad(image, pads, mode="constant", value=0.0)
        net_size = [padded[a] for a in net_axes]
        windows = dense_patch_slices(net_size, patch, _scan_interval(net_size, patch, self.overlap), return_slice=True)
        device = self.device
        num_classes = self.labels.num_classes
        accumulator_bytes = num_classes * int(np.prod(padded)) * 4
        dtype = torch.float16 if accumulator_bytes > _LARGE_ACCUMULATOR_BYTES else torch.float32
        acc_device = device if device.type == "cuda" else torch.device("cpu")
        acc = torch.zeros((num_classes, *padded), dtype=dtype, device=acc_device)
        weights = compute_importance_map(tuple(patch), mode="gaussian", sigma_scale=0.125, device=device,
                                         dtype=torch.float32)
        count = torch.zeros(net_size, dtype=torch.float32, device=acc_device)
        for window in windows:
            count[window] += weights.to(acc_device)
        flips: list[tuple[int, ...]] = [()]
        if self.tta:
            axes = [a + 2 for a in range(dims)]
            flips = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]
        num_slices = 1 if slice_axis is None else padded[slice_axis]
        jobs = [(s, w) for s in range(num_slices) for w in windows]

        def region(tensor: torch.Tensor, s: int) -> torch.Tensor:
            return tensor if slice_axis is None else tensor.select(slice_axis + 1, s)

        for start in range(0, len(jobs), self.sw_batch_size):
            batch = jobs[start : start + self.sw_batch_size]
            x = torch.stack([region(image, s)[(slice(None), *w)] for s, w in batch]).to(device)
            logits = None
            for axes in flips:
                inputs = torch.flip(x, axes) if axes else x
                with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=self.amp):
                    out = network(inputs)
                out = out.float()
                out = torch.flip(out, axes) if axes else out
                logits = out if logits is None else logits + out
            assert logits is not None
            logits = logits * (weights / len(flips))
            logits = logits.to(acc_device, dtype)
            for (s, w), values in zip(batch, logits):
                region(acc, s)[(slice(None), *w)] += values
        for s in range(num_slices):
            target = region(acc, s)
            if dtype == torch.float16:
                for index in range(target.shape[1]):  # divide in float32, slab by slab
                    target[:, index] = (target[:, index].float() / count[index]).to(dtype)
            else:
                target /= count
        crop = tuple(slice(b, b + n) for b, n in zip(pad_before, spatial))
        return acc[(slice(None), *crop)] if padded != spatial else acc

    def _invert(
        self,
        probs: torch.Tensor,
        pre_affine: np.ndarray,
        in_affine: np.ndarray,
        in_shape: tuple[int, ...],
        *,
        keep_probabilities: bool,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Resample probabilities onto the input grid slab by slab; argmax -> label ids."""
        num_classes = probs.shape[0]
        if probs.ndim == 3:  # 2D preprocessed grid: a z axis of size 1
            probs = probs[..., None]
        ids = np.asarray(self.labels.ids, dtype=np.int64)
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
            coords = (linear[:, 0].view(3, 1, 1, 1) * i.view(1, -1, 1, 1)
                      + linear[:, 1].view(3, 1, 1, 1) * j.view(1, 1, -1, 1)
                      + linear[:, 2].view(3, 1, 1, 1) * k.view(1, 1, 1, -1)
                      + offset.view(3, 1, 1, 1))
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


def _softmax_inplace(logits: torch.Tensor) -> None:
    """Softmax over axis 0 in place, one slab of the first spatial axis at a time."""
    for index in range(logits.shape[1]):
        logits[:, index] = torch.softmax(logits[:, index].float(), dim=0).to(logits.dtype)


def _output_meta(volume: Volume) -> dict[str, Any]:
    meta = {k: v for k, v in volume.meta.items() if k not in ("path", "channel_paths")}
    if volume.meta.get("path"):
        meta["source_image"] = str(volume.meta["path"])
    return meta


def _things_from_runs(paths: Sequence[Path]) -> tuple[str, ...]:
    """``things`` of the manifest a run was trained on (its resolved_config.json), if recorded."""
    for path in paths:
        config = path.parent / "resolved_config.json"
        if config.is_file():
            try:
                content = json.loads(config.read_text(encoding="utf-8"))
                return tuple(content.get("manifest", {}).get("things", ()))
            except (OSError, json.JSONDecodeError):
                continue
    return ()


def _load_postprocessing(
    postprocessing: str | os.PathLike[str] | Mapping[str, Any] | None, paths: Sequence[Path]
) -> dict[str, Any] | None:
    from medseg.postprocess import POSTPROCESSING_FILE, load_postprocessing

    if postprocessing is None:
        return None
    if isinstance(postprocessing, Mapping):
        return dict(postprocessing)
    if str(postprocessing) != "auto":
        return load_postprocessing(postprocessing)
    folders = {p.parent for p in paths}
    candidates = [next(iter(folders)) / POSTPROCESSING_FILE] if len(folders) == 1 else []
    parents = {f.parent for f in folders}
    if len(parents) == 1:
        candidates.append(next(iter(parents)) / POSTPROCESSING_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return load_postprocessing(candidate)
    return None
