"""Where runs, results and checkpoints live, so notebooks find each other's outputs.

Checkpoints and executed notebooks go under ``runs/`` (ignored by git);
``results/`` and ``figures/`` hold what docs/ quotes. Outputs of any profile
other than ``demo`` carry the profile in their name (``*_smoke.json``), so a CI
or smoke run never overwrites the committed demo results.
"""
from __future__ import annotations

import os
from pathlib import Path

from .config import Config
from .utils import repo_root

__all__ = ["runs_dir", "results_dir", "tagged", "vlm_variant", "pretrain_dir", "ssmis_dir", "default_vlm_checkpoint",
           "PRETRAIN_RATIO", "pretrain_ratio"]

PRETRAIN_RATIO = 0.25  # a Step-2 run at share q reads a VLM pre-trained at min(q, 0.25): inside its labelled split


def pretrain_ratio(ratio: float) -> float:
    """The label share the Step-1 VLM of a Step-2 run at ``ratio`` is pre-trained at: ``min(ratio, 0.25)``.

    The VLM's mask supervision must only see images labelled in the Step-2
    run (the leakage guard of :func:`dusss.ssmis.train_ssmis` refuses any
    other), and the 25 % split lies inside every larger one, so one VLM
    serves 25 %, 50 % and 100 %; a smaller share gets its own.
    """
    return min(float(ratio), PRETRAIN_RATIO)


def runs_dir() -> Path:
    """``runs/`` of the checkout, or ``$DUSSS_RUNS``."""
    return Path(os.environ.get("DUSSS_RUNS", repo_root() / "runs"))


def results_dir() -> Path:
    """``results/`` of the checkout, or ``$DUSSS_RESULTS`` (tests point it to a tmp dir)."""
    return Path(os.environ.get("DUSSS_RESULTS", repo_root() / "results"))


def tagged(name: str, profile: str) -> str:
    """``name`` for the demo profile, ``name_<profile>`` for any other."""
    return name if profile == "demo" else f"{name}_{profile}"


def vlm_variant(cfg: Config) -> str:
    """Short name of the Step-1 loss switches, e.g. ``sss1-cmc1-imc1-tg1`` (DuSSS) or ``sss0-cmc1-imc0-tg0`` (CLIP)."""
    return f"sss{int(cfg.use_sss)}-cmc{int(cfg.use_cmc)}-imc{int(cfg.use_imc)}-tg{int(cfg.use_tg)}"


def pretrain_dir(cfg: Config) -> Path:
    """``out_dir`` if set, else ``runs/pretrain/<dataset>-<profile>/<variant>-s<seed>[-r<ratio>]``.

    The ``-r<ratio>`` suffix marks a VLM pre-trained below :data:`PRETRAIN_RATIO`.
    """
    if cfg.out_dir:
        return Path(cfg.out_dir)
    suffix = f"-r{cfg.ratio:g}" if cfg.ratio < PRETRAIN_RATIO else ""
    return runs_dir() / "pretrain" / f"{cfg.dataset}-{cfg.profile}" / f"{vlm_variant(cfg)}-s{cfg.seed}{suffix}"


def default_vlm_checkpoint(cfg: Config) -> Path:
    """``vlm_checkpoint`` if set, else ``vlm.pt`` in :func:`pretrain_dir` of the same settings (without out_dir)
    at the pre-training share of ``cfg.ratio`` (:func:`pretrain_ratio`)."""
    if cfg.vlm_checkpoint:
        return Path(cfg.vlm_checkpoint)
    return pretrain_dir(cfg.replace(out_dir="", ratio=pretrain_ratio(cfg.ratio))) / "vlm.pt"


def ssmis_dir(cfg: Config) -> Path:
    """``out_dir`` if set, else ``runs/ssmis/<dataset>-<profile>/<method>-r<ratio>-s<seed>``."""
    if cfg.out_dir:
        return Path(cfg.out_dir)
    return runs_dir() / "ssmis" / f"{cfg.dataset}-{cfg.profile}" / f"{cfg.method}-r{cfg.ratio:g}-s{cfg.seed}"
