"""The Step-2 U-Net: LViT's architecture, its parameter count, shapes and gradients."""
import pytest
import torch

from dusss.config import make_config
from dusss.unet import UNet, build_unet, count_parameters


def test_parameter_count_at_base_64_is_the_papers_14_75_million():
    n = count_parameters(UNet(in_channels=3, out_channels=1, base=64))
    # LViT's nets/UNet.py with n_classes=1 has 14,751,873 parameters (paper: 14.75 M)
    assert abs(n - 14_751_873) <= 0.005 * 14_751_873
    assert n == 14_751_873


def test_parameter_count_scales_with_the_square_of_the_base_width():
    small, large = count_parameters(UNet(base=8)), count_parameters(UNet(base=16))
    # conv weights dominate and scale with base^2; biases/BN scale with base
    assert 3.8 < large / small < 4.0


@pytest.mark.parametrize("size", [16, 64])
def test_output_is_one_logit_map_at_the_input_size_with_finite_gradients(size):
    torch.manual_seed(0)
    net = UNet(base=4)
    x = torch.rand(2, 3, size, size, requires_grad=True)
    y = net(x)
    assert y.shape == (2, 1, size, size)
    # logits, not probabilities: a fresh network gives values outside [0, 1]
    assert (y < 0).any() or (y > 1).any()
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_input_side_not_a_multiple_of_16_is_rejected_with_the_fix():
    with pytest.raises(ValueError, match="multiple of 16"):
        UNet(base=4)(torch.rand(1, 3, 40, 40))


def test_build_unet_uses_the_config_base_width():
    cfg = make_config("smoke")
    assert build_unet(cfg).inc[0].out_channels == cfg.unet_base


def test_output_prior_sets_the_initial_foreground_probability():
    torch.manual_seed(0)
    net = UNet(base=4, prior=0.05)
    assert torch.sigmoid(net.outc.bias).item() == pytest.approx(0.05)
    assert build_unet(make_config("smoke", fg_prior=0.0)).outc.bias.abs().max() < 1.0  # default init: small
    with pytest.raises(ValueError, match="fg_prior"):
        UNet(base=4, prior=1.0)
