"""Notebook 03's Step-2 table (docs/step2_ssmis.md): dusss / mt / supervised at 25 % and 50 % labels, from results files.

Runs ``train_ssmis`` for every (ratio, method) pair at one profile (finished
runs in ``runs/ssmis/...`` are reused, interrupted ones resume), pre-trains the
VLM a text-guided run reads first when it is missing (at the share of
``dusss.runs.pretrain_ratio``, as the notebooks and the Tables grid do), and writes
``results/03_ssmis_table.csv`` and ``.md`` (``_<profile>`` suffix for profiles
other than demo). Every number in the table is read from the runs'
``metrics.json``.

    .venv/bin/python scripts/ssmis_table.py                      # demo, qata-synth, 6 runs
    .venv/bin/python scripts/ssmis_table.py --methods mt supervised --ratios 0.25
"""
from __future__ import annotations

import argparse
import sys

import pandas as pd

from dusss.config import make_config, parse_overrides
from dusss.methods import METHODS
from dusss.paths import results_dir, tagged
from dusss.pretrain import pretrain
from dusss.runs import default_vlm_checkpoint, pretrain_config
from dusss.ssmis import train_ssmis
from dusss.utils import get_logger

log = get_logger("dusss.scripts.ssmis_table")

COLUMNS = ["method", "ratio", "test_dice", "test_miou", "val_dice", "best_epoch", "epochs_run",
           "diag_teacher_dice", "diag_text_dice", "diag_merged_dice", "n_labelled", "n_unlabelled", "train_seconds"]


def table_rows(profile: str, dataset: str, methods: list[str], ratios: list[float], overrides: dict) -> pd.DataFrame:
    """Train (or reuse) each run and collect its metrics into one DataFrame with :data:`COLUMNS`."""
    rows = []
    for ratio in ratios:
        for method in methods:
            cfg = make_config(profile, overrides, dataset=dataset, method=method, ratio=ratio)
            if METHODS[method].uses_text and not default_vlm_checkpoint(cfg).is_file():
                # the VLM this run reads: pre-trained at the share of dusss.runs.pretrain_ratio, inside its labels
                log.info("no VLM at %s: pre-training it first", default_vlm_checkpoint(cfg))
                pretrain(pretrain_config(cfg))
            m = train_ssmis(cfg)
            rows.append({**{k: m[k] for k in COLUMNS if k in m}, **m["diag_best"]})
    return pd.DataFrame(rows)[COLUMNS]


def to_markdown(df: pd.DataFrame) -> str:
    """The table as GitHub markdown, Dice/mIoU in per cent, diagnostics as Dice vs the hidden masks."""
    head = ("| labels | method | test Dice (%) | test mIoU (%) | val Dice (%) | best epoch / run | "
            "pseudo-label Dice: teacher / text / merged (%) |\n|---|---|---|---|---|---|---|\n")
    lines = []
    for _, r in df.iterrows():
        diag = " / ".join("–" if pd.isna(r[k]) else f"{100 * r[k]:.1f}"
                          for k in ("diag_teacher_dice", "diag_text_dice", "diag_merged_dice"))
        lines.append(f"| {100 * r['ratio']:.0f} % | {r['method']} | {100 * r['test_dice']:.2f} | "
                     f"{100 * r['test_miou']:.2f} | {100 * r['val_dice']:.2f} | {r['best_epoch']} / "
                     f"{r['epochs_run']} | {diag} |")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run or reuse the runs, write the CSV and markdown tables."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="demo")
    p.add_argument("--dataset", default="qata-synth")
    p.add_argument("--methods", nargs="+", default=["dusss", "mt", "supervised"], choices=list(METHODS))
    p.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    df = table_rows(args.profile, args.dataset, args.methods, args.ratios, parse_overrides(args.overrides))
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    name = tagged("03_ssmis_table", args.profile)
    df.to_csv(out / f"{name}.csv", index=False, float_format="%.6f")
    (out / f"{name}.md").write_text(to_markdown(df))
    print(to_markdown(df))
    return 0


if __name__ == "__main__":
    sys.exit(main())
