"""Figure helpers: one style, one DPI, one place figures are written to."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt

from .utils import repo_root

__all__ = ["STYLE", "DPI", "save_figure", "figures_dir"]

DPI = 120
STYLE = {
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.grid": False,
    "image.cmap": "gray",
    "svg.hashsalt": "dusss",
}
plt.rcParams.update(STYLE)


def figures_dir() -> Path:
    """``figures/`` of the checkout, or ``$DUSSS_FIGURES`` when set (tests use a tmp dir)."""
    return Path(os.environ.get("DUSSS_FIGURES", repo_root() / "figures"))


def save_figure(fig: "plt.Figure", name: str, *, pdf: bool = False, directory: str | os.PathLike | None = None) -> Path:
    """Save ``fig`` as ``<figures>/<name>.png`` (and ``.pdf``) with no timestamps.

    The PNG carries no creation time and the PDF no CreationDate, so re-running
    a notebook with the same numbers leaves the file byte-identical in git.
    """
    out = Path(directory) if directory is not None else figures_dir()
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{name}.png"
    fig.savefig(png, bbox_inches="tight", metadata={"Software": None})
    if pdf:
        fig.savefig(out / f"{name}.pdf", bbox_inches="tight", metadata={"CreationDate": None, "Producer": None, "Creator": None})
    return png
