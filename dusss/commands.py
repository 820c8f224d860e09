"""The work of ``python -m dusss data|pretrain|ssmis|evaluate``: arguments and config in, library calls, a report out.

Each ``run_<command>(args, cfg)`` takes the ``argparse`` namespace and the
resolved :class:`~dusss.config.Config` of :func:`dusss.cli.main`, calls the
library and prints what it did; it returns the exit status. The options and
the dispatch are :mod:`dusss.cli`; the experiment commands (``tables``,
``bench``, ``grid``, ``study``) keep their ``run`` in their own modules under
:mod:`dusss.experiments`. The library modules (:mod:`dusss.pretrain`,
:mod:`dusss.ssmis`, :mod:`dusss.evaluate`, :mod:`dusss.data`) hold no
command-line code. A problem the user caused raises a
:class:`~dusss.errors.DusssError` (e.g. :class:`~dusss.data.DataError`), which
:func:`dusss.cli.main` reports as one line naming the file (exit status 2).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .config import Config
from .data import DataError
from .data.gallery import save_gallery
from .data.prepare import check_dataset, ensure_dataset, prepare_bmseg, prepare_qata, resolve_dataset
from .data.registry import dataset_for_action
from .evaluate import evaluate_checkpoint
from .pretrain import pretrain
from .runs import pretrain_dir
from .ssmis import train_ssmis

__all__ = ["run_data", "run_pretrain", "run_ssmis", "run_evaluate", "format_check"]


# ---------------------------------------------------------------- data
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


def run_data(args: argparse.Namespace, cfg: Config) -> int:
    """``python -m dusss data ACTION``: generate the embedded sets, prepare raw downloads, check a folder.

    Actions: ``make-synth`` (qata-synth), ``make-nuclei`` (nuclei-real),
    ``prepare-qata RAW --text-dir TEXT``, ``prepare-bmseg RAW`` (into
    ``--data-root``, else the configured folder of that data set),
    ``check [DIR]`` (every file of every split is read; counts per split are
    printed) and ``gallery`` (``figures/data_<dataset>.png`` of the configured
    embedded set).
    """
    spec = dataset_for_action(args.action) if args.action not in ("check", "gallery") else None
    if spec is not None and spec.generated:
        dataset = spec.name
        data_root = args.path or cfg.data_root
        cfg = cfg.replace(dataset=dataset, data_root=str(data_root or ""))
        if resolve_dataset(cfg).dataset != dataset:  # ensure_dataset would read that folder, not generate
            raise DataError(f"{cfg.resolved_data_root()} already holds a data set dusss did not generate as {dataset}; "
                            f"give `data {args.action}` a new or empty folder")
        root = ensure_dataset(cfg)
        print(format_check(root, check_dataset(root)))
    elif args.action == "prepare-qata":
        raw = _require_path(args, "QaTa-COV19-v2 download")
        out = Path(cfg.data_root) if cfg.data_root else cfg.replace(dataset=spec.name).resolved_data_root()
        prepare_qata(raw, out, args.text_dir, seed=cfg.resolved_data_seed())
        print(format_check(out, check_dataset(out)))
    elif args.action == "prepare-bmseg":
        raw = _require_path(args, "BM-Seg download")
        out = Path(cfg.data_root) if cfg.data_root else cfg.replace(dataset=spec.name).resolved_data_root()
        prepare_bmseg(raw, out, seed=cfg.resolved_data_seed())
        print(format_check(out, check_dataset(out)))
    elif args.action == "check":
        root = Path(args.path).expanduser() if args.path else cfg.resolved_data_root()
        print(format_check(root, check_dataset(root)))
    elif args.action == "gallery":
        print(save_gallery(cfg))
    else:  # argparse restricts the choices; this guards a caller building args by hand
        raise DataError(f"unknown data action {args.action!r}")
    return 0


# ---------------------------------------------------------------- the two steps and scoring
def run_pretrain(args: argparse.Namespace, cfg: Config) -> int:
    """``python -m dusss pretrain``: train (or resume) the Step-1 VLM and print its final metrics."""
    metrics = pretrain(cfg, progress=True)
    for key in sorted(metrics):
        value = metrics[key]
        print(f"{key:<28} {value:.6g}" if isinstance(value, float) else f"{key:<28} {value}")
    print(f"checkpoint: {pretrain_dir(cfg) / 'vlm.pt'}")
    return 0


def run_ssmis(args: argparse.Namespace, cfg: Config) -> int:
    """``python -m dusss ssmis``: train and score one method at one label ratio; print the metrics."""
    metrics = train_ssmis(cfg, progress=True)
    print(f"{metrics['method']} ratio {metrics['ratio']:g}: test Dice {metrics['test_dice']:.4f} "
          f"mIoU {metrics['test_miou']:.4f} (best epoch {metrics['best_epoch']}, val Dice {metrics['val_dice']:.4f})"
          f" -> {metrics['out_dir']}")
    return 0


def run_evaluate(args: argparse.Namespace, cfg: Config) -> int:
    """``python -m dusss evaluate``: print and write Dice and mIoU of ``--checkpoint`` on ``--split``."""
    result = evaluate_checkpoint(args.checkpoint, split=args.split, data_root=args.data_root or None,
                                 device=cfg.device, out_dir=args.out or None)
    print(f"{args.split}: Dice {result['dice']:.4f}  mIoU {result['miou']:.4f}  ({result['n']} images, "
          f"{result['method']} r{result['ratio']:g}, epoch {result['epoch']}) -> "
          f"{Path(args.out or Path(args.checkpoint).parent) / f'eval_{args.split}.json'}")
    return 0
