"""Gallery figures of the embedded data sets: images, masks and their reports (``figures/data_*.png``)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from ..config import Config
from ..paths import tagged
from ..plotting import save_figure
from .layout import LViTDataset
from .prepare import ensure_dataset, text_mode_for

__all__ = ["gallery_figure", "save_gallery"]


def gallery_figure(ds: LViTDataset, n: int = 6, seed: int = 0, *, title: str = "") -> "plt.Figure":
    """A 2 x ``n`` grid: each column one item, the image on top, the mask outlined in red below, the report as caption.

    Items are chosen reproducibly with ``seed`` among the items with a
    non-empty mask (so the outline is visible), in order of distinct reports
    first, so the gallery shows the variety of the grammar.
    """
    rng = np.random.default_rng(seed)
    order = [int(i) for i in rng.permutation(len(ds))]
    chosen, seen = [], set()
    for i in order:  # distinct reports first
        if ds.samples[i].text not in seen:
            seen.add(ds.samples[i].text)
            chosen.append(i)
        if len(chosen) == n:
            break
    chosen += [i for i in order if i not in chosen][: n - len(chosen)]
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 4.2), squeeze=False)
    for col, i in enumerate(chosen):
        item = ds[i]
        image = item["image"].permute(1, 2, 0).numpy()  # (H, W, 3)
        mask = item["mask"][0].numpy()  # (H, W)
        axes[0, col].imshow(image, vmin=0, vmax=1)
        axes[1, col].imshow(image, vmin=0, vmax=1)
        if mask.any():
            axes[1, col].contour(mask, levels=[0.5], colors="red", linewidths=0.8)
        head, _, tail = item["name"].rpartition("_b") if item["name"].count("_") > 2 else ("", "", item["name"])
        axes[0, col].set_title(f"{head}\nb{tail}" if head else tail, fontsize=6)
        axes[1, col].set_xlabel("\n".join(textwrap.wrap(item["text"], 28)), fontsize=6)
        for ax in axes[:, col]:
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def save_gallery(cfg: Config, split: str = "train", n: int = 6) -> Path:
    """Generate (if needed) the configured embedded set and write ``figures/data_<dataset>[_<profile>].png``."""
    root = ensure_dataset(cfg)
    ds = LViTDataset(root, split, 128, text_mode=text_mode_for(cfg.dataset))  # display size keeps the PNG small
    fig = gallery_figure(ds, n, cfg.seed, title=f"{cfg.dataset} ({split}, {len(ds)} images): image, mask outline, report")
    path = save_figure(fig, tagged(f"data_{cfg.dataset.replace('-', '_')}", cfg.profile))
    plt.close(fig)
    return path
