"""Labelled/unlabelled splits: deterministic, nested across ratios, saved as JSON under ``splits/``.

The labelled subset for ratio ``r`` and seed ``s`` is the first
``max(1, round(r * n))`` names of one seeded permutation of the sorted names,
so the 25 % subset of a seed is always inside its 50 % subset, and the split
does not depend on the order in which files were listed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..paths import tagged
from ..utils import atomic_write_json, repo_root
from .layout import DataError

__all__ = ["split_labelled", "split_path", "save_split", "load_split", "split_for", "splits_dir"]


def splits_dir() -> Path:
    """``splits/`` of the checkout, or ``$DUSSS_SPLITS`` (tests point it to a tmp dir)."""
    return Path(os.environ.get("DUSSS_SPLITS", repo_root() / "splits"))


def split_labelled(names: Sequence[str], ratio: float, seed: int) -> tuple[list[str], list[str]]:
    """``(labelled, unlabelled)`` names for a labelled share ``ratio`` in (0, 1], reproducible from ``seed``.

    At least one image is labelled; both lists keep the sorted order of the
    names. Raises ``DataError`` for a ratio outside (0, 1], an empty name list
    or duplicate names.
    """
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.0 < float(ratio) <= 1.0:
        raise DataError(f"labelled ratio {ratio!r} must be a number in (0, 1], e.g. 0.25 for 25 % labels")
    ordered = sorted(names)
    if not ordered:
        raise DataError("split_labelled got no image names; is the training folder empty?")
    if len(set(ordered)) != len(ordered):
        dup = next(a for a, b in zip(ordered, ordered[1:]) if a == b)
        raise DataError(f"image name {dup!r} occurs twice; names must be unique to split them")
    n_lab = max(1, int(round(float(ratio) * len(ordered))))
    perm = np.random.default_rng(int(seed)).permutation(len(ordered))
    chosen = set(perm[:n_lab].tolist())
    labelled = [n for i, n in enumerate(ordered) if i in chosen]
    unlabelled = [n for i, n in enumerate(ordered) if i not in chosen]
    return labelled, unlabelled


def split_path(dataset: str, ratio: float, seed: int, directory: str | os.PathLike | None = None) -> Path:
    """``splits/<dataset>_r<ratio>_s<seed>.json`` (ratio written like ``0.25``)."""
    base = Path(directory) if directory is not None else splits_dir()
    return base / f"{dataset}_r{float(ratio):g}_s{int(seed)}.json"


def save_split(dataset: str, names: Sequence[str], ratio: float, seed: int,
               directory: str | os.PathLike | None = None) -> Path:
    """Compute :func:`split_labelled` and write it with its inputs to :func:`split_path`; return the path."""
    labelled, unlabelled = split_labelled(names, ratio, seed)
    path = split_path(dataset, ratio, seed, directory)
    atomic_write_json(path, {"dataset": dataset, "ratio": float(ratio), "seed": int(seed),
                             "n_train": len(labelled) + len(unlabelled), "labelled": labelled, "unlabelled": unlabelled})
    return path


def load_split(dataset: str, ratio: float, seed: int, directory: str | os.PathLike | None = None,
               names: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """``(labelled, unlabelled)`` from the saved split file; with ``names``, check it matches the data set.

    A missing file raises ``DataError`` saying how to create it
    (:func:`save_split`); a file whose names differ from ``names`` (another
    version of the data) raises instead of silently training on a wrong split.
    """
    path = split_path(dataset, ratio, seed, directory)
    if not path.is_file():
        raise DataError(f"split file {path} does not exist; create it with dusss.data.save_split({dataset!r}, names, "
                        f"{ratio}, {seed})")
    try:
        data = json.loads(path.read_text())
        old = "labelled" not in data  # files written before the keys took the project's spelling
        labelled, unlabelled = list(data["labeled" if old else "labelled"]), list(data["unlabeled" if old else "unlabelled"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"split file {path} is not a valid split ({exc}); delete it and run save_split again") from exc
    if names is not None and sorted(labelled + unlabelled) != sorted(names):
        raise DataError(f"split file {path} lists {len(labelled) + len(unlabelled)} names that differ from the "
                        f"{len(names)} training images; regenerate it with save_split for this data")
    return labelled, unlabelled


def split_for(cfg, names: Sequence[str]) -> tuple[list[str], list[str]]:
    """The labelled/unlabelled split a run of ``cfg`` uses for the training ``names``.

    The committed file ``splits/<dataset>[_<profile>]_r<ratio>_s<seed>.json``
    (``seed`` = ``cfg.resolved_data_seed()``)
    when it exists (checked against ``names``: a mismatch raises, never a
    silent re-split), else :func:`split_labelled` computed on the spot -- the
    same result, since the split is a function of the names, ratio and seed.
    Nothing is written here; ``save_split`` publishes a split.
    """
    key = tagged(cfg.dataset, cfg.profile)
    seed = cfg.resolved_data_seed()
    if split_path(key, cfg.ratio, seed).is_file():
        return load_split(key, cfg.ratio, seed, names=names)
    return split_labelled(names, cfg.ratio, seed)
