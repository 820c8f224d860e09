"""Activation maps of the VLM under lexical ambiguity (Fig. 5) and the qualitative comparison (Fig. 4), measured.

Fig. 5 of the paper shows, for one image and several reports that mean the
same thing in different words, where the image encoder "looks" when the
image-text similarity is explained; DuSSS's maps stay put, a CLIP-style VLM's
wander. This module computes those maps with the ``pytorch_grad_cam`` library
and turns the pictures into numbers over a whole split:

- **maps**: :func:`activation_maps` explains the cosine similarity ``s_I . s_T``
  between the image embedding and a given report's embedding (the target
  :class:`ReportSimilarityTarget`) with respect to the tokens of the last ViT
  block (:func:`cam_target_layer`, reshaped to a grid by
  :func:`vit_reshape_transform`). Methods: ``gradcam`` and ``gradcam++`` (both
  depend on the report through its gradient) and ``eigencam`` (the first
  principal component of the activations: it never sees the report, so it is
  the text-free reference whose stability is 1 by construction).
- **stability** across paraphrases of one report: mean pairwise Pearson
  correlation (:func:`pairwise_correlation`) and mean pairwise IoU of the maps
  thresholded at half their range (:func:`pairwise_iou`).
- **localisation**: share of the activation inside the ground-truth mask
  (:func:`activation_share`) and the pointing game (the arg-max inside the mask,
  :func:`dusss.pretrain.pointing_game`).

For Fig. 4, :func:`select_by_quantiles` picks the test images by a fixed
rule, :func:`predict_masks` segments them and :func:`plot_qualitative_grid`
draws them. Which models Fig. 4 compares and which VLMs Fig. 5 explains (and
training them when missing) is the harness's: :mod:`dusss.experiments.figures`.
"""
from __future__ import annotations

import itertools
import math
import textwrap
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import paraphrase
from .metrics import binarize
from .pretrain import pointing_game
from .utils import get_logger

__all__ = [
    "CAM_METHODS", "TEXT_FREE_METHODS", "ImageEmbedder", "ReportSimilarityTarget", "vit_reshape_transform",
    "cam_target_layer", "activation_maps", "pairwise_correlation", "pairwise_iou", "activation_share",
    "reports_for", "measure_maps", "summarize_measures", "paired_difference", "select_by_quantiles", "predict_masks",
    "plot_paraphrase_maps", "plot_stability", "plot_qualitative_grid",
]

log = get_logger(__name__)

TEXT_FREE_METHODS = ("eigencam",)  # methods whose map does not depend on the report


def _cam_classes() -> dict[str, type]:
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus

    return {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "eigencam": EigenCAM}


CAM_METHODS = ("gradcam", "gradcam++", "eigencam")  # names accepted by activation_maps


# ---------------------------------------------------------------- maps
class ImageEmbedder(nn.Module):
    """The image side of a DuSSS VLM as a plain network for ``pytorch_grad_cam``: images -> unit embedding ``s``.

    ``forward`` takes ``(B, 3, H, W)`` images in [0, 1] and returns the image
    embeddings ``(B, E)``. A VLM from :func:`dusss.vlm.load_vlm` has every
    parameter frozen, so the input is made to require a gradient: that gives
    Grad-CAM a graph to send the similarity's gradient back through, without
    unfreezing (or changing) a single weight.
    """

    def __init__(self, vlm: nn.Module) -> None:
        super().__init__()
        self.vlm = vlm

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.detach().requires_grad_(True)
        emb, _ = self.vlm.encode_image(images, ground=False)
        return emb.s  # (B, E)


class ReportSimilarityTarget:
    """Grad-CAM target: the cosine similarity of one image's embedding with one report's embedding.

    ``text_s`` is the report's unit embedding ``(E,)``; called on the image's
    embedding ``(E,)`` (``pytorch_grad_cam`` passes one output row per image)
    it returns the scalar ``s_I . s_T`` -- the ``sim`` of Eq. 5 that both the
    CLIP-style model and DuSSS are trained to raise for matching pairs.
    """

    def __init__(self, text_s: torch.Tensor) -> None:
        self.text_s = text_s.detach()

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return (output * self.text_s.to(output.device)).sum(-1)


