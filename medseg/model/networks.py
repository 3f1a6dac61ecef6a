"""The network a plans configuration names, one builder for every architecture.

A configuration's ``architecture`` (:mod:`medseg.planning.architectures`) picks the family:
``dynunet`` (the default, built here), ``fcn`` / ``deeplabv3plus`` or ``maskrcnn``
(:mod:`medseg.model.architectures`). For ``dynunet`` the ``network`` section names the U-Net and
its topology:

* ``DynUNet``: ``filters``, ``kernel_size`` and ``strides`` per stage and axis, instance norm,
  leaky ReLU (slope 0.01), optional deep supervision (``deep_supr_num`` extra heads; in training
  mode the network then returns ``(B, 1 + deep_supr_num, C, *spatial)``, all heads at full size).
* ``UNet``: MONAI's residual UNet with ``filters`` as channels and stride 2 between stages.

Example:
    >>> net = build_network({"spatial_dims": 3, "network": {"architecture": "DynUNet",
    ...     "filters": [8, 16], "kernel_size": [[3, 3, 3]] * 2, "strides": [[1, 1, 1], [2, 2, 2]],
    ...     "deep_supervision": False}}, in_channels=1, out_channels=3)
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from medseg.errors import MedsegUserError

__all__ = ["build_network", "deep_supervision_outputs", "ARCHITECTURES"]

ARCHITECTURES = ("DynUNet", "UNet")


def build_network(
    plans_config: Mapping[str, Any],
    *,
    in_channels: int,
    out_channels: int,
    backbone_weights: bool = False,
) -> nn.Module:
    """Build the network a configuration of the plans names.

    Every network maps ``(B, in_channels, *patch)`` to logits ``(B, out_channels, *patch)`` (a
    DynUNet with deep supervision, in training mode, stacks its heads, see
    :func:`deep_supervision_outputs`).

    Args:
        plans_config: one entry of ``plans["configurations"]`` (``spatial_dims``, ``architecture``
            and ``network``).
        in_channels: image channels.
        out_channels: classes, background included.
        backbone_weights: start a ResNet encoder from the plans' local ``backbone_checkpoint``
            (training from scratch; a model checkpoint holds every weight anyway).

    Raises:
        MedsegUserError: unknown architecture or inconsistent topology in the plans.
    """
    from medseg.planning.architectures import ARCHITECTURE_NAMES, configuration_architecture

    spatial_dims = int(plans_config["spatial_dims"])
    network = dict(plans_config["network"])
    family = configuration_architecture(plans_config)
    if family not in ARCHITECTURE_NAMES:
        raise MedsegUserError(f"plans: unknown architecture {family!r} (known: {', '.join(ARCHITECTURE_NAMES)})")
    if family == "maskrcnn":
        from medseg.model.architectures import build_detection_architecture

        return build_detection_architecture(
            family,
            network=network,
            in_channels=in_channels,
            out_channels=out_channels,
            patch_size=plans_config["patch_size"],
            backbone_weights=backbone_weights,
        )
    if family != "dynunet":
        from medseg.model.architectures import build_resnet_architecture

        return build_resnet_architecture(
            family,
            spatial_dims=spatial_dims,
            network=network,
            in_channels=in_channels,
            out_channels=out_channels,
            backbone_weights=backbone_weights,
        )
    architecture = network.get("architecture", "DynUNet")
    if architecture == "DynUNet":
        from monai.networks.nets import DynUNet

        kernels = [list(k) for k in network["kernel_size"]]
        strides = [list(s) for s in network["strides"]]
        filters = list(network["filters"])
        if not (len(kernels) == len(strides) == len(filters)):
            raise MedsegUserError(
                f"plans: DynUNet needs as many kernel_size ({len(kernels)}), strides ({len(strides)}) "
                f"and filters ({len(filters)}) entries"
            )
        if any(len(k) != spatial_dims for k in kernels + strides):
            raise MedsegUserError(f"plans: every kernel/stride needs {spatial_dims} values")
        deep = bool(network.get("deep_supervision", True)) and len(strides) > 2
        return DynUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=kernels,
            strides=strides,
            upsample_kernel_size=strides[1:],
            filters=filters,
            norm_name=("INSTANCE", {"affine": True}),
            act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
            deep_supervision=deep,
            deep_supr_num=max(1, min(int(network.get("deep_supr_num", 2)), len(strides) - 2)),
            res_block=bool(network.get("res_block", False)),
        )
    if architecture == "UNet":
        from monai.networks.nets import UNet

        filters = list(network["filters"])
        return UNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=filters,
            strides=[2] * (len(filters) - 1),
            num_res_units=int(network.get("num_res_units", 2)),
            norm="INSTANCE",
            act=("leakyrelu", {"negative_slope": 0.01}),
        )
    raise MedsegUserError(f"plans: unknown architecture {architecture!r} (known: {', '.join(ARCHITECTURES)})")


def deep_supervision_outputs(output: torch.Tensor | list[torch.Tensor], *, spatial_dims: int) -> list[torch.Tensor]:
    """The heads of a network's training output as a list, full resolution first.

    DynUNet with deep supervision stacks its heads on axis 1: ``(B, heads, C, *spatial)``.
    """
    if isinstance(output, (list, tuple)):
        return list(output)
    if output.ndim == spatial_dims + 3:
        return list(torch.unbind(output, dim=1))
    return [output]
