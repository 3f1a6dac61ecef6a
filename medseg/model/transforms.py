"""The only place medseg builds MONAI transform chains: preprocessing, training, inference, inverse.

All chains are MONAI ``Compose`` objects of dictionary transforms over the keys ``"image"`` and
``"label"``. Loading goes through :mod:`medseg.io`, so the geometry a network sees is exactly the
geometry medseg reads and writes (a :class:`~medseg.volume.Volume`'s RAS affine becomes the
``MetaTensor`` affine, which is MONAI's RAS convention too).

==================  ==========================================================================
chain               transforms
==================  ==========================================================================
preprocessing       load -> orientation RAS -> spacing (plans) -> crop to the non-zero box ->
                    normalisation (plans, per channel)
training cache      preprocessing -> pad to the patch -> foreground / background indices
training            foreground-oversampled patch (1/3 centred on foreground, as nnU-Net) ->
                    rotation + scaling -> Gaussian noise -> Gaussian blur -> brightness ->
                    contrast -> low resolution -> gamma -> flips on every axis
inference           preprocessing of the image alone; :func:`invert_prediction` maps network
                    output (probabilities) back to the input's grid
==================  ==========================================================================

The random transforms are MONAI ``Randomizable`` objects; :func:`training_augmentation` returns a
Compose whose ``set_random_state(seed)`` makes it reproducible.
"""

from __future__ import annotations

import os
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    FgBgToIndicesd,
    Invertd,
    MapTransform,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolutiond,
    Spacingd,
    SpatialPadd,
)

from medseg.core.labels import as_label_array
from medseg.core.volume import Volume
from medseg.errors import MedsegUserError
from medseg.io.volumes import read_channels, read_volume
from medseg.planning.presets import augmentation_probabilities

__all__ = [
    "LoadVolumed",
    "NormalizeChannelsd",
    "preprocessing",
    "training_cache_transforms",
    "training_augmentation",
    "inference_transforms",
    "invert_prediction",
    "volume_to_metatensor",
    "metatensor_to_volume",
]


# ---------------------------------------------------------------------------------------------
# conversions
# ---------------------------------------------------------------------------------------------
def volume_to_metatensor(volume: Volume) -> MetaTensor:
    """A Volume as a channel-first float32 MetaTensor carrying its RAS affine."""
    array = np.array(volume.array, dtype=np.float32, copy=True)
    meta = {"original_affine": np.array(volume.affine), "spatial_shape": np.array(volume.spatial_shape)}
    if volume.meta.get("path"):
        meta["filename_or_obj"] = str(volume.meta["path"])
    affine = torch.as_tensor(np.array(volume.affine), dtype=torch.float64)
    return MetaTensor(torch.from_numpy(array), affine=affine, meta=meta)


def metatensor_to_volume(tensor: torch.Tensor, *, kind: str = "image", meta: Mapping[str, Any] | None = None) -> Volume:
    """A (C, *spatial) MetaTensor back to a Volume (labels are cast to the smallest integer type)."""
    array = tensor.detach().cpu().numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)
    if isinstance(tensor, MetaTensor):
        affine = np.asarray(tensor.affine.cpu().numpy(), dtype=np.float64)
    else:
        raise ValueError("metatensor_to_volume needs a MetaTensor (it carries the affine)")
    if kind == "label":
        array = as_label_array(np.rint(array))
    return Volume(array, affine, kind=kind, meta=dict(meta or {}))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# custom dictionary transforms
# ---------------------------------------------------------------------------------------------
class LoadVolumed(MapTransform):
    """Read ``"image"`` (one path per channel, or a Volume) and ``"label"`` through medseg.io.

    The result is a float32 MetaTensor whose affine is the Volume's RAS affine. With
    ``image_as_slice`` a 2D image (PNG, TIFF, GIF) becomes a volume of one slice along axis 2,
    which is how plans with three spacings (a 2D dataset's ``2d`` configuration: ``slice_axis`` 2,
    a third spacing of 1 mm) and :class:`~medseg.inference.segmenter.Segmenter` see it.
    """

    def __init__(
        self, keys: Sequence[str] = ("image", "label"), *, allow_missing_keys: bool = True, image_as_slice: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_as_slice = image_as_slice

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, Volume):
                volume = value
            elif key == "label":
                volume = read_volume(value, kind="label")
            elif isinstance(value, (list, tuple)):
                volume = read_channels(list(value))
            else:
                volume = read_volume(value)
            if self.image_as_slice and volume.spatial_ndim == 2:
                volume = Volume(volume.array[..., None], volume.affine, kind=volume.kind, meta=volume.meta)
            d[key] = volume_to_metatensor(volume)
        return d


