"""The segmentation network of Step 2: the U-Net of the LViT repository.

DuSSS trains the U-Net that LViT ships (``nets/UNet.py`` there): one 3x3
conv-BN-ReLU stem, four max-pool down blocks and four transposed-conv up blocks
of two conv-BN-ReLU layers each, channel widths ``base x (1, 2, 4, 8, 8)``, and a
1x1 output conv. With ``base = 64`` and one output channel it has 14,751,873
parameters, the "14.75 M" of the paper's Table 1. Here the base width is a
parameter (``cfg.unet_base``) so the smoke and demo profiles can run small, and
the network returns **logits**: the losses (Eqs. 14-17) and the merge of Eq. 15
need pre-sigmoid values, so the sigmoid is applied by whoever needs
probabilities.

Methods that share the encoder between several decoders (CCT, MC-Net) or read
the last decoder features (SS-Net) use :meth:`UNet.encode` (the five skip
features) and :meth:`UNet.decode` (``forward(x) == decode(encode(x))``), and
build their extra decoders with :class:`UNetDecoder` (the same up-path, with a
choice of up-sampling: :data:`UPSAMPLING`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import Config

__all__ = ["UNet", "UNetDecoder", "UPSAMPLING", "build_unet", "build_decoder", "count_parameters"]

UPSAMPLING = ("transpose", "bilinear", "nearest", "bicubic")  # x2 up-sampling of a decoder block (UNetDecoder)


class _ConvBNReLU(nn.Sequential):
    """3x3 convolution (padding 1), batch norm, ReLU: LViT's ``ConvBatchNorm``."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class _Down(nn.Sequential):
    """2x2 max-pool, then two conv-BN-ReLU layers."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(nn.MaxPool2d(2), _ConvBNReLU(c_in, c_out), _ConvBNReLU(c_out, c_out))


class _Up(nn.Module):
    """x2 up-sampling of the deeper map, concatenation with the skip, two conv-BN-ReLU layers.

    ``c_cat`` is the channel count after concatenation; as in LViT both halves
    have ``c_cat // 2`` channels and the up-sampling keeps its width.
    ``upsample="transpose"`` is LViT's 2x2 transposed conv; ``"bilinear"``,
    ``"nearest"`` and ``"bicubic"`` are MC-Net's alternatives (a 1x1 conv, then
    interpolation; ``align_corners=True`` where the mode has corners).
    """

    def __init__(self, c_cat: int, c_out: int, upsample: str = "transpose") -> None:
        super().__init__()
        c = c_cat // 2
        if upsample == "transpose":
            self.up = nn.ConvTranspose2d(c, c, kernel_size=2, stride=2)
        elif upsample in UPSAMPLING:
            corners = True if upsample in ("bilinear", "bicubic") else None
            self.up = nn.Sequential(nn.Conv2d(c, c, kernel_size=1),
                                    nn.Upsample(scale_factor=2, mode=upsample, align_corners=corners))
        else:
            raise ValueError(f"decoder up-sampling {upsample!r} is not one of {UPSAMPLING}")
        self.convs = nn.Sequential(_ConvBNReLU(c_cat, c_out), _ConvBNReLU(c_out, c_out))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)  # (B, C, 2h, 2w)
        return self.convs(torch.cat([x, skip], dim=1))  # (B, c_out, 2h, 2w)


def _set_prior(outc: nn.Conv2d, prior: float | None) -> None:
    """Set the output bias to ``logit(prior)`` (no change for ``None``)."""
    if prior is not None:
        if not 0.0 < prior < 1.0:
            raise ValueError(f"output prior {prior!r} must be in (0, 1); set config key fg_prior (0 = off)")
        nn.init.constant_(outc.bias, math.log(prior / (1.0 - prior)))


def _run_decoder(dec: nn.Module, feats: list[torch.Tensor], features: bool):
    """The up-path of :class:`UNet` and :class:`UNetDecoder` (both hold ``up4 .. up1`` and ``outc``)."""
    x1, x2, x3, x4, x5 = feats
    x = dec.up4(x5, x4)  # (B, 4b, H/8, W/8)
    x = dec.up3(x, x3)  # (B, 2b, H/4, W/4)
    x = dec.up2(x, x2)  # (B, b, H/2, W/2)
    x = dec.up1(x, x1)  # (B, b, H, W) last decoder features
    z = dec.outc(x)  # (B, out_channels, H, W) logits
    return (z, x) if features else z


class UNet(nn.Module):
    """LViT's U-Net with a configurable base width; ``forward`` returns logits ``(B, out_channels, H, W)``.

    ``base`` is the stem width (the paper and LViT use 64); the encoder widths
    are ``base x (1, 2, 4, 8, 8)``. ``H`` and ``W`` must be multiples of 16
    (four 2x2 poolings); a clear error says so otherwise. ``prior`` (optional,
    in (0, 1)) sets the output bias to ``logit(prior)`` so a fresh network
    predicts a foreground probability of ``prior`` everywhere instead of 0.5
    (the focal-loss initialisation of Lin et al. 2017; see ``cfg.fg_prior``).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 1, base: int = 64,
                 prior: float | None = None) -> None:
        super().__init__()
        if base <= 0:
            raise ValueError(f"U-Net base width must be > 0, got {base}; set config key unet_base")
        b = base
        self.inc = _ConvBNReLU(in_channels, b)
        self.down1 = _Down(b, 2 * b)
        self.down2 = _Down(2 * b, 4 * b)
        self.down3 = _Down(4 * b, 8 * b)
        self.down4 = _Down(8 * b, 8 * b)
        self.up4 = _Up(16 * b, 4 * b)
        self.up3 = _Up(8 * b, 2 * b)
        self.up2 = _Up(4 * b, b)
        self.up1 = _Up(2 * b, b)
        self.outc = nn.Conv2d(b, out_channels, kernel_size=1)
        _set_prior(self.outc, prior)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's five feature maps ``[x1, .., x5]``, the skips of the up-path, finest first.

        Widths ``base x (1, 2, 4, 8, 8)`` at sides ``H / (1, 2, 4, 8, 16)``.
        """
        if x.shape[-1] % 16 or x.shape[-2] % 16:
            raise ValueError(f"U-Net input side {tuple(x.shape[-2:])} must be a multiple of 16; "
                             "set config key image_size to a multiple of 16")
        x1 = self.inc(x)  # (B, b, H, W)
        x2 = self.down1(x1)  # (B, 2b, H/2, W/2)
        x3 = self.down2(x2)  # (B, 4b, H/4, W/4)
        x4 = self.down3(x3)  # (B, 8b, H/8, W/8)
        x5 = self.down4(x4)  # (B, 8b, H/16, W/16)
        return [x1, x2, x3, x4, x5]

    def decode(self, feats: list[torch.Tensor], *, features: bool = False):
        """Logits ``(B, out_channels, H, W)`` from :meth:`encode`'s features; with ``features=True`` the pair
        ``(logits, last decoder features (B, base, H, W))``, the map the 1x1 output conv reads."""
        return _run_decoder(self, feats, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


class UNetDecoder(nn.Module):
    """A second up-path for :class:`UNet`'s encoder: the same blocks and widths, the up-sampling of choice.

    ``upsample`` in :data:`UPSAMPLING` (``"transpose"`` = the U-Net's own
    decoder). ``forward(feats)`` takes :meth:`UNet.encode`'s list and returns
    logits, or ``(logits, last features)`` with ``features=True``; ``prior``
    as in :class:`UNet`.
    """

    def __init__(self, out_channels: int = 1, base: int = 64, upsample: str = "transpose",
                 prior: float | None = None) -> None:
        super().__init__()
        if base <= 0:
            raise ValueError(f"decoder base width must be > 0, got {base}; set config key unet_base")
        b = base
        self.upsample = upsample
        self.up4 = _Up(16 * b, 4 * b, upsample)
        self.up3 = _Up(8 * b, 2 * b, upsample)
        self.up2 = _Up(4 * b, b, upsample)
        self.up1 = _Up(2 * b, b, upsample)
        self.outc = nn.Conv2d(b, out_channels, kernel_size=1)
        _set_prior(self.outc, prior)

    def forward(self, feats: list[torch.Tensor], *, features: bool = False):
        return _run_decoder(self, feats, features)


def build_unet(cfg: Config) -> UNet:
    """The Step-2 U-Net for ``cfg``: 3 input channels, one foreground logit, base width ``cfg.unet_base``.

    The output bias starts at ``logit(cfg.fg_prior)`` (``fg_prior = 0``: PyTorch's
    default initialisation, as in LViT). With the plain cross-entropy of Eq. 14
    and lesions covering a few per cent of the image, a network that starts at
    probability 0.5 spends its first epochs learning only that most pixels are
    background (demo profile, lr 3e-4: validation Dice 0.00 after 3 epochs; with
    the prior, 0.53).
    """
    return UNet(in_channels=3, out_channels=1, base=cfg.unet_base, prior=cfg.fg_prior or None)


def build_decoder(cfg: Config, upsample: str = "transpose") -> UNetDecoder:
    """An extra decoder for :func:`build_unet`'s encoder at ``cfg``: base ``cfg.unet_base``, one logit, the same
    output prior, up-sampling ``upsample``."""
    return UNetDecoder(out_channels=1, base=cfg.unet_base, upsample=upsample, prior=cfg.fg_prior or None)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters of ``model`` (what the paper's "Param (M)" column counts)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
