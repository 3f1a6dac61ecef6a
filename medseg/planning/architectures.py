"""The architecture a plans configuration names, its editable network section and the patch it needs.

Every configuration of ``plans.json`` carries an ``architecture`` (``medseg plan --architecture``;
absent in older plans, which then mean ``dynunet``):

==================  =========================================================================
``dynunet``         nnU-Net's U-Net (MONAI DynUNet), topology from :mod:`medseg.planning.rules`
``fcn``             FCN-8s on a ResNet encoder: class scores of the stride-8, -16 and -32
                    features, summed while upsampling (Long et al. 2015)
``deeplabv3plus``   atrous ResNet encoder (the last stage dilated, output stride 16 in 2D and
                    8 in 3D) + ASPP with an image-pooling branch + a decoder that joins the
                    stride-4 features (Chen et al. 2018)
``maskrcnn``        Mask R-CNN on a ResNet-FPN (He et al. 2017), 2D only: trained on the
                    connected components of each foreground class as instances; a 3D volume
                    is segmented slice by slice. Plans for it keep only 2D configurations.
==================  =========================================================================

2D ResNets come from torchvision, 3D ones from MONAI; both are built with random weights (no
download ever); ``backbone_checkpoint`` may name a local state dict to start the encoder from.
The patch of a ResNet architecture is rounded up to a multiple of its total stride
(:func:`patch_multiple`), so every feature map of a window has a whole size.

Training settings an architecture needs besides the plans' defaults are in
:data:`TRAINING_OVERRIDES` (``plans["training"]``, editable like the rest): ``maskrcnn`` trains with
AdamW at ``learning_rate`` 3e-4. At the U-Nets' 3e-3 a randomly initialised Mask R-CNN diverges:
on MS-lesion slices (batch 4, gradient norm clipped at 12) its summed loss went 7.0 -> 4990 after
one step, while at 3e-4 it fell 7.0 -> 1.4 in 12 steps (1e-4: 7.0 -> 2.0).

This module is plain JSON rules (no torch); :mod:`medseg.model.architectures` builds the networks.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from medseg.errors import MedsegUserError

__all__ = [
    "ARCHITECTURE_NAMES",
    "BACKBONES",
    "DEFAULT_ARCHITECTURE",
    "TRAINING_OVERRIDES",
    "TWO_D_ONLY",
    "apply_architecture",
    "configuration_architecture",
    "patch_multiple",
    "resnet_network_section",
    "validate_architecture",
]

#: architectures ``medseg plan --architecture`` accepts
ARCHITECTURE_NAMES = ("dynunet", "fcn", "deeplabv3plus", "maskrcnn")
DEFAULT_ARCHITECTURE = "dynunet"
#: ResNet depths the ResNet-based architectures accept as ``network.backbone``
BACKBONES = ("resnet18", "resnet34", "resnet50")
_RESNET_ARCHITECTURES = ("fcn", "deeplabv3plus", "maskrcnn")
#: architectures with 2D configurations only
TWO_D_ONLY = ("maskrcnn",)
#: ``plans["training"]`` settings an architecture needs instead of the defaults (see the module docstring)
TRAINING_OVERRIDES: dict[str, dict[str, Any]] = {"maskrcnn": {"learning_rate": 3e-4}}


def configuration_architecture(cfg: Mapping[str, Any]) -> str:
    """The architecture of one configuration (``dynunet`` when the plans predate the field)."""
    return str(cfg.get("architecture", DEFAULT_ARCHITECTURE)).lower()


def patch_multiple(architecture: str, network: Mapping[str, Any], spatial_dims: int) -> int:
    """The number every patch axis must be a multiple of (1 for ``dynunet``: its strides decide).

    ``fcn``: 32 in 2D (the encoder's total stride); 16 in 3D, where patches are small and the
    stride-32 stage may have a rounded-up size (its scores are resized to the stride-16 map).
    ``deeplabv3plus``: its output stride. ``maskrcnn``: 32, the coarsest level of its FPN.
    """
    if architecture in ("fcn", "maskrcnn"):
        return 32 if spatial_dims == 2 else 16
    if architecture == "deeplabv3plus":
        return int(network.get("output_stride", 16 if spatial_dims == 2 else 8))
    return 1


def resnet_network_section(architecture: str, spatial_dims: int, *, backbone: str = "resnet18") -> dict[str, Any]:
    """The default, editable ``network`` section of a ResNet-based architecture."""
    section: dict[str, Any] = {
        "backbone": backbone,
        "norm": "batch",
        "backbone_checkpoint": None,
    }
    if architecture == "maskrcnn":
        section.update(
            {
                "anchor_sizes": [8, 16, 32, 64, 128],  # lesion-sized (COCO's are 32-512)
                "detections_per_image": 100,
                # lesions are few per slice: fewer proposals and sampled RoIs than torchvision's
                # (1000-2000 and 512; Detectron2's small-dataset tutorial samples 128 RoIs too);
                # 500 and 128 instead of 1000 and 256 make a CPU training step 1.6x faster
                # (7.5 -> 4.6 s, batch 16 of 128 x 160, ResNet-18)
                "proposals_per_image": 500,
                "rois_per_image": 128,
                "score_threshold": 0.5,  # an instance is kept at or above this score
                "mask_threshold": 0.5,
            }
        )
        return section
    if spatial_dims == 3:
        section["widths"] = [32, 64, 128, 256]  # half ResNet's 64..512: 3D convolutions cost 3x more per voxel
    if architecture == "deeplabv3plus":
        section.update(
            {
                "output_stride": 16 if spatial_dims == 2 else 8,
                "aspp_channels": 128 if spatial_dims == 2 else 64,
                "aspp_dilations": [1, 6, 12, 18] if spatial_dims == 2 else [1, 2, 3, 4],
                "decoder_channels": 128 if spatial_dims == 2 else 64,
                "low_level_channels": 48 if spatial_dims == 2 else 24,
            }
        )
    return section


def apply_architecture(cfg: Mapping[str, Any], architecture: str) -> dict[str, Any]:
    """A planned (DynUNet) configuration turned into one for ``architecture``.

    The spacing, batch size and slice axis stay; a ResNet architecture gets its own ``network``
    section (:func:`resnet_network_section`) and the patch rounded up to :func:`patch_multiple`.
    """
    architecture = architecture.lower()
    if architecture not in ARCHITECTURE_NAMES:
        raise MedsegUserError(f"unknown architecture {architecture!r} (known: {', '.join(ARCHITECTURE_NAMES)})")
    if architecture in TWO_D_ONLY and int(cfg["spatial_dims"]) != 2:
        raise MedsegUserError(f"{architecture} is 2D only: it cannot take a {cfg['spatial_dims']}D configuration")
    out = dict(cfg)
    out["architecture"] = architecture
    if architecture == DEFAULT_ARCHITECTURE:
        return out
    dims = int(cfg["spatial_dims"])
    out["network"] = resnet_network_section(architecture, dims)
    multiple = patch_multiple(architecture, out["network"], dims)
    out["patch_size"] = [int(math.ceil(p / multiple) * multiple) for p in cfg["patch_size"]]
    out.pop("estimated_memory_gb", None)
    return out


def validate_architecture(cfg: Mapping[str, Any], *, where: str, fail: Callable[[str, str], Exception]) -> None:
    """Check the ``architecture`` of a configuration and its ResNet ``network`` keys.

    ``fail(key, problem)`` makes the error to raise (it names the plans file); the DynUNet
    topology keys are :func:`medseg.planning.plans.validate_plans`'s to check.
    """
    architecture = configuration_architecture(cfg)
    if architecture not in ARCHITECTURE_NAMES:
        raise fail(f"{where}.architecture", f"must be one of {', '.join(ARCHITECTURE_NAMES)}, got {architecture!r}")
    if architecture not in _RESNET_ARCHITECTURES:
        return
    network = cfg["network"]
    dims = int(cfg["spatial_dims"])
    if architecture in TWO_D_ONLY and dims != 2:
        raise fail(f"{where}.architecture", f"{architecture} is 2D only, but spatial_dims is {dims}")
    if network.get("backbone") not in BACKBONES:
        raise fail(
            f"{where}.network.backbone", f"must be one of {', '.join(BACKBONES)}, got {network.get('backbone')!r}"
        )
    if network.get("norm", "batch") not in ("batch", "instance"):
        raise fail(f"{where}.network.norm", f"must be 'batch' or 'instance', got {network.get('norm')!r}")
    widths = network.get("widths")
    if widths is not None and not (
        dims == 3
        and isinstance(widths, list)
        and len(widths) == 4
        and all(isinstance(w, int) and w > 0 for w in widths)
    ):
        raise fail(f"{where}.network.widths", f"must be 4 positive integers (3D only), got {widths!r}")
    checkpoint = network.get("backbone_checkpoint")
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise fail(f"{where}.network.backbone_checkpoint", "must be a file path or null")
    if architecture == "maskrcnn":
        anchors = network.get("anchor_sizes", [8, 16, 32, 64, 128])
        if not (isinstance(anchors, list) and len(anchors) == 5 and all(_positive_int(a) for a in anchors)):
            raise fail(
                f"{where}.network.anchor_sizes", f"must be 5 positive integers (one per FPN level), got {anchors!r}"
            )
        for key in ("detections_per_image", "proposals_per_image", "rois_per_image"):
            if key in network and not _positive_int(network[key]):
                raise fail(f"{where}.network.{key}", f"must be a positive integer, got {network[key]!r}")
        for key in ("score_threshold", "mask_threshold"):
            value = network.get(key, 0.5)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0):
                raise fail(f"{where}.network.{key}", f"must be a number in [0, 1], got {value!r}")
    if architecture == "deeplabv3plus":
        stride = network.get("output_stride", 16 if dims == 2 else 8)
        if stride not in (8, 16):
            raise fail(f"{where}.network.output_stride", f"must be 8 or 16, got {stride!r}")
        for key in ("aspp_channels", "decoder_channels", "low_level_channels"):
            value = network.get(key)
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise fail(f"{where}.network.{key}", f"must be a positive integer, got {value!r}")
        dilations = network.get("aspp_dilations")
        if dilations is not None and not (
            isinstance(dilations, list) and dilations and all(isinstance(d, int) and d > 0 for d in dilations)
        ):
            raise fail(f"{where}.network.aspp_dilations", f"must be a list of positive integers, got {dilations!r}")
    multiple = patch_multiple(architecture, network, dims)
    if any(int(p) % multiple for p in cfg["patch_size"]):
        raise fail(
            f"{where}.patch_size",
            f"must be a multiple of {multiple} on every axis for {architecture} in {dims}D, got {cfg['patch_size']!r}",
        )


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