class NormalizeChannelsd(MapTransform):
    """Per-channel intensity normalisation from the plans' ``normalization`` list.

    ``zscore``: ``(x - mean(x)) / sd(x)`` over the whole (cropped) image, per channel, with the
    population sd (ddof 0), as nnU-Net's ``ZScoreNormalization`` and MONAI's
    ``NormalizeIntensity(channel_wise=True)`` (which it equals; it is not used itself because the
    plans mix schemes per channel).
    ``ct``: clip to ``clip`` (dataset foreground percentiles 0.5/99.5), then ``(x - mean) / sd``
    with the dataset's foreground mean and sd.
    """

    def __init__(self, schemes: Sequence[Mapping[str, Any]], *, keys: Sequence[str] = ("image",)) -> None:
        super().__init__(keys)
        self.schemes = [dict(s) for s in schemes]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if image.shape[0] != len(self.schemes):
                raise MedsegUserError(
                    f"image has {image.shape[0]} channels but the plans normalise {len(self.schemes)}"
                )
            out = image.clone().float()
            for channel, scheme in enumerate(self.schemes):
                x = out[channel]
                if scheme["scheme"] == "ct":
                    low, high = scheme["clip"]
                    x = x.clamp(float(low), float(high))
                    x = (x - float(scheme["mean"])) / max(float(scheme["sd"]), 1e-8)
                else:
                    x = (x - x.mean()) / torch.clamp(x.std(unbiased=False), min=1e-8)
                out[channel] = x
            d[key] = out
        return d


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    return x != 0


# ---------------------------------------------------------------------------------------------
# chains
# ---------------------------------------------------------------------------------------------
def _config(plans: Mapping[str, Any], config: str) -> Mapping[str, Any]:
    try:
        return plans["configurations"][config]
    except KeyError:
        known = sorted(plans.get("configurations", {}))
        raise MedsegUserError(f"plans have no configuration {config!r} (known: {known})") from None


def preprocessing(plans: Mapping[str, Any], config: str = "3d", *, keys: Sequence[str] = ("image", "label")) -> list:
    """Deterministic preprocessing transforms (a list, to be wrapped in a Compose).

    Load (medseg.io) -> Orientation RAS -> Spacing to the plans' target -> crop to the box of
    non-zero image voxels -> per-channel normalisation. Labels are resampled by nearest neighbour.
    """
    keys = list(keys)
    spacing = [float(s) for s in _config(plans, config)["spacing_mm"]]
    modes = ["nearest" if k == "label" else "bilinear" for k in keys]
    return [
        LoadVolumed(keys, image_as_slice=len(spacing) == 3),
        Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")), allow_missing_keys=True),
        Spacingd(keys, pixdim=spacing, mode=modes, allow_missing_keys=True),
        CropForegroundd(keys, source_key="image", select_fn=_nonzero, allow_smaller=True, allow_missing_keys=True),
        NormalizeChannelsd(plans["normalization"], keys=("image",)),
    ]


def training_cache_transforms(plans: Mapping[str, Any], config: str = "3d") -> Compose:
    """Preprocessing plus padding to the patch and foreground/background indices (cached once)."""
    cfg = _config(plans, config)
    patch = list(cfg["patch_size"])
    if cfg["spatial_dims"] == 2:
        pad = [-1, -1, -1]
        in_plane = [a for a in range(3) if a != int(cfg["slice_axis"])]
        for axis, size in zip(in_plane, patch):
            pad[axis] = size
        return Compose(preprocessing(plans, config) + [SpatialPadd(["image", "label"], spatial_size=pad)])
    return Compose(
        preprocessing(plans, config)
        + [
            SpatialPadd(["image", "label"], spatial_size=patch),
            FgBgToIndicesd("label", image_key=None),
        ]
    )


