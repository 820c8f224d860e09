"""``python -m dusss data ACTION``: generate the embedded sets, prepare raw downloads, check a folder.

Actions: ``make-synth`` (qata-synth), ``make-nuclei`` (nuclei-real),
``prepare-qata RAW --text-dir TEXT``, ``prepare-bmseg RAW`` (into
``--data-root``, else the configured folder of that data set) and
``check [DIR]`` (every file of every split is read; counts per split are
printed) and ``gallery`` (``figures/data_<dataset>.png`` of the configured
embedded set). A data problem raises :class:`DataError`, which
:func:`dusss.cli.main` reports as one line naming the file (exit status 2).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import Config
from .layout import DataError
from .prepare import check_dataset, ensure_dataset, prepare_bmseg, prepare_qata, resolve_dataset

__all__ = ["run", "format_check"]


def format_check(root: Path, report: dict[str, dict[str, float]]) -> str:
    """The table ``data check`` prints: one row per split."""
    lines = [f"{root}", f"{'split':<6} {'images':>7} {'reports':>8} {'foreground':>11} {'empty masks':>12}"]
    for split, row in report.items():
        lines.append(f"{split:<6} {row['images']:>7d} {row['distinct_reports']:>8d} {row['foreground']:>11.3f} "
                     f"{row['empty_masks']:>12d}")
    return "\n".join(lines)


def _require_path(args: argparse.Namespace, what: str) -> Path:
    if not args.path:
        raise DataError(f"`data {args.action}` needs the {what} folder as its argument")
    path = Path(args.path).expanduser()
    if not path.is_dir():
        raise DataError(f"{what} folder {path} does not exist")
    return path


def run(args: argparse.Namespace, cfg: Config) -> int:
    """Carry out one ``data`` action for the parsed ``args`` and resolved ``cfg``; return the exit status."""
    if args.action in ("make-synth", "make-nuclei"):
        dataset = "qata-synth" if args.action == "make-synth" else "nuclei-real"
        data_root = args.path or cfg.data_root
        cfg = cfg.replace(dataset=dataset, data_root=str(data_root or ""))
        if resolve_dataset(cfg).dataset != dataset:  # ensure_dataset would read that folder, not generate
            raise DataError(f"{cfg.resolved_data_root()} already holds a data set dusss did not generate as {dataset}; "
                            f"give `data {args.action}` a new or empty folder")
        root = ensure_dataset(cfg)
        print(format_check(root, check_dataset(root)))
    elif args.action == "prepare-qata":
        raw = _require_path(args, "QaTa-COV19-v2 download")
        out = Path(cfg.data_root) if cfg.data_root else cfg.replace(dataset="qata").resolved_data_root()
        prepare_qata(raw, out, args.text_dir, seed=cfg.resolved_data_seed())
        print(format_check(out, check_dataset(out)))
    elif args.action == "prepare-bmseg":
        raw = _require_path(args, "BM-Seg download")
        out = Path(cfg.data_root) if cfg.data_root else cfg.replace(dataset="bmseg").resolved_data_root()
        prepare_bmseg(raw, out, seed=cfg.resolved_data_seed())
        print(format_check(out, check_dataset(out)))
    elif args.action == "check":
        root = Path(args.path).expanduser() if args.path else cfg.resolved_data_root()
        print(format_check(root, check_dataset(root)))
    elif args.action == "gallery":
        from .gallery import save_gallery

        print(save_gallery(cfg))
    else:  # argparse restricts the choices; this guards a caller building args by hand
        raise DataError(f"unknown data action {args.action!r}")
    return 0
