"""LViT (Li et al. 2024, IEEE TMI): the "Double-U" text-conditioned segmenter of Table 1's LViT row.

LViT-T is a U-shaped CNN (a U-Net whose skips pass through Pixel-Level
Attention Modules) beside a U-shaped ViT branch that reads the report, the
two merged at every scale. As in LViT's model (``nets/LViT.py`` of the
authors' repository), at base width ``C`` and image side ``S``:

- **CNN branch**: one conv-BN-ReLU to ``C`` channels, four max-pool + two
  conv-BN-ReLU blocks to ``2C, 4C, 8C, 8C``; four up blocks (nearest x2
  up-sampling, the skip re-weighted by a PLAM, concatenation, two conv-BN-ReLU)
  back to ``C``; a 1x1 conv to one logit.
- **Text**: the report's first ``text_len`` token states (LViT: 10 BERT
  word embeddings of 768; here the frozen MiniLM's, 384, encoded once and
  cached) pass through a chain of four 1-D convolutions (kernel 3 along the
  tokens) to widths ``8C, 4C, 2C, C``; the last enters the ViT at the first
  scale through a conv-BN-ReLU that maps the ``text_len`` tokens to the
  ``N`` patch tokens (LViT's ``CTBN3``), added to the patch embeddings.
- **ViT branch, down**: at scale ``k`` (width ``D = C·2^k``, patch ``p/2^k``,
  so every scale has the same ``N = (S/p)^2`` tokens) the CNN feature is
  patch-embedded (conv + learnt positions), goes through one transformer
  block, is halved in width by a conv-BN-ReLU over the channels and
  concatenated with the previous scale's tokens.
- **ViT branch, up**: from the deepest scale, one transformer block per scale,
  plus the deeper scale's output narrowed by a conv-BN-ReLU.
- **Merging**: each scale's up tokens are reshaped to a grid, up-sampled
  (nearest) by their patch size, passed through a 1x1 conv-BN-ReLU and added
  to the CNN feature of that scale before the CNN's decoder reads it.
- **PLAM**: per pixel, the channel mean and channel max of two ReLU'd 1x1
  convolutions and their sum go through a 3 -> 6 -> 1 MLP; its output scales
  the skip feature (LViT's ``PixLevelModule``, no sigmoid, as in its code).

LViT's code builds modules its forward never calls (the up-path ViTs' patch
embeddings and text convolutions, four spare PLAMs, a sigmoid branch in each
PLAM); they are not built here, so the parameter count holds what trains.
Images enter in [0, 1] as in LViT; the output is a logit map (LViT applies a
sigmoid; the project's losses read logits).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Config, ConfigError

__all__ = ["PLAM", "LViTStudent", "build_lvit", "TokenStates"]


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _ConvTokens(nn.Module):
    """LViT's ``ConvTransBN``: a kernel-3 1-D conv + BatchNorm + ReLU over the channel axis of ``(B, C_in, L)``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv1d(cin, cout, 3, padding=1), nn.BatchNorm1d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.norm(self.conv(x)))


class PLAM(nn.Module):
    """Pixel-Level Attention Module: ``x · MLP([mean_c relu(A x), max_c relu(M x), their sum])`` per pixel."""

    def __init__(self, channels: int, ratio: int = 2) -> None:
        super().__init__()
        self.conv_avg = nn.Conv2d(channels, channels, 1, bias=False)
        self.conv_max = nn.Conv2d(channels, channels, 1, bias=False)
        self.mlp = nn.Sequential(nn.Linear(3, 3 * ratio), nn.ReLU(inplace=True), nn.Linear(3 * ratio, 1))

    def forward(self, x: Tensor) -> Tensor:
        avg = F.relu(self.conv_avg(x)).mean(1, keepdim=True)  # (B, 1, H, W)
        mx = F.relu(self.conv_max(x)).amax(1, keepdim=True)  # (B, 1, H, W)
        stats = torch.cat([avg, mx, avg + mx], dim=1).permute(0, 2, 3, 1)  # (B, H, W, 3)
        return self.mlp(stats).permute(0, 3, 1, 2) * x  # (B, C, H, W)


class _Down(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(_conv_bn_relu(cin, cout), _conv_bn_relu(cout, cout))

    def forward(self, x: Tensor) -> Tensor:
        return self.convs(F.max_pool2d(x, 2))


class _Up(nn.Module):
    """Nearest x2 up-sampling, the skip re-weighted by a PLAM, concatenation, two conv-BN-ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.plam = PLAM(cin // 2)
        self.convs = nn.Sequential(_conv_bn_relu(cin, cout), _conv_bn_relu(cout, cout))

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.convs(torch.cat([self.plam(skip), F.interpolate(x, scale_factor=2.0, mode="nearest")], dim=1))


class _Block(nn.Module):
    """A pre-norm transformer block (LViT's: qkv bias, MLP ratio 4 with GELU after both linears, dropout 0.1)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d/heads)
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, d))
        h = self.drop(F.gelu(self.fc1(self.norm2(x))))
        return x + self.drop(F.gelu(self.fc2(h)))


