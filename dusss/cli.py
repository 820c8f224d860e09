"""``python -m dusss``: the command line over the same config the notebooks use.

Each subcommand's options are declared here (so ``--help`` is complete); its
work is the function named in :data:`COMMANDS` (``module:function``, imported
only when the command runs): :mod:`dusss.commands` for the library's commands,
the ``run`` of a module of :mod:`dusss.experiments` for the harness's. Every
command takes ``--profile`` and repeatable ``--set key=value`` overrides, resolved by :func:`dusss.config.make_config`;
``--data-root`` is then read for what it holds
(:func:`dusss.data.prepare.resolve_dataset`: a folder in the LViT layout is own
data whatever embedded set ``dataset`` names). An error the user caused (any
:class:`dusss.errors.DusssError`: config, data, checkpoint) ends the command
with one line on stderr and exit status 2; any other exception is a bug and
keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .config import PROFILES, make_config, parse_overrides
from .data.prepare import resolve_dataset
from .data.registry import DATASETS
from .errors import DusssError
from .experiments.grid import GRIDS
from .methods import METHODS

EMBEDDED = [name for name, spec in DATASETS.items() if spec.generated]  # default --datasets of grid and study

# command -> ("module:function" taking (args, cfg) and returning the exit status, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("dusss.commands:run_data", "generate the embedded data sets, prepare raw downloads, check a data folder"),
    "pretrain": ("dusss.commands:run_pretrain", "Step 1: pre-train the DuSSS vision-language model"),
    "ssmis": ("dusss.commands:run_ssmis", "Step 2: semi-supervised segmentation with any registered method (--method; default dusss)"),
    "evaluate": ("dusss.commands:run_evaluate", "Dice and mIoU of a segmentation checkpoint on a split"),
    "tables": ("dusss.experiments.tables:run",
               "Tables 1 and 2: train the missing runs for one data set and seed, render the tables"),
    "bench": ("dusss.experiments.bench:run", "speed benchmark: text-guidance cost, GFLOP/s, throughput, loader"),
    "study": ("dusss.experiments.study:run",
              "the Step-2 consistency-recipe study: MT recipes vs labelled-only, on validation"),
    "grid": ("dusss.experiments.grid:run",
             "the testbed grid: every (row, share, seed, data set) run, parallel, resumable"),
    "complexity": ("dusss.experiments.complexity:run",
                   "Params and FLOPs of each table row's inference network on one image, beside the paper's"),
}


def _add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default=None, choices=sorted(PROFILES),
                   help="settings profile (default: $DUSSS_PROFILE or demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key; repeatable (e.g. --set ratio=0.5)")
    p.add_argument("--data-root", default=None, help="data folder in the LViT layout (config key data_root)")
    p.add_argument("--out", default=None, help="output folder (config key out_dir)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (config key device)")
    p.add_argument("--seed", type=int, default=None, help="random seed (config key seed)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dusss",
        description="DuSSS: dual semantic similarity-supervised VLM for semi-supervised medical image segmentation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        _add_config_options(p)
        if name == "data":
            p.add_argument("action", choices=[s.action for s in DATASETS.values() if s.action] + ["check", "gallery"],
                           help="what to do (make-* / prepare-*: the registered data sets' actions)")
            p.add_argument("path", nargs="?", default=None,
                           help="data folder for 'check'; raw download folder for 'prepare-*'")
            p.add_argument("--text-dir", default=None, help="prepare-qata: folder with LViT's *_text.xlsx workbooks")
        elif name == "ssmis":
            p.add_argument("--ratio", type=float, default=None, help="share of labelled images (config key ratio)")
            p.add_argument("--method", default=None, help="Step-2 method (config key method): " + "; ".join(
                f"{name} = {cls.summary}" for name, cls in METHODS.items()))
            p.add_argument("--vlm", default=None, help="Step-1 checkpoint vlm.pt (config key vlm_checkpoint)")
        elif name == "grid":
            p.add_argument("--grid", nargs="+", default=["sweep"], choices=list(GRIDS),
                           help="which grids (dusss.experiments.grid.GRIDS); their runs are merged")
            p.add_argument("--datasets", nargs="+", default=EMBEDDED, help="data sets (default: the embedded ones)")
            p.add_argument("--seeds", default="666-670", help="seeds, e.g. 666-670 or 666,668")
            p.add_argument("--rows", nargs="+", default=None, help="only these rows of the grids (e.g. cct mcnet)")
            p.add_argument("--shares", nargs="+", type=float, default=None,
                           help="only these label shares of the grids (e.g. 0.05)")
            p.add_argument("--workers", type=int, default=1, help="runs side by side (each gets cores // workers threads)")
            p.add_argument("--list", action="store_true", help="only list the jobs and which are done")
        elif name == "study":
            p.add_argument("--datasets", nargs="+", default=EMBEDDED, help="data sets (default: the embedded ones)")
            p.add_argument("--seeds", default="666-668", help="seeds, e.g. 666-668")
            p.add_argument("--recipes", nargs="+", default=None, help="recipes (default: all of RECIPES)")
            p.add_argument("--workers", type=int, default=1, help="runs side by side")
        elif name == "bench":
            p.add_argument("--repeats", type=int, default=5, help="timed rounds per measurement (median)")
            p.add_argument("--warmup", type=int, default=2, help="untimed rounds before them")
            p.add_argument("--matmul-n", type=int, default=2048, help="side of the float32 reference matmul")
            p.add_argument("--no-compile", action="store_true", help="skip the torch.compile U-Net variant")
            p.add_argument("--steps-only", action="store_true",
                           help="only the SSMIS step on random tensors at the profile's size (benchmarks/gpu_check.sh)")
        elif name == "complexity":
            p.add_argument("--size", type=int, default=224, help="side of the one input image (paper: 224)")
        elif name == "evaluate":
            p.add_argument("--checkpoint", required=True, help="segmentation checkpoint written by ssmis")
            p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to score")
    return parser


def config_from_args(args: argparse.Namespace):
    """Resolve ``--profile``/``--set`` and the dedicated flags into a Config, its dataset read from its data folder."""
    overrides = parse_overrides(args.overrides)
    for flag, key in (("data_root", "data_root"), ("out", "out_dir"), ("device", "device"), ("seed", "seed"),
                      ("ratio", "ratio"), ("method", "method"), ("vlm", "vlm_checkpoint")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    return resolve_dataset(make_config(args.profile, overrides))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module_name, function = COMMANDS[args.command][0].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        parser.exit(2, f"python -m dusss {args.command}: this checkout has no {module_name} yet\n")
    try:
        return int(getattr(module, function)(args, config_from_args(args)) or 0)
    except DusssError as exc:  # the user's to fix: one line, no traceback (SystemExit(2), as argparse does)
        message = " ".join(str(exc).split())
        parser.exit(2, f"python -m dusss {args.command}: error: {message}\n")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
