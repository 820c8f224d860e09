"""The roots runs and results hang from, so notebooks find each other's outputs.

Checkpoints and executed notebooks go under ``runs/`` (ignored by git);
``results/`` and ``figures/`` hold what docs/ quotes. Outputs of any profile
other than ``demo`` carry the profile in their name (``*_smoke.json``), so a CI
or smoke run never overwrites the committed demo results. How one run is named
inside these roots (its folder, results file and VLM) is :mod:`dusss.runs`.
"""
from __future__ import annotations

import os
from pathlib import Path

from .utils import repo_root

__all__ = ["runs_dir", "results_dir", "tagged"]


def runs_dir() -> Path:
    """``runs/`` of the checkout, or ``$DUSSS_RUNS``."""
    return Path(os.environ.get("DUSSS_RUNS", repo_root() / "runs"))


def results_dir() -> Path:
    """``results/`` of the checkout, or ``$DUSSS_RESULTS`` (tests point it to a tmp dir)."""
    return Path(os.environ.get("DUSSS_RESULTS", repo_root() / "results"))


def tagged(name: str, profile: str) -> str:
    """``name`` for the demo profile, ``name_<profile>`` for any other."""
    return name if profile == "demo" else f"{name}_{profile}"