def training_augmentation(plans: Mapping[str, Any], config: str = "3d", *, seed: int = 0) -> Compose:
    """Random patch sampling and augmentation over a cached, preprocessed case.

    The input holds ``image``, ``label`` (and, in 3D, ``label_fg_indices`` / ``label_bg_indices``);
    in 2D the input is already a 2D slice. Returns one patch dict (the crop returns a list of one,
    which the caller unpacks). Probabilities come from :func:`augmentation_probabilities`
    (nnU-Net's defaults unless the plans say otherwise); ranges follow nnU-Net.
    """
    cfg = _config(plans, config)
    dims = int(cfg["spatial_dims"])
    patch = list(cfg["patch_size"])
    oversample = float(plans.get("foreground_oversample", 1.0 / 3.0))
    p = augmentation_probabilities(plans)
    keys = ["image", "label"]
    crop_kwargs: dict[str, Any] = {}
    if dims == 3:
        crop_kwargs = {"fg_indices_key": "label_fg_indices", "bg_indices_key": "label_bg_indices"}
    rotate = 30.0 / 180.0 * np.pi
    transforms = [
        RandCropByPosNegLabeld(
            keys,
            label_key="label",
            spatial_size=patch,
            pos=oversample,
            neg=1.0 - oversample,
            num_samples=1,
            allow_smaller=True,
            **crop_kwargs,
        ),
        RandAffined(
            keys,
            prob=p["rotate_scale"],
            rotate_range=(rotate,) * (3 if dims == 3 else 1),
            scale_range=(0.25,) * dims,
            mode=("bilinear", "nearest"),
            padding_mode="zeros",
            spatial_size=patch,
        ),
        RandGaussianNoised("image", prob=p["noise"], std=0.1),
        RandGaussianSmoothd("image", prob=p["blur"], sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        RandScaleIntensityd("image", factors=0.25, prob=p["brightness"]),
        RandScaleIntensityFixedMeand("image", factors=0.25, prob=p["contrast"], preserve_range=True),
        RandSimulateLowResolutiond(
            "image",
            prob=p["low_resolution"],
            zoom_range=(0.5, 1.0),
            upsample_mode="trilinear" if dims == 3 else "bilinear",
        ),
        RandAdjustContrastd("image", prob=p["gamma"], gamma=(0.7, 1.5), retain_stats=True),
    ]
    transforms += [RandFlipd(keys, prob=p["mirror"], spatial_axis=axis) for axis in range(dims)]
    chain = Compose(transforms)
    chain.set_random_state(seed=seed)
    return chain


def inference_transforms(plans: Mapping[str, Any], config: str = "3d") -> Compose:
    """Preprocessing of the image alone; invertible by :func:`invert_prediction`."""
    return Compose(preprocessing(plans, config, keys=("image",)))


def invert_prediction(
    chain: Compose, preprocessed: Mapping[str, Any], prediction: torch.Tensor, *, nearest: bool = False
) -> MetaTensor:
    """Map network output on the preprocessed grid back onto the input image's grid.

    Args:
        chain: the inference chain that produced ``preprocessed``.
        preprocessed: the chain's output dict (its ``image`` carries the applied operations).
        prediction: ``(C, *spatial)`` probabilities (or labels) on the preprocessed grid.
        nearest: resample by nearest neighbour (for label maps) instead of linearly.

    Returns:
        A MetaTensor on the input's grid, with the input's affine.
    """
    image = preprocessed["image"]
    meta = {k: v for k, v in image.meta.items() if k != "affine"}
    pred = MetaTensor(prediction.detach().cpu().float(), affine=image.affine.clone(), meta=meta)
    pred.applied_operations = list(image.applied_operations)
    inverter = Invertd(
        keys="pred",
        transform=chain,
        orig_keys="image",
        nearest_interp=nearest,
        to_tensor=True,
    )
    out = inverter({"pred": pred, "image": image})
    return out["pred"]


def default_workers() -> int:
    """Threads for reading and preprocessing: the CPUs available to this process (at most 8)."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        count = os.cpu_count() or 1
    return max(1, min(8, count))
