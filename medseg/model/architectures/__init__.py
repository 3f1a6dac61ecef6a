"""Networks other than the U-Net, one small module per family, built from a plans configuration.

* :mod:`~medseg.model.architectures.encoders`: ResNet encoders (torchvision 2D, MONAI 3D).
* :mod:`~medseg.model.architectures.fcn`: FCN-8s.
* :mod:`~medseg.model.architectures.deeplabv3plus`: DeepLabV3+.
* :mod:`~medseg.model.architectures.maskrcnn`: Mask R-CNN (2D), as a network that trains on
  its own losses and predicts dense class scores.

Every network maps ``(B, C, *patch)`` to logits ``(B, classes, *patch)`` at input resolution,
the interface of :func:`medseg.model.networks.build_network`, so training, validation,
prediction, TTA, ensembles and checkpoints treat every architecture alike. Weights are random
(nothing is downloaded); ``network.backbone_checkpoint`` in the plans names a local ResNet state
dict the encoder starts from.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from medseg.errors import MedsegUserError

__all__ = ["build_detection_architecture", "build_resnet_architecture"]


def build_resnet_architecture(
    architecture: str,
    *,
    spatial_dims: int,
    network: Mapping[str, Any],
    in_channels: int,
    out_channels: int,
    backbone_weights: bool = False,
) -> nn.Module:
    """Build ``fcn`` or ``deeplabv3plus`` from a plans ``network`` section.

    Args:
        architecture: ``fcn`` or ``deeplabv3plus``.
        spatial_dims: 2 or 3.
        network: the configuration's ``network`` section (see
            :func:`medseg.planning.architectures.resnet_network_section`).
        in_channels: image channels.
        out_channels: classes, background included.
        backbone_weights: load ``network.backbone_checkpoint`` when it names a file (training
            from scratch does; a model checkpoint carries all weights anyway).
    """
    from medseg.model.architectures.encoders import load_backbone_checkpoint, resnet_encoder

    norm = str(network.get("norm", "batch"))
    encoder = resnet_encoder(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        backbone=str(network.get("backbone", "resnet18")),
        norm=norm,
        widths=network.get("widths"),
    )
    checkpoint = network.get("backbone_checkpoint")
    if backbone_weights and checkpoint:
        load_backbone_checkpoint(encoder, checkpoint)
    if architecture == "fcn":
        from medseg.model.architectures.fcn import FCN8s

        return FCN8s(encoder, spatial_dims=spatial_dims, out_channels=out_channels, norm=norm)
    if architecture == "deeplabv3plus":
        from medseg.model.architectures.deeplabv3plus import DeepLabV3Plus

        defaults_2d = spatial_dims == 2
        return DeepLabV3Plus(
            encoder,
            spatial_dims=spatial_dims,
            out_channels=out_channels,
            output_stride=int(network.get("output_stride", 16 if defaults_2d else 8)),
            aspp_channels=int(network.get("aspp_channels", 128 if defaults_2d else 64)),
            aspp_dilations=list(network.get("aspp_dilations", [1, 6, 12, 18] if defaults_2d else [1, 2, 3, 4])),
            decoder_channels=int(network.get("decoder_channels", 128 if defaults_2d else 64)),
            low_level_channels=int(network.get("low_level_channels", 48 if defaults_2d else 24)),
            norm=norm,
        )
    raise MedsegUserError(f"plans: {architecture!r} is not a ResNet architecture")


def build_detection_architecture(
    architecture: str,
    *,
    network: Mapping[str, Any],
    in_channels: int,
    out_channels: int,
    patch_size: Any,
    backbone_weights: bool = False,
) -> nn.Module:
    """Build ``maskrcnn`` (2D) from a plans ``network`` section (see :mod:`.maskrcnn`)."""
    if architecture != "maskrcnn":
        raise MedsegUserError(f"plans: {architecture!r} is not a detection architecture")
    from medseg.model.architectures.maskrcnn import build_maskrcnn_segmenter

    return build_maskrcnn_segmenter(
        network,
        in_channels=in_channels,
        out_channels=out_channels,
        patch_size=[int(p) for p in patch_size],
        backbone_weights=backbone_weights,
    )
