"""Where a configured data set comes from: generate the embedded ones, check the real ones.

:func:`ensure_dataset` is what every run calls first. For the embedded sets
(``qata-synth``, ``nuclei-real``) it generates the folder when it is missing or
was made with other settings; generation happens in a temporary sibling folder
under a file lock and the finished folder (its completion marker written last)
is moved into place, so an interrupted or concurrent generation never leaves a
half-written set behind. For real data sets it only checks that the folder is
there and says which ``prepare`` command makes it.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from ..config import Config
from ..utils import atomic_write_json, get_logger
from .layout import SPLITS, DataError, LViTDataset

__all__ = ["EMBEDDED", "REAL", "MARKER", "TEXT_MODES", "ensure_dataset", "text_mode_for", "open_split", "default_augment"]

log = get_logger("dusss.data")
MARKER = ".dusss_complete.json"  # written last into a generated folder
EMBEDDED = ("qata-synth", "nuclei-real")
REAL = ("qata", "monuseg", "bmseg", "lvit")
TEXT_MODES = {"qata-synth": "qata", "qata": "qata", "nuclei-real": "monuseg", "monuseg": "monuseg",
              "bmseg": "bmseg", "lvit": "none"}
_HOW = {
    "qata": "python -m dusss data prepare-qata <QaTa-COV19-v2 folder> --text-dir <LViT text folder> --data-root {root}",
    "bmseg": "python -m dusss data prepare-bmseg <BM-Seg folder> --data-root {root}",
    "monuseg": "download LViT's MoNuSeg folder (already in the LViT layout) to {root}, or set data_root / $DUSSS_DATA",
    "lvit": "put your data in the LViT layout at {root} (README 'Your own data') or set data_root",
}


def text_mode_for(dataset: str) -> str:
    """The report grammar of a data set name (``qata``, ``monuseg``, ``bmseg`` or ``none`` for own data)."""
    if dataset not in TEXT_MODES:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {sorted(TEXT_MODES)}")
    return TEXT_MODES[dataset]


def _generation_params(cfg: Config) -> dict:
    from .synth import SYNTH_VERSION

    if cfg.dataset == "qata-synth":
        return {"dataset": cfg.dataset, "version": SYNTH_VERSION, "seed": cfg.seed, "train": cfg.synth_train,
                "val": cfg.synth_val, "test": cfg.synth_test, "size": cfg.synth_size}
    from .nuclei import NUCLEI_VERSION

    return {"dataset": cfg.dataset, "version": NUCLEI_VERSION, "seed": cfg.seed, "patch": cfg.nuclei_patch}


def _generate(cfg: Config, folder: Path) -> dict:
    if cfg.dataset == "qata-synth":
        from .synth import generate_qata_synth

        return generate_qata_synth(folder, cfg.synth_train, cfg.synth_val, cfg.synth_test, cfg.synth_size, cfg.seed)
    from .nuclei import generate_nuclei_real

    return generate_nuclei_real(folder, cfg.nuclei_patch, cfg.seed)


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER).read_text()).get("params")
    except (OSError, ValueError, AttributeError):
        return None


_PREFIX = {"qata-synth": "synth_", "nuclei-real": "nuclei_"}  # file names the generators write


def _looks_generated(root: Path, dataset: str) -> bool:
    """True when ``root`` holds only split folders whose images carry the generator's file prefix."""
    entries = [p for p in root.iterdir() if p.name != MARKER]
    if any(p.name not in SPLITS.values() for p in entries):
        return False
    files = [f for p in entries for f in p.rglob("*") if f.is_file() and f.parent.name == "img"]
    return all(f.name.startswith(_PREFIX[dataset]) for f in files)


@contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_dataset(cfg: Config) -> Path:
    """``cfg.resolved_data_root()``, generated first for an embedded set that is missing or stale.

    Embedded sets are (re)generated when the folder lacks the completion marker
    or was generated with other sizes, seed or generator version (a folder
    without a marker is redone only when it holds nothing but the generator's
    own files; anything else is never deleted: ``DataError``).
    Real sets raise ``DataError`` naming the folder and the command that
    prepares it when a split folder is missing.
    """
    root = cfg.resolved_data_root()
    if cfg.dataset in REAL:
        missing = [name for name in SPLITS.values() if not (root / name).is_dir()]
        if missing:
            raise DataError(f"data folder {root} has no {', '.join(missing)}; {_HOW[cfg.dataset].format(root=root)}")
        return root
    if cfg.dataset not in EMBEDDED:
        raise DataError(f"unknown dataset {cfg.dataset!r}; choose one of {EMBEDDED + REAL}")
    params = _generation_params(cfg)
    if _read_marker(root) == params:
        return root
    with _lock(root.parent / f".{root.name}.lock"):
        if _read_marker(root) == params:  # another process finished it while we waited
            return root
        if root.exists() and _read_marker(root) is None and not _looks_generated(root, cfg.dataset):
            raise DataError(f"{root} exists but is not a data set generated by dusss (no {MARKER}); "
                            f"delete it or point data_root elsewhere to generate {cfg.dataset} there")
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("generating %s in %s (%s)", cfg.dataset, root, ", ".join(f"{k}={v}" for k, v in params.items()))
        stats = _generate(cfg, tmp)
        atomic_write_json(tmp / MARKER, {"params": params, "stats": stats})
        if root.exists():
            old = root.parent / f".{root.name}.old-{os.getpid()}"
            root.rename(old)
            tmp.rename(root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(root)
    return root


def default_augment(cfg: Config):
    """The training augmentation of a config: report-safe joint flips/rotations, or ``None`` when ``augment`` is off."""
    from .augment import JointAugment

    if not cfg.augment:
        return None
    return JointAugment("report-safe", p_flip=0.0 if text_mode_for(cfg.dataset) == "none" else 0.5)


def open_split(cfg: Config, split: str, *, augment=None, preload: bool = False) -> LViTDataset:
    """``LViTDataset`` of ``split`` for a config: ensures the data, uses ``cfg.image_size`` and the set's grammar."""
    root = ensure_dataset(cfg)
    return LViTDataset(root, split, cfg.image_size, augment=augment, text_mode=text_mode_for(cfg.dataset), preload=preload)
