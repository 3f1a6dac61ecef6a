"""FCN-8s on a ResNet encoder (Long, Shelhamer and Darrell, CVPR 2015), 2D and 3D.

The stride-32 features go through a small head (3x3 convolution, norm, ReLU, dropout 0.1, as
torchvision's ``FCNHead``) to class scores; these are upsampled and added to the 1x1 class scores
of the stride-16 features, the sum upsampled and added to those of the stride-8 features, and
the result upsampled (bilinear / trilinear) to the input size: logits at input resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Conv
from torch import nn

from medseg.model.architectures.encoders import ResNetEncoder

__all__ = ["FCN8s", "resize_to"]


def resize_to(x: torch.Tensor, size: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Linear (bilinear / trilinear) resize of a ``(B, C, *spatial)`` tensor to ``size``."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    mode = "bilinear" if x.ndim == 4 else "trilinear"
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)


class FCN8s(nn.Module):
    """FCN-8s: class scores at strides 32, 16 and 8 summed while upsampling.

    Args:
        encoder: a :class:`ResNetEncoder` (undilated).
        spatial_dims: 2 or 3.
        out_channels: classes, background included.
        norm: ``"batch"`` or ``"instance"`` in the head.
    """

    def __init__(self, encoder: ResNetEncoder, *, spatial_dims: int, out_channels: int, norm: str = "batch") -> None:
        super().__init__()
        self.encoder = encoder
        conv = Conv[Conv.CONV, spatial_dims]
        c8, c16, c32 = encoder.channels[1:]
        self.head32 = nn.Sequential(
            Convolution(
                spatial_dims,
                c32,
                c32 // 4,
                kernel_size=3,
                norm="BATCH" if norm == "batch" else ("INSTANCE", {"affine": True}),
                act="RELU",
                dropout=0.1,
                bias=False,
            ),
            conv(c32 // 4, out_channels, kernel_size=1),
        )
        self.score16 = conv(c16, out_channels, kernel_size=1)
        self.score8 = conv(c8, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, f8, f16, f32 = self.encoder(x)
        scores = resize_to(self.head32(f32), f16.shape[2:]) + self.score16(f16)
        scores = resize_to(scores, f8.shape[2:]) + self.score8(f8)
        return resize_to(scores, x.shape[2:])