class _Scale(nn.Module):
    """One scale of the ViT branch: patch embedding and block of the down path, block of the up path, the
    width-halving merge with the previous scale (down), the narrowing of the deeper scale (up), and the
    reconstruction that adds the up tokens to the CNN feature."""

    def __init__(self, dim: int, patch: int, tokens: int, heads: int, *, first: bool, last: bool,
                 text_len: int) -> None:
        super().__init__()
        self.patch, self.first, self.last = patch, first, last
        self.embed = nn.Conv2d(dim, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, tokens, dim))
        self.drop = nn.Dropout(0.1)
        self.down_block, self.up_block = _Block(dim, heads), _Block(dim, heads)
        self.text_in = _ConvTokens(text_len, tokens) if first else None  # text tokens -> patch tokens (CTBN3)
        self.halve = None if first else _ConvTokens(dim, dim // 2)  # CTBN
        self.narrow = None if last else _ConvTokens(2 * dim, dim)  # CTBN2
        self.rebuild = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.BatchNorm2d(dim), nn.ReLU(inplace=True))

    def down(self, feat: Tensor, previous: Tensor | None, text: Tensor | None) -> Tensor:
        """``(B, N, D)`` tokens of the CNN feature ``feat`` (B, D, H, W) (+ text at the first scale)."""
        x = self.drop(self.embed(feat).flatten(2).transpose(1, 2) + self.pos)  # (B, N, D)
        if self.first:
            x = x + self.text_in(text)  # (B, L, D) -> (B, N, D): tokens as channels
            return self.down_block(x)
        x = self.halve(self.down_block(x).transpose(1, 2)).transpose(1, 2)  # (B, N, D/2)
        return torch.cat([x, previous], dim=2)  # (B, N, D)

    def up(self, tokens: Tensor, deeper: Tensor | None) -> Tensor:
        x = self.up_block(tokens)  # (B, N, D)
        if self.last:
            return x
        return x + self.narrow(deeper.transpose(1, 2)).transpose(1, 2)  # (2D -> D)

    def reconstruct(self, tokens: Tensor) -> Tensor:
        b, n, d = tokens.shape
        side = int(round(n ** 0.5))
        grid = tokens.transpose(1, 2).reshape(b, d, side, side)  # (B, D, h, w)
        return self.rebuild(F.interpolate(grid, scale_factor=float(self.patch), mode="nearest"))  # (B, D, H, W)


class TokenStates:
    """The report's first ``length`` token states ``(length, H)`` from a frozen sentence encoder, cached per report.

    Tokenised to ``length`` tokens ([CLS] and the first words; padded with zeros),
    as LViT keeps the first 10 word embeddings of each report.
    """

    def __init__(self, encoder, length: int) -> None:
        self.encoder, self.length = encoder, length
        self._cache: dict[str, Tensor] = {}

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> Tensor:
        new = sorted({t for t in texts if t not in self._cache})
        if new:
            enc = self.encoder
            device = next(enc.backbone.parameters()).device
            tok = enc.tokenizer(new, padding="max_length", truncation=True, max_length=self.length,
                                return_tensors="pt").to(device)
            hidden = enc.backbone(**tok).last_hidden_state  # (n, length, H)
            hidden = hidden * tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # padding -> 0
            for text, states in zip(new, hidden.float().cpu()):
                self._cache[text] = states
        return torch.stack([self._cache[t] for t in texts])  # (B, length, H)


@functools.lru_cache(maxsize=4)
def _token_states(encoder, length: int) -> TokenStates:
    """One token-state cache per (shared, frozen) encoder and length."""
    return TokenStates(encoder, length)


