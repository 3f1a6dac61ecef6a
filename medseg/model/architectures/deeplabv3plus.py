"""DeepLabV3+ (Chen et al., ECCV 2018) on an atrous ResNet encoder, 2D and 3D, from MONAI blocks.

* **Encoder**: a ResNet whose last stage (output stride 16) or last two stages (output stride 8)
  are dilated instead of strided (:func:`~medseg.model.architectures.encoders.dilate_stage`).
* **ASPP**: MONAI's ``SimpleASPP`` (a 1x1 and three dilated 3x3 convolutions, concatenated and
  fused) beside an **image-pooling branch** (global average, 1x1 convolution, ReLU, broadcast
  back), concatenated and projected by a 1x1 convolution (norm, ReLU, dropout 0.1).
* **Decoder**: the ASPP output upsampled to the stride-4 features, joined with them after a 1x1
  reduction (the low-level skip), two 3x3 convolutions, 1x1 class scores, upsampled (bilinear /
  trilinear) to the input size: logits at input resolution.
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.blocks import Convolution, SimpleASPP
from monai.networks.layers.factories import Conv, Pool
from torch import nn

from medseg.model.architectures.encoders import ResNetEncoder, dilate_stage
from medseg.model.architectures.fcn import resize_to

__all__ = ["ASPPWithPooling", "DeepLabV3Plus"]


def _norm(norm: str) -> str | tuple:
    return "BATCH" if norm == "batch" else ("INSTANCE", {"affine": True})


class ASPPWithPooling(nn.Module):
    """Atrous spatial pyramid pooling with an image-pooling branch (DeepLabV3's ASPP)."""

    def __init__(
        self, *, spatial_dims: int, in_channels: int, out_channels: int, dilations: Sequence[int], norm: str
    ) -> None:
        super().__init__()
        dilations = list(dilations)
        self.atrous = SimpleASPP(
            spatial_dims,
            in_channels,
            out_channels,
            kernel_sizes=[1] + [3] * (len(dilations) - 1),
            dilations=dilations,
            norm_type=_norm(norm),
            acti_type="RELU",
        )
        conv = Conv[Conv.CONV, spatial_dims]
        # no norm in the pooled branch: one value per channel and sample has no statistics
        self.image_pooling = nn.Sequential(
            Pool[Pool.ADAPTIVEAVG, spatial_dims](1), conv(in_channels, out_channels, kernel_size=1), nn.ReLU()
        )
        self.project = Convolution(
            spatial_dims,
            out_channels * (len(dilations) + 1),
            out_channels,
            kernel_size=1,
            norm=_norm(norm),
            act="RELU",
            dropout=0.1,
            bias=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.image_pooling(x).expand(-1, -1, *x.shape[2:])
        return self.project(torch.cat([self.atrous(x), pooled], dim=1))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+: atrous encoder, ASPP with image pooling, decoder with the stride-4 skip.

    Args:
        encoder: a :class:`ResNetEncoder`; its last stage(s) are dilated here.
        spatial_dims: 2 or 3.
        out_channels: classes, background included.
        output_stride: 16 (the last stage dilated by 2) or 8 (the last two by 2 and 4).
        aspp_channels: channels of each ASPP branch and of its output.
        aspp_dilations: dilation of each ASPP branch (the first is the 1x1 branch).
        decoder_channels: channels of the decoder's 3x3 convolutions.
        low_level_channels: channels the stride-4 skip is reduced to.
        norm: ``"batch"`` or ``"instance"``.
    """

    def __init__(
        self,
        encoder: ResNetEncoder,
        *,
        spatial_dims: int,
        out_channels: int,
        output_stride: int = 16,
        aspp_channels: int = 128,
        aspp_dilations: Sequence[int] = (1, 6, 12, 18),
        decoder_channels: int = 128,
        low_level_channels: int = 48,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if output_stride == 8:
            dilate_stage(encoder.layer3, 2)
            dilate_stage(encoder.layer4, 4)
        else:
            dilate_stage(encoder.layer4, 2)
        self.encoder = encoder
        self.aspp = ASPPWithPooling(
            spatial_dims=spatial_dims,
            in_channels=encoder.channels[3],
            out_channels=aspp_channels,
            dilations=aspp_dilations,
            norm=norm,
        )
        self.reduce_low_level = Convolution(
            spatial_dims,
            encoder.channels[0],
            low_level_channels,
            kernel_size=1,
            norm=_norm(norm),
            act="RELU",
            bias=False,
        )
        self.decoder = nn.Sequential(
            Convolution(
                spatial_dims,
                aspp_channels + low_level_channels,
                decoder_channels,
                kernel_size=3,
                norm=_norm(norm),
                act="RELU",
                bias=False,
            ),
            Convolution(
                spatial_dims,
                decoder_channels,
                decoder_channels,
                kernel_size=3,
                norm=_norm(norm),
                act="RELU",
                bias=False,
            ),
            Conv[Conv.CONV, spatial_dims](decoder_channels, out_channels, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, _, _, deep = self.encoder(x)
        context = resize_to(self.aspp(deep), low.shape[2:])
        scores = self.decoder(torch.cat([context, self.reduce_low_level(low)], dim=1))
        return resize_to(scores, x.shape[2:])
