"""`Segmenter`: a trained network (or a fold ensemble) that segments a Volume in its own geometry.

Prediction of one image::

    Volume -> preprocessing (medseg.model.transforms: RAS, target spacing, foreground crop, normalisation)
           -> the one sliding-window engine (medseg.model.windows: Gaussian blending of logits;
              mirroring TTA averages the logits of every flip of each window, as nnU-Net does;
              training validation uses the same engine)
           -> softmax per fold, mean over folds
           -> probabilities resampled onto the *input* grid (medseg.inference.invert)
           -> argmax -> class index mapped to label id -> postprocessing (postprocessing.json)
           -> label Volume with exactly the input's spatial shape and affine

Memory: the engine keeps one logit accumulator per fold on the preprocessed grid (float32, or
float16 when it would exceed 1 GiB) and one weight map; the softmax runs in place slab by slab and
the inversion works on slabs of the input grid (``benchmarks/bench_predict.py --only memory``
measures a 512x512x400 CT). On CUDA the accumulators, blending, softmax, resampling and argmax run
on the GPU, with float16 autocast for the network.

2D configurations run the 2D network on every slice along the plans' ``slice_axis``; a 2D image
(e.g. a PNG) is one slice.

Example:
    >>> seg = Segmenter.from_checkpoint("runs/hippo/fold_0")                # doctest: +SKIP
    >>> label = seg.predict(read_volume("case.nii.gz"))                     # doctest: +SKIP
    >>> label.same_geometry(read_volume("case.nii.gz"))                     # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from medseg.core.labels import LabelSet
from medseg.core.volume import Volume
from medseg.errors import CheckpointError, MedsegUserError
from medseg.inference.invert import probabilities_to_input_grid
from medseg.inference.postprocess import POSTPROCESSING_FILE, apply_postprocessing, load_postprocessing
from medseg.io.files import sha256_file
from medseg.model.checkpoint import load_fold_checkpoints, resolve_checkpoints
from medseg.model.device import autocast_dtype, select_device
from medseg.model.networks import build_network
from medseg.model.onnx_export import cached_onnx_network, choose_runtime
from medseg.model.transforms import inference_transforms
from medseg.model.windows import sliding_window_logits

__all__ = ["Segmenter", "Prediction"]


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
        runtime: str = "torch",
        precision: str = "auto",
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
        self.device = select_device(str(device))
        self.tta = bool(tta)
        self.overlap = float(overlap)
        self.postprocessing = dict(postprocessing) if postprocessing else None
        dims = int(self.plans_config["spatial_dims"])
        self.sw_batch_size = int(sw_batch_size or (2 if dims == 3 else 8))
        self.checkpoints = [tuple(c) for c in checkpoints]
        self.runtime = runtime  # "torch", or "onnx" for onnxruntime networks (medseg.model.onnx_export)
        self.networks = [net.to(self.device).eval() for net in networks]
        # the network's autocast dtype: float16 on CUDA, bfloat16 on CPUs that compute it natively
        # (AMX / AVX512-BF16); onnxruntime networks run float32 whatever is asked
        self.precision = precision
        self.amp_dtype = autocast_dtype(self.device, precision) if runtime == "torch" else None
        self.amp = self.amp_dtype is not None

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls,
        model: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        which: str = "last",
        device: str = "auto",
        tta: bool = True,
        overlap: float = 0.5,
        postprocessing: str | os.PathLike[str] | Mapping[str, Any] | None = "auto",
        sw_batch_size: int | None = None,
        runtime: str = "torch",
        threads: int | None = None,
        precision: str = "auto",
    ) -> Segmenter:
        """Load a checkpoint, a run folder, a folder of ``fold_K`` runs, or several of them (an ensemble).

        Args:
            model: see :func:`resolve_checkpoints`.
            which: ``"last"`` (default) or ``"best"`` checkpoint of a run folder. ``best`` was chosen
                on the run's own validation cases, so its validation score is optimistic.
            device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
            tta: mirroring test-time augmentation.
            overlap: sliding-window overlap.
            postprocessing: ``"auto"`` (``postprocessing.json`` of the run folder, or of the folder
                holding the fold runs, when present), a path, the rules themselves, or None.
            sw_batch_size: windows per forward pass.
            runtime: ``"torch"``, ``"onnx"`` (onnxruntime on the CPU; each checkpoint is exported on
                first use and cached beside it, see :mod:`medseg.model.onnx_export`) or ``"auto"``
                (the runtime measured faster, :func:`medseg.model.onnx_export.choose_runtime`).
            threads: onnxruntime intra-op threads (None: one per core).
            precision: ``"auto"`` (mixed precision where the hardware computes it natively: float16
                on CUDA, bfloat16 on CPUs with AMX or AVX512-BF16; float32 elsewhere), ``"mixed"`` or
                ``"float32"`` (see :func:`medseg.model.device.autocast_dtype`).

        Raises:
            CheckpointError: not a checkpoint, truncated, newer format, or folds that disagree
                (plans, configuration or labels).
        """
        paths = resolve_checkpoints(model, which=which)
        networks, hashes = [], []
        contents = load_fold_checkpoints(paths)
        first = contents[0]
        for path, content in zip(paths, contents):
            labels = LabelSet.from_manifest(content["labels"]["labels"], regions=content["labels"].get("regions"))
            cfg = content["plans"]["configurations"][content["config"]]
            network = build_network(
                cfg, in_channels=len(content["plans"]["normalization"]), out_channels=labels.num_classes
            )
            try:
                network.load_state_dict(content["model"])
            except RuntimeError as error:
                raise CheckpointError(
                    f"{path}: weights do not fit the planned network ({str(error).splitlines()[0]})"
                ) from None
            networks.append(network)
            hashes.append((str(path), sha256_file(path)))
        chosen = choose_runtime(runtime, device=select_device(device))
        if chosen == "onnx" and runtime == "auto" and not all(getattr(n, "onnx_exportable", True) for n in networks):
            chosen = "torch"  # e.g. Mask R-CNN: "auto" means the runtime that can run it
        if chosen == "onnx":
            cfg = first["plans"]["configurations"][first["config"]]
            channels = len(first["plans"]["normalization"])
            networks = [
                cached_onnx_network(
                    net, checkpoint=p, sha256=h, plans_config=cfg, in_channels=channels, threads=threads
                )
                for net, (p, h) in zip(networks, hashes)
            ]
            device = "cpu"
        labels = LabelSet.from_manifest(first["labels"]["labels"], regions=first["labels"].get("regions"))
        things = _things_from_runs(paths)
        rules = _load_postprocessing(postprocessing, paths)
        return cls(
            networks,
            plans=first["plans"],
            config=str(first["config"]),
            labels=labels,
            things=things,
            device=device,
            tta=tta,
            overlap=overlap,
            postprocessing=rules,
            sw_batch_size=sw_batch_size,
            checkpoints=hashes,
            runtime=chosen,
            precision=precision,
        )

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
        if min(image.shape[1:], default=0) == 0:  # nothing but zeros: the foreground crop left no voxel
            return self._background_only(volume, probabilities=probabilities, timings=timings)
        clock = time.perf_counter()
        probs = self._ensemble_probabilities(image)
        del image
        timings["network_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        in_affine = np.asarray(volume.affine, dtype=np.float64)
        in_shape = volume.spatial_shape + ((1,) if volume.spatial_ndim == 2 else ())
        label_array, prob_array = probabilities_to_input_grid(
            probs, pre_affine, in_affine, in_shape, label_ids=self.labels.ids, keep_probabilities=probabilities
        )
        del probs
        if volume.spatial_ndim == 2:
            label_array = label_array[..., 0]
            prob_array = prob_array[..., 0] if prob_array is not None else None
        timings["invert_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        if postprocess and self.postprocessing:
            label_array = apply_postprocessing(
                label_array, self.postprocessing, labels=self.labels, spacing_mm=volume.spacing_mm
            )
        timings["postprocess_s"] = time.perf_counter() - clock
        meta = _output_meta(volume)
        labels = Volume(label_array[None], volume.affine, kind="label", meta=meta)
        prob_volume = Volume(prob_array, volume.affine, kind="image", meta=meta) if prob_array is not None else None
        return Prediction(
            labels=labels, probabilities=prob_volume, timings_s={k: round(v, 4) for k, v in timings.items()}
        )

    @property
    def predicts_instances(self) -> bool:
        """True for a detection model (``maskrcnn``), whose instances are its own, not connected components."""
        return bool(self.networks) and all(getattr(n, "predicts_instances", False) for n in self.networks)

    def predict_instances(self, volume: Volume) -> tuple[Volume, list[dict[str, Any]]]:
        """A detection model's instances in ``volume``'s geometry, with one table row per instance.

        See :mod:`medseg.inference.detections` (windows, merging, linking across slices, scores).
        Every fold's detector contributes to each slice; there is no test-time augmentation.

        Raises:
            MedsegUserError: the model is not a detection model.
        """
        from medseg.inference.detections import detect_slice, instance_table, link_slices, renumber_by_score
        from medseg.inference.invert import ids_to_input_grid

        if not self.predicts_instances:
            raise MedsegUserError("only a detection model (maskrcnn) predicts instances of its own")
        meta = _output_meta(volume)
        image, pre_affine = self._preprocess(volume)
        in_shape = volume.spatial_shape + ((1,) if volume.spatial_ndim == 2 else ())
        if min(image.shape[1:], default=0) == 0:  # no foreground voxel: no instance
            empty = np.zeros(volume.spatial_shape, dtype=np.int32)
            return Volume(empty[None], volume.affine, kind="label", meta=meta), []
        network_cfg = self.plans_config["network"]
        slice_axis = int(self.plans_config.get("slice_axis", 2)) if image.ndim == 4 else None
        slices = torch.movedim(image, slice_axis + 1, 0) if slice_axis is not None else image[None]
        found = [
            detect_slice(
                [n.detector for n in self.networks],
                slices[k],
                patch_size=self.plans_config["patch_size"],
                score_threshold=float(network_cfg.get("score_threshold", 0.5)),
                mask_threshold=float(network_cfg.get("mask_threshold", 0.5)),
                device=self.device,
                windows_per_batch=self.sw_batch_size,
            )
            for k in range(slices.shape[0])
        ]
        linked, info = link_slices(found)
        on_grid = np.stack(linked, axis=slice_axis) if slice_axis is not None else linked[0]
        instances = ids_to_input_grid(on_grid, pre_affine, np.asarray(volume.affine, dtype=np.float64), in_shape)
        if volume.spatial_ndim == 2:
            instances = instances[..., 0]
        instances, rows = renumber_by_score(instances, info)
        table = instance_table(instances, rows, labels=self.labels, voxel_volume_ml=volume.voxel_volume_ml)
        return Volume(instances[None], volume.affine, kind="label", meta=meta), table

    def _background_only(self, volume: Volume, *, probabilities: bool, timings: dict[str, float]) -> Prediction:
        """The prediction of an image without foreground (every voxel zero): background everywhere.

        Preprocessing crops to the non-zero voxels, as nnU-Net does, so such an image leaves nothing
        for the network; its labels are background (probability 1) in the input's exact geometry.
        """
        meta = _output_meta(volume)
        shape = volume.spatial_shape
        ids = list(self.labels.ids)  # ids[0] is the background class
        dtype = np.uint8 if max(ids) < 256 else (np.int16 if max(ids) < 32768 else np.int32)
        labels = Volume(np.full((1, *shape), ids[0], dtype=dtype), volume.affine, kind="label", meta=meta)
        prob_volume = None
        if probabilities:
            prob_array = np.zeros((self.labels.num_classes, *shape), dtype=np.float32)
            prob_array[0] = 1.0
            prob_volume = Volume(prob_array, volume.affine, kind="image", meta=meta)
        return Prediction(
            labels=labels, probabilities=prob_volume, timings_s={k: round(v, 4) for k, v in timings.items()}
        )

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
            "precision": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "float32",
            "postprocessing": self.postprocessing,
            "runtime": self.runtime,
        }

    def __repr__(self) -> str:
        return (
            f"Segmenter(folds={len(self.networks)}, config={self.config!r}, classes={self.labels.num_classes}, "
            f"device={str(self.device)!r}, tta={self.tta}, overlap={self.overlap})"
        )

    # -- stages -----------------------------------------------------------------------------------
    def _preprocess(self, volume: Volume) -> tuple[torch.Tensor, np.ndarray]:
        where = volume.meta.get("path", "image")
        spacing = list(self.plans_config["spacing_mm"])
        if volume.spatial_ndim == 2 and len(spacing) == 3:  # a 2D image through 3D plans: one z slice
            volume = Volume(volume.array[..., None], volume.affine, kind="image", meta=volume.meta)
        if volume.spatial_ndim != len(spacing):
            raise MedsegUserError(
                f"{where}: a {volume.spatial_ndim}D image, but the model was planned for {len(spacing)}D images"
            )
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

    def _sliding_logits(self, network: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
        """Gaussian-blended logits of one network over the whole preprocessed image (the one engine)."""
        return sliding_window_logits(
            network,
            image,
            plans_config=self.plans_config,
            num_classes=self.labels.num_classes,
            device=self.device,
            overlap=self.overlap,
            mirror=self.tta,
            amp_dtype=self.amp_dtype,
            sw_batch_size=self.sw_batch_size,
        )


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