class LViTStudent(nn.Module):
    """LViT-T over an image and its report (module docstring).

    ``forward(x (B, 3, S, S) in [0, 1], texts: B strings) -> (B, 1, S, S)`` logits;
    ``S`` must be the ``image_size`` it was built for (the text-to-patch map has
    a fixed token count, as in LViT). ``text_encoder`` is the frozen
    :class:`dusss.vlm.TextEncoder` (shared, held outside the module's parameters
    and state, never saved); :meth:`sentence_embedding` gives its pooled report
    vectors, which the LV loss compares.
    """

    needs_text = True

    def __init__(self, text_encoder, image_size: int = 224, base: int = 64, patch: int = 16, heads: int = 8, *,
                 text_len: int = 10, prior: float | None = None) -> None:
        super().__init__()
        self.image_size, tokens = image_size, (image_size // patch) ** 2
        object.__setattr__(self, "_text", text_encoder)  # a plain attribute: frozen, shared, never saved
        object.__setattr__(self, "_tokens", _token_states(text_encoder, text_len))
        widths = [base, 2 * base, 4 * base, 8 * base]
        hidden = self._text.hidden_size
        self.text_convs = nn.ModuleList(nn.Conv1d(cin, cout, 3, padding=1)  # 8C, 4C, 2C, C
                                        for cin, cout in zip([hidden] + widths[::-1][:-1], widths[::-1]))
        self.inc = _conv_bn_relu(3, base)
        self.downs = nn.ModuleList(_Down(cin, cout) for cin, cout in zip(widths, widths[1:] + [8 * base]))
        self.scales = nn.ModuleList(_Scale(w, patch >> k, tokens, heads, first=k == 0, last=k == 3, text_len=text_len)
                                    for k, w in enumerate(widths))
        self.ups = nn.ModuleList(_Up(2 * w, cout) for w, cout in zip(widths[::-1], [4 * base, 2 * base, base, base]))
        self.outc = nn.Conv2d(base, 1, 1)
        if prior is not None:  # output bias = logit(prior), as the U-Net's fg_prior
            with torch.no_grad():
                self.outc.bias.fill_(math.log(prior / (1.0 - prior)))

    def sentence_embedding(self, texts: Sequence[str]) -> Tensor:
        """Pooled frozen-encoder vectors ``(B, H)`` of the reports (cached), on the model's device."""
        return self._text(list(texts)).to(self.outc.weight.device)

    def forward(self, x: Tensor, texts: Sequence[str]) -> Tensor:
        if texts is None or isinstance(texts, str) or len(texts) != len(x):
            got = "none" if texts is None else ("one string" if isinstance(texts, str) else f"{len(texts)}")
            raise ValueError(f"LViTStudent reads one report per image: got {got} for {len(x)} images; call "
                             "model(x, texts) with a list of strings as long as the batch")
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"LViTStudent was built for {self.image_size} px images, got {tuple(x.shape[-2:])}; "
                             "resize the images or build it with that image_size")
        t = self._tokens(texts).to(x.device, self.outc.weight.dtype).transpose(1, 2)  # (B, H, L)
        for conv in self.text_convs:  # LViT's chain H -> 8C -> 4C -> 2C -> C; only the last enters the ViT
            t = conv(t)  # (B, width, L)
        text_first = t.transpose(1, 2)  # (B, L, C): the tokens as channels, as _ConvTokens reads them
        feats = [self.inc(x)]  # (B, C, S, S)
        for down in self.downs:
            feats.append(down(feats[-1]))  # 2C, 4C, 8C at S/2..S/8; 8C at S/16
        tokens, prev = [], None
        for k, scale in enumerate(self.scales):
            prev = scale.down(feats[k], prev, text_first if k == 0 else None)  # (B, N, C·2^k)
            tokens.append(prev)
        deeper = None
        for k in range(3, -1, -1):
            deeper = self.scales[k].up(tokens[k], deeper)
            feats[k] = feats[k] + self.scales[k].reconstruct(deeper)  # CNN-ViT merging
        y = feats[4]
        for up, skip in zip(self.ups, feats[3::-1]):
            y = up(y, skip)
        return self.outc(y)  # (B, 1, S, S)


def build_lvit(cfg: Config, text_encoder) -> LViTStudent:
    """The LViT row's student at ``cfg``: base width ``lvit_base``, first-scale patch ``lvit_patch``, attention
    heads ``lvit_heads``, report tokens ``lvit_text_len``, output prior ``fg_prior``, reading the frozen
    ``text_encoder`` (:func:`dusss.textseg.build_lvit` passes the cached one of ``text_model``)."""
    if cfg.lvit_patch % 8 or cfg.image_size % cfg.lvit_patch or cfg.image_size % 16:
        raise ConfigError(f"config key 'lvit_patch' = {cfg.lvit_patch} must be a multiple of 8 that divides "
                          f"image_size = {cfg.image_size} (LViT: 16 at 224 px; four scales halve it), and image_size "
                          "a multiple of 16")
    if cfg.lvit_base % cfg.lvit_heads:
        raise ConfigError(f"config key 'lvit_base' = {cfg.lvit_base} must be divisible by lvit_heads = "
                          f"{cfg.lvit_heads}")
    return LViTStudent(text_encoder, cfg.image_size, cfg.lvit_base, cfg.lvit_patch, cfg.lvit_heads,
                       text_len=cfg.lvit_text_len, prior=cfg.fg_prior or None)
