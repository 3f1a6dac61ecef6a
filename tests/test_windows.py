"""The one sliding-window engine (medseg.model.windows): TTA averaging, float16 path, 2D on 3D."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medseg.model.windows import mirror_axes, sliding_window_logits


class AsymmetricNet(nn.Module):
    """A fixed, mirror-*asymmetric* 3D network: a one-sided difference, so flips change its output."""

    def __init__(self, dims: int = 3, classes: int = 2) -> None:
        super().__init__()
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.conv = conv(1, classes, kernel_size=3, padding=1)
        torch.manual_seed(0)
        with torch.no_grad():
            self.conv.weight.normal_()
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def plans_config(patch, dims=3, slice_axis=2):
    return {"spatial_dims": dims, "patch_size": list(patch), "slice_axis": slice_axis}


def test_mirror_axes_cover_every_combination():
    assert mirror_axes(3) == [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    assert mirror_axes(2) == [(), (2,), (3,), (2, 3)]


def test_tta_is_the_mean_of_the_flipped_logits_when_one_window_covers_the_image():
    torch.manual_seed(1)
    net = AsymmetricNet()
    image = torch.randn(1, 12, 10, 8)
    cfg = plans_config((12, 10, 8))
    plain = sliding_window_logits(net, image, plans_config=cfg, num_classes=2)
    tta = sliding_window_logits(net, image, plans_config=cfg, num_classes=2, mirror=True)
    with torch.no_grad():
        expected = torch.stack(
            [
                torch.flip(net(torch.flip(image[None], axes)), axes)[0] if axes else net(image[None])[0]
                for axes in mirror_axes(3)
            ]
        ).mean(0)
        direct = net(image[None])[0]
    # one window covering the image: the Gaussian weight cancels out of the blend
    assert torch.allclose(plain, direct, atol=1e-5)
    assert torch.allclose(tta, expected, atol=1e-5)
    assert float((tta - plain).abs().max()) > 1e-2  # the network is asymmetric: TTA really changes logits


def test_tta_averages_per_window_before_blending():
    """With several windows, TTA equals blending the per-window mean over flips (nnU-Net's order)."""
    torch.manual_seed(2)
    net = AsymmetricNet()
    image = torch.randn(1, 20, 16, 9)
    cfg = plans_config((12, 10, 8))
    tta = sliding_window_logits(net, image, plans_config=cfg, num_classes=2, mirror=True, overlap=0.5)

    class MeanOverFlips(nn.Module):
        def forward(self, x):
            outs = [torch.flip(net(torch.flip(x, a)), a) if a else net(x) for a in mirror_axes(3)]
            return torch.stack(outs).mean(0)

    blended = sliding_window_logits(MeanOverFlips(), image, plans_config=cfg, num_classes=2, overlap=0.5)
    assert torch.allclose(tta, blended, atol=1e-5)


def test_float16_accumulator_path_agrees_with_float32():
    torch.manual_seed(3)
    net = AsymmetricNet()
    image = torch.randn(1, 26, 21, 17)
    cfg = plans_config((12, 10, 8))
    full = sliding_window_logits(net, image, plans_config=cfg, num_classes=2, mirror=True)
    half = sliding_window_logits(net, image, plans_config=cfg, num_classes=2, mirror=True, max_float32_bytes=1)
    assert full.dtype == torch.float32 and half.dtype == torch.float16
    assert full.shape == half.shape == (2, 26, 21, 17)
    # float16 keeps ~3 significant digits (the input is held in float16 too): errors stay at that level
    scale = float(full.abs().max())
    assert float((half.float() - full).abs().max()) < 5e-3 * scale
    assert float((half.float() - full).abs().mean()) < 5e-4 * scale
    disagree = (half.float().argmax(0) != full.argmax(0)).float().mean()
    assert float(disagree) < 2e-3  # only near-ties can flip


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_2d_network_on_a_3d_volume_runs_slice_by_slice(slice_axis):
    torch.manual_seed(4)
    net = AsymmetricNet(dims=2)
    image = torch.randn(1, 9, 11, 7)
    patch = [s for a, s in enumerate(image.shape[1:]) if a != slice_axis]
    cfg = plans_config(patch, dims=2, slice_axis=slice_axis)
    logits = sliding_window_logits(net, image, plans_config=cfg, num_classes=2, mirror=True)
    assert logits.shape == (2, 9, 11, 7)
    with torch.no_grad():
        for index in (0, image.shape[slice_axis + 1] - 1):
            plane = image.select(slice_axis + 1, index)[None]  # (1, 1, H, W)
            expected = torch.stack(
                [torch.flip(net(torch.flip(plane, a)), a) if a else net(plane) for a in mirror_axes(2)]
            ).mean(0)[0]
            assert torch.allclose(logits.select(slice_axis + 1, index), expected, atol=1e-5)


def test_images_smaller_than_a_patch_are_padded_and_cropped_back():
    net = AsymmetricNet()
    image = torch.randn(1, 5, 6, 4)
    logits = sliding_window_logits(net, image, plans_config=plans_config((8, 8, 8)), num_classes=2)
    assert logits.shape == (2, 5, 6, 4)
    with torch.no_grad():
        padded = torch.nn.functional.pad(image[None], (2, 2, 1, 1, 1, 2))
        expected = net(padded)[0][:, 1:6, 1:7, 2:6]
    assert np.allclose(logits.numpy(), expected.numpy(), atol=1e-5)


def test_wrong_dimensionality_is_refused():
    with pytest.raises(ValueError, match="3D network cannot segment"):
        sliding_window_logits(
            AsymmetricNet(), torch.zeros(1, 4, 4), plans_config=plans_config((4, 4, 4)), num_classes=2
        )


def test_batched_and_one_by_one_flips_agree(monkeypatch):
    """The flipped copies run as one batch when small, in groups otherwise: the same logits."""
    import medseg.model.windows as windows

    torch.manual_seed(5)
    net = AsymmetricNet()
    image = torch.randn(1, 20, 16, 9)
    cfg = plans_config((12, 10, 8))
    together = sliding_window_logits(net, image, plans_config=cfg, num_classes=2, mirror=True, sw_batch_size=2)
    monkeypatch.setattr(windows, "TTA_BATCH_VOXELS", 1)  # one flip per forward pass
    one_by_one = sliding_window_logits(net, image, plans_config=cfg, num_classes=2, mirror=True, sw_batch_size=2)
    monkeypatch.setattr(windows, "TTA_BATCH_VOXELS", 3 * 2 * 12 * 10 * 8)  # groups of three flips
    grouped = sliding_window_logits(net, image, plans_config=cfg, num_classes=2, mirror=True, sw_batch_size=2)
    assert torch.allclose(together, one_by_one, atol=1e-5) and torch.allclose(grouped, one_by_one, atol=1e-5)


class CountingNet(nn.Module):
    """A network that counts the images (windows; for 2D, windows x slices) it is shown."""

    def __init__(self, dims: int = 2) -> None:
        super().__init__()
        self.conv = (nn.Conv3d if dims == 3 else nn.Conv2d)(1, 2, kernel_size=1)
        self.images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += int(x.shape[0])
        return self.conv(x)


def test_validation_estimate_of_a_2d_configuration_runs_a_few_slices_not_the_case_twice():
    """The budget's reserve for the final validation is measured on the middle slices of the first
    case (plus one warm-up slice), not by predicting the whole case twice (a detector: minutes)."""
    from medseg.training.validation import estimate_validation_seconds

    net = CountingNet()
    image = torch.zeros((1, 32, 32, 100))  # 100 slices along axis 2, one window each
    cache = [{"image": image}, {"image": image}, {"image": image}]
    cfg = plans_config((32, 32), dims=2, slice_axis=2) | {"batch_size": 4}
    estimate = estimate_validation_seconds(
        net, cache, cfg=cfg, device=torch.device("cpu"), amp_dtype=None, num_classes=2, timed_slices=16
    )
    assert net.images == 1 + 16
    assert estimate > 0.0


def test_validation_estimate_of_a_3d_configuration_times_the_whole_first_case_once():
    from medseg.training.validation import estimate_validation_seconds

    net = CountingNet(dims=3)
    cache = [{"image": torch.zeros((1, 16, 16, 48))}]  # 5 windows of 16^3 at overlap 0.5 along the last axis
    cfg = plans_config((16, 16, 16)) | {"batch_size": 1}
    estimate_validation_seconds(net, cache, cfg=cfg, device=torch.device("cpu"), amp_dtype=None, num_classes=2)
    assert net.images == 1 + 5
