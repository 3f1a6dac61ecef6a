"""Network builder: DynUNet (2D/3D, deep supervision) and UNet from plans."""

from __future__ import annotations

import pytest
import torch

from medseg.errors import MedsegUserError
from medseg.model.networks import build_network, deep_supervision_outputs


def _config(dims, architecture="DynUNet", deep=True):
    return {
        "spatial_dims": dims,
        "network": {
            "architecture": architecture,
            "filters": [4, 8, 16, 32],
            "kernel_size": [[3] * dims] * 4,
            "strides": [[1] * dims] + [[2] * dims] * 3,
            "deep_supervision": deep,
            "deep_supr_num": 2,
        },
    }


@pytest.mark.parametrize("dims", [2, 3])
def test_dynunet_shapes_and_deep_supervision(dims) -> None:
    net = build_network(_config(dims), in_channels=2, out_channels=5)
    x = torch.randn(2, 2, *([16] * dims))
    net.train()
    heads = deep_supervision_outputs(net(x), spatial_dims=dims)
    assert len(heads) == 3 and all(h.shape == (2, 5, *([16] * dims)) for h in heads)
    net.eval()
    with torch.no_grad():
        out = net(x)
    assert out.shape == (2, 5, *([16] * dims))
    assert len(deep_supervision_outputs(out, spatial_dims=dims)) == 1
    norms = [m for m in net.modules() if isinstance(m, (torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d))]
    assert norms and all(m.affine for m in norms)


def test_unet_alternative() -> None:
    net = build_network(_config(3, "UNet"), in_channels=1, out_channels=3)
    assert net(torch.randn(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)


def test_bad_plans_are_user_errors() -> None:
    with pytest.raises(MedsegUserError, match="unknown architecture"):
        build_network(_config(3, "SegFormer"), in_channels=1, out_channels=2)
    config = _config(3)
    config["network"]["filters"] = [4, 8]
    with pytest.raises(MedsegUserError, match="as many"):
        build_network(config, in_channels=1, out_channels=2)
