"""The U-Net's encoder/decoder split (UNet.encode / decode) and the extra decoders (UNetDecoder) CCT and MC-Net use."""
import pytest
import torch
from torch import nn

from dusss.config import make_config
from dusss.unet import UPSAMPLING, UNet, UNetDecoder, build_decoder, build_unet


def _chained(net: UNet, x: torch.Tensor) -> torch.Tensor:
    """The U-Net's forward pass written out block by block (what ``forward`` computed before the split)."""
    x1 = net.inc(x)
    x2 = net.down1(x1)
    x3 = net.down2(x2)
    x4 = net.down3(x3)
    x5 = net.down4(x4)
    y = net.up4(x5, x4)
    y = net.up3(y, x3)
    y = net.up2(y, x2)
    y = net.up1(y, x1)
    return net.outc(y)


@pytest.mark.parametrize("size", [16, 32])
def test_forward_is_decode_of_encode_and_equals_the_block_by_block_pass(size):
    torch.manual_seed(0)
    net = UNet(base=4, prior=0.05).train()
    x = torch.rand(3, 3, size, size)
    feats = net.encode(x)
    assert [tuple(f.shape) for f in feats] == [(3, 4 * m, size // s, size // s)
                                              for m, s in ((1, 1), (2, 2), (4, 4), (8, 8), (8, 16))]
    z = net(x)
    assert torch.equal(z, net.decode(feats)) and torch.equal(z, _chained(net, x))
    logits, last = net.decode(feats, features=True)
    assert torch.equal(logits, z) and last.shape == (3, 4, size, size)
    assert torch.allclose(net.outc(last), z)  # the features are what the output conv reads


def test_a_transpose_decoder_is_the_unets_own_up_path():
    torch.manual_seed(0)
    net = UNet(base=4).eval()
    dec = UNetDecoder(base=4, upsample="transpose").eval()
    own = {k: v for k, v in net.state_dict().items() if k.startswith(("up", "outc"))}
    dec.load_state_dict(own)  # same keys and shapes
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(dec(net.encode(x)), net(x))


@pytest.mark.parametrize("mode", UPSAMPLING)
def test_decoders_differ_only_in_their_upsampling(mode):
    torch.manual_seed(0)
    net, dec = UNet(base=4), UNetDecoder(base=4, upsample=mode)
    feats = net.encode(torch.rand(2, 3, 32, 32))
    assert dec(feats).shape == (2, 1, 32, 32)
    for name in ("up4", "up3", "up2", "up1"):
        up = getattr(dec, name).up
        if mode == "transpose":
            assert isinstance(up, nn.ConvTranspose2d)
        else:
            assert isinstance(up[0], nn.Conv2d) and up[0].kernel_size == (1, 1)
            assert isinstance(up[1], nn.Upsample) and up[1].mode == mode and up[1].scale_factor == 2
        assert type(getattr(dec, name).convs) is type(getattr(net, name).convs)


def test_build_decoder_follows_the_config_and_bad_upsampling_is_named():
    cfg = make_config("smoke", unet_base=4, fg_prior=0.05)
    dec = build_decoder(cfg, "bilinear")
    assert dec.outc.in_channels == 4 and torch.sigmoid(dec.outc.bias).item() == pytest.approx(0.05)
    assert dec.outc.in_channels == build_unet(cfg).outc.in_channels
    with pytest.raises(ValueError, match="up-sampling 'cubic'"):
        UNetDecoder(base=4, upsample="cubic")