def vit_reshape_transform(grid: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``reshape_transform`` turning ViT tokens ``(B, 1 + h*w, W)`` into a map ``(B, W, h, w)``.

    The [CLS] token is dropped and the patch tokens are laid out on the
    ``grid = (h, w)`` they came from, so the library can weight channels and
    upsample the map to the image. A token count that does not match the grid
    raises, naming both.
    """
    h, w = grid

    def transform(tokens: torch.Tensor) -> torch.Tensor:
        if isinstance(tokens, tuple):
            tokens = tokens[0]
        if tokens.shape[1] != 1 + h * w:
            raise ValueError(f"ViT output has {tokens.shape[1]} tokens, expected 1 + {h}*{w} for the grid {grid}; "
                             "pass the grid of image_size // vit_patch")
        return tokens[:, 1:].reshape(tokens.shape[0], h, w, tokens.shape[2]).permute(0, 3, 1, 2)  # (B, W, h, w)

    return transform


def cam_target_layer(vlm: nn.Module) -> nn.Module:
    """The layer whose activations the maps weight: the input LayerNorm of the last ViT block.

    Its output still has one token per patch, and the block after it mixes
    the patches into [CLS] by attention, so the similarity has a gradient at
    every token (the final LayerNorm would reach [CLS] only through the layout
    summary); this is the ``blocks[-1].norm1`` choice of the library's ViT
    tutorial.
    """
    vit = vlm.image_encoder.vit
    blocks = vit.layers if hasattr(vit, "layers") else vit.encoder.layer  # transformers >= 5 / older
    return blocks[-1].layernorm_before


def activation_maps(vlm: nn.Module, images: torch.Tensor, texts: Sequence[str], method: str = "gradcam"
                    ) -> torch.Tensor:
    """Activation maps ``(B, H, W)`` in [0, 1] of ``images`` ``(B, 3, H, W)`` for the similarity with ``texts``.

    ``texts[i]`` is the report explained for image ``i``; ``method`` is one of
    :data:`CAM_METHODS`. Each map is min-max scaled by the library (an
    all-zero map stays zero: nothing in the image moves the similarity). The
    images go to the VLM's device; the maps come back on the images' device.
    """
    classes = _cam_classes()
    if method not in classes:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {CAM_METHODS}")
    if len(texts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(texts)} reports; pass one report per image")
    device = next(vlm.parameters()).device
    with torch.no_grad():
        text_s = vlm.encode_text(list(texts))[0].s  # (B, E)
    patch = vlm.cfg.vit_patch
    grid = (images.shape[-2] // patch, images.shape[-1] // patch)
    targets = [ReportSimilarityTarget(t) for t in text_s]
    with classes[method](model=ImageEmbedder(vlm), target_layers=[cam_target_layer(vlm)],
                         reshape_transform=vit_reshape_transform(grid)) as cam:
        maps = cam(input_tensor=images.to(device), targets=targets)  # (B, H, W) numpy
    return torch.from_numpy(np.ascontiguousarray(maps)).to(images.device)


# ---------------------------------------------------------------- measures
def pairwise_correlation(maps: torch.Tensor) -> float:
    """Mean Pearson correlation over all pairs of ``maps`` ``(K, H, W)`` (one image, K reports).

    Pairs involving a flat map (zero variance: correlation undefined) are left
    out; NaN when no pair is left.
    """
    flat = maps.flatten(1).double()  # (K, HW)
    centred = flat - flat.mean(1, keepdim=True)
    norm = centred.norm(dim=1)  # (K,)
    values = [float(centred[i] @ centred[j] / (norm[i] * norm[j]))
              for i, j in itertools.combinations(range(len(flat)), 2) if norm[i] > 1e-12 and norm[j] > 1e-12]
    return float(np.mean(values)) if values else math.nan


def pairwise_iou(maps: torch.Tensor, threshold: float = 0.5) -> float:
    """Mean IoU over all pairs of ``maps`` ``(K, H, W)`` thresholded at ``threshold`` of each map's own range.

    Each map is rescaled to [0, 1] first (the library's maps already are), so
    "> 0.5" means "in the upper half of this map's activation". Pairs where
    both regions are empty are left out; NaN when no pair is left.
    """
    flat = maps.flatten(1).double()  # (K, HW)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    on = ((flat - lo) / (hi - lo).clamp_min(1e-12)) > threshold  # (K, HW)
    on &= (hi - lo) > 1e-12  # a flat map has no upper half
    values = []
    for i, j in itertools.combinations(range(len(on)), 2):
        union = (on[i] | on[j]).sum()
        if union > 0:
            values.append(float((on[i] & on[j]).sum() / union))
    return float(np.mean(values)) if values else math.nan


def activation_share(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of each map's activation that lies inside its ground-truth mask: ``(B,)`` in [0, 1].

    ``maps`` ``(B, H, W)`` are non-negative, ``masks`` ``(B, 1, H, W)`` or
    ``(B, H, W)`` count as foreground above 0.5. NaN for an all-zero map or an
    empty mask (nothing to share).
    """
    m = maps.flatten(1).double()  # (B, HW)
    y = (masks.reshape(m.shape) > 0.5).double()  # (B, HW)
    total = m.sum(1)
    share = (m * y).sum(1) / total.clamp_min(1e-12)
    nan = torch.full_like(share, math.nan)
    return torch.where((total > 0) & (y.sum(1) > 0), share, nan)


def reports_for(text: str, n_paraphrases: int, seed: int) -> list[str]:
    """The report itself followed by ``n_paraphrases`` of it from :func:`dusss.data.paraphrase` (same seed, same list)."""
    return [text] + list(paraphrase(text, n_paraphrases, seed))


def measure_maps(vlm: nn.Module, dataset, *, n_paraphrases: int = 4, methods: Sequence[str] = CAM_METHODS,
                 seed: int = 666, batch_size: int = 25, iou_threshold: float = 0.5, progress: bool = True):
    """Stability and localisation of the VLM's maps over every image of ``dataset``: a per-image DataFrame.

    For each image its report and ``n_paraphrases`` paraphrases
    (:func:`reports_for`) are explained with each CAM method (a text-free
    one, :data:`TEXT_FREE_METHODS`, once per image). Columns:
    ``name``, ``method``, ``corr`` (:func:`pairwise_correlation` of the
    K = n + 1 maps), ``iou`` (:func:`pairwise_iou`), ``share`` (mean
    :func:`activation_share` over the K maps), ``pointing`` (mean pointing-game
    hit over the K maps; NaN for an image without lesion), ``flat`` (share of
    the K maps that are all zero: the similarity's gradient left nothing after
    the ReLU; they are left out of ``share`` and ``pointing``) and ``gt_pixels``.
    """
    rows: list[dict[str, Any]] = []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in tqdm(loader, desc="activation maps", disable=not progress, leave=False):
        images, masks = batch["image"], batch["mask"]  # (B, 3, H, W), (B, 1, H, W)
        reports = [reports_for(t, n_paraphrases, seed) for t in batch["text"]]
        for method in methods:
            if method in TEXT_FREE_METHODS:  # the same map for every report: computed once, repeated
                maps = activation_maps(vlm, images, [r[0] for r in reports], method)
                maps = maps.unsqueeze(1).expand(-1, n_paraphrases + 1, -1, -1)  # (B, K, H, W)
            else:
                maps = torch.stack([activation_maps(vlm, images, [r[k] for r in reports], method)
                                    for k in range(n_paraphrases + 1)], 1)  # (B, K, H, W)
            shares = torch.stack([activation_share(maps[:, k], masks) for k in range(maps.shape[1])], 1)  # (B, K)
            hits = torch.stack([pointing_game(maps[:, k:k + 1], masks) for k in range(maps.shape[1])], 1)  # (B, K)
            flat = maps.flatten(2).amax(2) <= 0  # (B, K): ReLU left nothing; its arg-max would be pixel 0
            hits = torch.where(flat, torch.full_like(hits, math.nan), hits)
            for i, name in enumerate(batch["name"]):
                rows.append({"name": name, "method": method, "corr": pairwise_correlation(maps[i]),
                             "iou": pairwise_iou(maps[i], iou_threshold), "share": _nanmean(shares[i]),
                             "pointing": _nanmean(hits[i]), "flat": float(flat[i].float().mean()),
                             "gt_pixels": int((masks[i] > 0.5).sum())})
    return pd.DataFrame(rows, columns=["name", "method", "corr", "iou", "share", "pointing", "flat", "gt_pixels"])


def _nanmean(x: torch.Tensor) -> float:
    keep = x[~torch.isnan(x)]
    return float(keep.mean()) if keep.numel() else math.nan


def summarize_measures(tables: Mapping[str, Any]):
    """One row per (model, method): mean and standard deviation of each measure and the images counted.

    ``tables`` maps a model label (``"DuSSS"``, ``"CLIP"``) to a
    :func:`measure_maps` table; NaN entries (flat maps, images without
    lesion) are left out of each mean and the count ``n_<measure>`` says how
    many remained.
    """
    rows = []
    for model, table in tables.items():
        for method, group in table.groupby("method", sort=False):
            row: dict[str, Any] = {"model": model, "method": method, "images": len(group)}
            row["flat"] = float(group["flat"].mean())
            for col in ("corr", "iou", "share", "pointing"):
                row[col] = float(group[col].mean())
                row[f"{col}_std"] = float(group[col].std())
                row[f"n_{col}"] = int(group[col].notna().sum())
            rows.append(row)
    return pd.DataFrame(rows)


def paired_difference(a, b, column: str, method: str, *, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """``a - b`` of one measure on the images both tables scored, with a bootstrap 95 % interval and a Wilcoxon p.

    ``a`` and ``b`` are :func:`measure_maps` tables of two models on the same
    split; images are paired by name for ``method`` and pairs with a NaN are
    dropped. Returns ``mean_diff``, ``ci_low``, ``ci_high`` (percentile
    bootstrap over images), ``p_wilcoxon`` (two-sided signed-rank; NaN when
    every difference is zero) and ``n``.
    """
    from scipy.stats import wilcoxon

    left = a[a["method"] == method].set_index("name")[column]
    right = b[b["method"] == method].set_index("name")[column]
    diff = (left - right.reindex(left.index)).dropna().to_numpy()
    if diff.size == 0:
        return {"mean_diff": math.nan, "ci_low": math.nan, "ci_high": math.nan, "p_wilcoxon": math.nan, "n": 0}
    rng = np.random.default_rng(seed)
    boot = diff[rng.integers(0, diff.size, (n_boot, diff.size))].mean(1)
    p = float(wilcoxon(diff).pvalue) if np.any(diff != 0) else math.nan
    return {"mean_diff": float(diff.mean()), "ci_low": float(np.quantile(boot, 0.025)),
            "ci_high": float(np.quantile(boot, 0.975)), "p_wilcoxon": p, "n": int(diff.size)}


# ---------------------------------------------------------------- Fig. 4 images
def select_by_quantiles(scores, quantiles: Sequence[float] = (0.125, 0.375, 0.625, 0.875)) -> list[str]:
    """Names of the images whose score is nearest each quantile of ``scores`` (a name-indexed Series): one per quartile.

    The default quantiles are the middles of the four quartiles, so the grid
    shows a typical image from each quarter of the distribution, not the best
    ones. Each image is picked at most once (the next nearest is taken), in
    quantile order.
    """
    s = scores.dropna()
    if len(s) < len(quantiles):
        raise ValueError(f"only {len(s)} scored images for {len(quantiles)} quantiles; use fewer quantiles")
    chosen: list[str] = []
    for q in quantiles:
        order = (s - s.quantile(q)).abs().sort_values(kind="stable").index
        chosen.append(next(n for n in order if n not in chosen))
    return chosen


@torch.no_grad()
def predict_masks(models: Mapping[str, nn.Module], images: torch.Tensor, threshold: float = 0.5) -> dict[str, torch.Tensor]:
    """Binary predictions ``(B, 1, H, W)`` of each segmentation model (logits out) on ``images``, label -> mask."""
    out = {}
    for label, model in models.items():
        device = next(model.parameters()).device
        out[label] = binarize(model.eval()(images.to(device)), threshold).to(images.device)
    return out


# ---------------------------------------------------------------- figures
def _show(ax, image: torch.Tensor, title: str = "") -> None:
    ax.imshow(image.permute(1, 2, 0).clamp(0, 1).cpu().numpy())
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def _contour(ax, mask: torch.Tensor, color: str) -> None:
    m = (mask.squeeze().cpu().numpy() > 0.5).astype(float)
    if m.any():
        ax.contour(m, levels=[0.5], colors=color, linewidths=0.8)


def plot_paraphrase_maps(image: torch.Tensor, mask: torch.Tensor, reports: Sequence[str],
                         maps: Mapping[str, torch.Tensor], *, wrap: int = 26):
    """Fig. 5: one row per model; the image, then its map for each report, the ground truth outlined on each.

    ``image`` ``(3, H, W)``, ``mask`` ``(1, H, W)``, ``maps`` label ->
    ``(K, H, W)`` for the K ``reports`` (column titles). The maps are drawn on
    their own (not over the image), which keeps them readable and the PNG
    small; the row label gives that row's pairwise correlation.
    """
    import matplotlib.pyplot as plt

    k = len(reports)
    levels = plt.get_cmap("magma", 10)  # ten bands: as readable as a smooth ramp, a fraction of the PNG size
    fig, axes = plt.subplots(len(maps), k + 1, figsize=(1.25 * (k + 1), 1.3 * len(maps) + 0.7), squeeze=False)
    for r, (label, m) in enumerate(maps.items()):
        _show(axes[r, 0], image, "image" if r == 0 else "")
        _contour(axes[r, 0], mask, "lime")
        axes[r, 0].set_ylabel(f"{label}\ncorr {pairwise_correlation(m):.2f}", fontsize=7)
        for j in range(k):
            ax = axes[r, j + 1]
            ax.imshow(m[j].cpu().numpy(), cmap=levels, vmin=0, vmax=1)
            _contour(ax, mask, "cyan")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(textwrap.fill(reports[j], wrap), fontsize=5)
    fig.tight_layout()
    return fig


def plot_stability(tables: Mapping[str, Any], method: str = "gradcam"):
    """Box plots of the four measures per model for one CAM method (the measured counterpart of Fig. 5)."""
    import matplotlib.pyplot as plt

    cols = [("corr", "stability: pairwise corr."), ("iou", "stability: pairwise IoU"),
            ("share", "activation inside GT"), ("pointing", "pointing game")]
    fig, axes = plt.subplots(1, len(cols), figsize=(2.2 * len(cols), 2.4))
    labels = list(tables)
    for ax, (col, title) in zip(axes, cols):
        data = [t.loc[t["method"] == method, col].dropna().to_numpy() for t in tables.values()]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(labels) + 1), labels)
        ax.set_title(title, fontsize=8)
        ax.set_ylim(-0.05 if col != "corr" else -1.05, 1.05)
    fig.suptitle(f"{method}: maps over paraphrased reports", fontsize=9)
    fig.tight_layout()
    return fig


def plot_qualitative_grid(images: torch.Tensor, masks: torch.Tensor, preds: Mapping[str, torch.Tensor],
                          dice: Mapping[str, Sequence[float]], *, title: str = ""):
    """Fig. 4: one row per image; columns image, ground truth, then each model's prediction with its Dice.

    ``images`` ``(N, 3, H, W)``, ``masks`` ``(N, 1, H, W)``, ``preds`` label ->
    ``(N, 1, H, W)`` binary, ``dice`` label -> N per-image Dice values. The
    ground truth is outlined on every prediction panel.
    """
    import matplotlib.pyplot as plt

    n, cols = images.shape[0], 2 + len(preds)
    fig, axes = plt.subplots(n, cols, figsize=(1.45 * cols, 1.5 * n + 0.3), squeeze=False)
    for i in range(n):
        _show(axes[i, 0], images[i], "image" if i == 0 else "")
        _show(axes[i, 1], masks[i].expand(3, -1, -1).float(), "ground truth" if i == 0 else "")
        for j, (label, p) in enumerate(preds.items(), start=2):
            ax = axes[i, j]
            _show(ax, p[i].expand(3, -1, -1).float())
            _contour(ax, masks[i], "red")
            ax.set_title(f"{label}" if i == 0 else "", fontsize=7)
            ax.set_xlabel(f"Dice {dice[label][i]:.2f}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
