"""2D/3D U-Nets from plans: MONAI DynUNet (nnU-Net's architecture) or MONAI UNet, one builder.

The plans' ``network`` section names the architecture and its topology:

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
) -> nn.Module:
    """Build the network a configuration of the plans names.

    Args:
        plans_config: one entry of ``plans["configurations"]`` (``spatial_dims`` and ``network``).
        in_channels: image channels.
        out_channels: classes, background included.

    Raises:
        MedsegUserError: unknown architecture or inconsistent topology in the plans.
    """
    spatial_dims = int(plans_config["spatial_dims"])
    network = dict(plans_config["network"])
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
