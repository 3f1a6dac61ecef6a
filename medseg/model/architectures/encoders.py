"""ResNet encoders with random weights: torchvision's in 2D, MONAI's in 3D, one interface.

:class:`ResNetEncoder` returns the outputs of the four ResNet stages (strides 4, 8, 16, 32 for
an undilated encoder); :func:`dilate_stage` turns a stage's stride into dilation (atrous
convolution), as DeepLab does; :func:`load_backbone_checkpoint` starts the encoder from a local
state dict (``torch.load(weights_only=True)``). Nothing here downloads: torchvision's ResNets are
built with ``weights=None``, MONAI's with its default ``pretrained=False``.

Example:
    >>> encoder = resnet_encoder(spatial_dims=3, in_channels=1, backbone="resnet18", widths=[16, 32, 64, 128])
    >>> [f.shape[1] for f in encoder(torch.zeros(1, 1, 32, 32, 32))]
    [16, 32, 64, 128]
"""

from __future__ import annotations

import os
import pickle
from functools import partial
from typing import Any, Sequence

import torch
from torch import nn

from medseg.errors import CheckpointError, MedsegUserError

__all__ = ["ResNetEncoder", "dilate_stage", "load_backbone_checkpoint", "resnet_encoder"]

#: (block kind, blocks per stage) of each ResNet depth (He et al. 2016)
_DEPTHS = {
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
}


class ResNetEncoder(nn.Module):
    """The stem and the four stages of a ResNet (its classifier dropped), feature maps of every stage.

    The attribute names are those of torchvision's and MONAI's ResNets (``conv1``, ``bn1``,
    ``maxpool``, ``layer1`` ... ``layer4``), so their state dicts load into it directly.

    Args:
        resnet: a torchvision or MONAI ResNet.
        channels: output channels of the four stages.
    """

    def __init__(self, resnet: nn.Module, *, channels: Sequence[int]) -> None:
        super().__init__()
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.act = getattr(resnet, "relu", None) or resnet.act
        self.maxpool = resnet.maxpool
        self.layer1, self.layer2 = resnet.layer1, resnet.layer2
        self.layer3, self.layer4 = resnet.layer3, resnet.layer4
        self.channels = list(channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        features = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            features.append(x)
        return features


def dilate_stage(stage: nn.Module, dilation: int) -> None:
    """Replace a stage's stride by dilation: strides become 1, 3x3 kernels dilate by ``dilation``.

    The stage's output then keeps its input's resolution and its receptive field grows as if
    it had been strided (DeepLab's atrous ResNet; torchvision's ``replace_stride_with_dilation``,
    which its basic blocks do not support, done here for every block type).
    """
    for module in stage.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            dims = len(module.kernel_size)
            module.stride = (1,) * dims
            if max(module.kernel_size) > 1:
                module.dilation = (dilation,) * dims
                module.padding = tuple(dilation * (k - 1) // 2 for k in module.kernel_size)


def _norm_2d(norm: str) -> Any:
    return nn.BatchNorm2d if norm == "batch" else partial(nn.InstanceNorm2d, affine=True)


def resnet_encoder(
    *,
    spatial_dims: int,
    in_channels: int,
    backbone: str = "resnet18",
    norm: str = "batch",
    widths: Sequence[int] | None = None,
) -> ResNetEncoder:
    """A randomly initialised ResNet encoder (2D: torchvision; 3D: MONAI, first convolution strided).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels (the first convolution is built for them, not for RGB).
        backbone: ``resnet18``, ``resnet34`` or ``resnet50``.
        norm: ``batch`` (the ResNets' own) or ``instance`` (affine).
        widths: 3D only, the four stages' widths (MONAI's ``block_inplanes``; ResNet's 64..512
            by default).

    Raises:
        MedsegUserError: unknown backbone, or 2D without torchvision installed.
    """
    if backbone not in _DEPTHS:
        raise MedsegUserError(f"plans: unknown backbone {backbone!r} (known: {', '.join(_DEPTHS)})")
    kind, layers = _DEPTHS[backbone]
    expansion = 4 if kind == "bottleneck" else 1
    if spatial_dims == 2:
        try:
            from torchvision.models import resnet
        except ImportError:
            raise MedsegUserError(
                "2D fcn and deeplabv3plus networks need torchvision (pip install 'medseg[architectures]')"
            ) from None
        net = getattr(resnet, backbone)(weights=None, norm_layer=_norm_2d(norm))
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        return ResNetEncoder(net, channels=[w * expansion for w in (64, 128, 256, 512)])
    from monai.networks.nets import ResNet

    widths = list(widths or (64, 128, 256, 512))
    net = ResNet(
        block=kind,
        layers=layers,
        block_inplanes=widths,
        spatial_dims=3,
        n_input_channels=in_channels,
        conv1_t_size=7,
        conv1_t_stride=2,
        feed_forward=False,
        shortcut_type="B",
        norm="batch" if norm == "batch" else ("instance", {"affine": True}),
    )
    return ResNetEncoder(net, channels=[w * expansion for w in widths])


def load_backbone_checkpoint(encoder: ResNetEncoder, path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Start ``encoder`` from a local ResNet state dict (``torch.load(weights_only=True)``).

    The file may hold the state dict itself or nest it under ``state_dict`` or ``model``;
    ``module.``, ``backbone.`` and ``encoder.`` prefixes are removed. Tensors whose shape differs
    from the encoder's (the first convolution of an RGB network loaded into a one-channel one, a
    classifier) are skipped and reported.

    Returns:
        ``{"loaded": [...], "skipped": [...]}`` parameter names.

    Raises:
        CheckpointError: the file is missing, not a weights-only state dict, or fits no parameter.
    """
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: backbone checkpoint not found") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise CheckpointError(
            f"{path}: not a weights-only state dict ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(content, dict) and isinstance(content.get(key), dict):
            content = content[key]
    if not isinstance(content, dict):
        raise CheckpointError(f"{path}: holds no state dict")
    own = encoder.state_dict()
    loaded, skipped, state = [], [], {}
    for name, tensor in content.items():
        clean = str(name)
        for prefix in ("module.", "backbone.", "encoder."):
            clean = clean.removeprefix(prefix)
        if clean in own and isinstance(tensor, torch.Tensor) and tensor.shape == own[clean].shape:
            state[clean] = tensor
            loaded.append(clean)
        else:
            skipped.append(str(name))
    if not loaded:
        raise CheckpointError(f"{path}: no tensor fits the {type(encoder).__name__} (is it a ResNet of this depth?)")
    encoder.load_state_dict(state, strict=False)
    return {"loaded": loaded, "skipped": skipped}
