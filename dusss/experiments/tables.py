"""Tables 1 and 2 of the paper, rebuilt from this project's runs and shown beside the paper's numbers.

The grid: every (row, label ratio, data set, seed) is one Step-2 run
(:func:`dusss.ssmis.train_ssmis`), preceded for text-guided rows by the Step-1
pre-training with that row's loss switches (:func:`dusss.pretrain.pretrain`;
each switch combination has its own folder, :func:`dusss.runs.vlm_variant`).
:func:`run_grid` writes one small JSON per run under
``results/runs/<dataset>-<profile>/`` (the run's ``metrics.json`` plus the
row, the VLM's switches and the seconds spent) and reuses those files unless
told to re-run, so a long grid can be filled over several sittings and the
tables re-rendered at once from whatever exists. :func:`render_tables` turns
those files into Table 1 and Table 2 (mean ± std over seeds, the paper's
numbers beside them: :mod:`dusss.paper_tables`) and compares rows as paired
differences over seeds (mean and 95 % t-interval, :mod:`dusss.stats`: the
same seed draws the same data and labelled subset for every row),
:func:`write_outputs` writes CSV + Markdown to ``results/`` and the charts
(bars, the differences' forest plot, Dice against label share) to
``figures/``, and :func:`write_results_page` writes them, with the rows of the
paper this project does not implement, to the generated page
``docs/tables_generated.md`` (README.md is never written by code).

Rows (:data:`dusss.runs.ROWS`, with the run names and the VLM each reads):
Table 1 = U-Net at 100 % labels, U-Net on the labelled part only, Mean Teacher, BCP (:mod:`dusss.methods.bcp`), a CLIP-style VLM (DuSSS's
Step 2 with a VLM pre-trained by plain cross-modal InfoNCE: SSS, IMC and
``L_tg`` off) and DuSSS; BCP and a simplified UCMT come from
:mod:`dusss.methods.bcp` and :mod:`dusss.methods.ucmt`. Table 2 = the seven switch combinations of the paper at 50 %
labels; its baseline (no SSS, no DCL, no ``L_tg``) is the Mean Teacher run and
its last row the DuSSS run, shared with Table 1.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.ticker import NullLocator
from tqdm.auto import tqdm

from ..config import Config, make_config, parse_overrides, resume_differences
from ..data.registry import PAPER_KEYS, PAPER_NAMES, PAPER_ONLY
from ..paper_tables import paper_table1, paper_table2
from ..paths import results_dir, runs_dir, tagged
from ..plotting import figures_dir, save_figure
from ..pretrain import pretrain
from ..runs import (ROWS, TABLE1_ROWS, TABLE2_ROWS, default_vlm_checkpoint, needs_vlm, pretrain_config, row_spec,
                    run_config, run_file, run_name, ssmis_dir)
from ..ssmis import train_ssmis
from ..stats import paired_difference, t_interval
from ..unet import build_unet
from ..utils import atomic_write_json, atomic_write_text, get_logger, repo_root
from .complexity import count_complexity
from .convergence import read_history

__all__ = ["PAPER_NAMES", "PAPER_ONLY", "run_one", "set_aside_stale", "run_grid", "load_runs", "summarise", "render_tables", "complexity",
           "write_outputs", "plot_tables", "grid_cost", "measured_seconds", "write_results_page", "RESULTS_PAGE",
           "COMPONENTS", "component_effects", "row_contrasts", "CONTRASTS", "HEADLINE_CONTRASTS", "coverage",
           "plot_differences", "EFFICIENCY_ROWS", "label_efficiency", "plot_label_efficiency"]

log = get_logger(__name__)

# Live views of the data-set registry (dusss.data.registry, each DatasetSpec.paper): PAPER_NAMES, our data set -> the
# paper's column it is or stands in for; _PAPER_KEY, that column -> the real set whose name keys its numbers in
# dusss.paper_tables; PAPER_ONLY, the paper's data sets with no generated stand-in, shown as paper-only columns.
_PAPER_KEY = PAPER_KEYS


def run_one(profile: str, dataset: str, row: str, ratio: float, seed: int, *,
            overrides: Mapping[str, Any] | None = None, rerun: bool = False, progress: bool = False) -> dict:
    """Train (or reuse) one run of the grid and return its results dict (also written to :func:`dusss.runs.run_file`).

    An existing results file is returned as it is unless ``rerun``. Otherwise a
    text-guided row first pre-trains its VLM if the checkpoint of its switches
    is missing (on the :data:`dusss.runs.PRETRAIN_RATIO` split, so one VLM serves 25 % and
    50 %), then :func:`dusss.ssmis.train_ssmis` trains the segmentation network
    (``rerun`` retrains it from scratch; a finished run folder is otherwise
    reused). The file holds the run's ``metrics.json`` plus ``row``,
    ``switches``, ``pretrain_seconds``, ``ssmis_seconds`` (wall time of this
    call; 0 when reused) and ``history`` (the per-epoch curves,
    :func:`dusss.experiments.convergence.read_history`).
    """
    spec = row_spec(row)
    if spec.method is None:
        raise ValueError(f"row {row!r} ({spec.label}) has no implementation in this project; drop it from the grid")
    path = run_file(profile, dataset, row, ratio, seed)
    if path.is_file() and not rerun:
        return json.loads(path.read_text())
    cfg = run_config(profile, dataset, row, ratio, seed, overrides or {})
    pre_s = 0.0
    if needs_vlm(row) and not default_vlm_checkpoint(cfg).is_file():
        t0 = time.perf_counter()
        log.info("no VLM at %s: pre-training it (%s)", default_vlm_checkpoint(cfg), row)
        pretrain(pretrain_config(cfg), progress=progress)
        pre_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = train_ssmis(cfg.replace(resume=not rerun), progress=progress)
    result = {**metrics, "row": row, "switches": dict(spec.switches), "pretrain_seconds": pre_s,
              "ssmis_seconds": time.perf_counter() - t0, "history": read_history(ssmis_dir(cfg))}
    atomic_write_json(path, result)
    return result


def set_aside_stale(cfg: Config) -> Path | None:
    """Move ``cfg``'s Step-2 run folder to ``runs/archive/stale/`` when it was trained with other settings.

    A grid run whose results file is gone but whose run folder remains (the
    settings of the row changed since, e.g. new Step-2 defaults) would
    otherwise stop the grid with the loop's resume refusal (``ConfigError``).
    The folder is kept, not deleted, under
    ``runs/archive/stale/<dataset>-<profile>/<name>-<time>``; returns that path,
    or None when there is nothing to set aside (no folder, or one this config
    may resume). Only the grid command does this
    (:func:`dusss.experiments.grid.run_jobs`, for a run it is about to train):
    ``train_ssmis`` itself still refuses, and :func:`run_grid`'s adoption of
    finished folders never moves one, so a hand-run folder is never moved
    behind its owner's back.
    """
    folder = ssmis_dir(cfg)
    saved = folder / "config.json"
    if not saved.is_file():
        return None
    try:
        differences = resume_differences(json.loads(saved.read_text()), cfg, 2)
    except (OSError, json.JSONDecodeError) as exc:
        differences = [f"unreadable config.json ({exc})"]
    if not differences:
        return None
    target = runs_dir() / "archive" / "stale" / folder.parent.name / f"{folder.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    target.parent.mkdir(parents=True, exist_ok=True)
    folder.rename(target)
    log.warning("%s was trained with other settings (%s); moved it to %s and training afresh", folder,
                ", ".join(differences[:4]), target)
    return target


def run_grid(profile: str, datasets: Iterable[str], seeds: Iterable[int], *,
             table1_rows: Iterable[str] = TABLE1_ROWS, table1_ratios: Iterable[float] = (0.25, 0.5),
             table2_rows: Iterable[str] = TABLE2_ROWS, table2_ratio: float = 0.5,
             overrides: Mapping[str, Any] | None = None, run_missing: bool = True, rerun: bool = False,
             adopt_finished: bool = True, progress: bool = True) -> pd.DataFrame:
    """Run (or only collect) the grid; returns :func:`load_runs` of the runs that exist afterwards.

    The grid is every implemented row of ``table1_rows`` at every ratio of
    ``table1_ratios`` (rows with a fixed ratio once) plus ``table2_rows`` at
    ``table2_ratio``, for each data set and seed; runs shared by both tables
    are trained once (rows without an implementation are skipped). With ``run_missing=False`` nothing is trained: only the
    results files already under ``results/runs/`` are read, plus (``adopt_finished``)
    the runs finished elsewhere, e.g. by ``python -m dusss ssmis``: a missing
    results file whose run folder (:func:`dusss.runs.ssmis_dir`) holds a
    ``metrics.json`` with the same settings (and, for text-guided rows, the
    VLM) is written from it without training; folders of other settings are
    skipped with a warning.
    """
    jobs: dict[str, tuple] = {}
    for dataset in datasets:
        for seed in seeds:
            pairs = [(r, q) for r in table1_rows for q in table1_ratios] + [(r, table2_ratio) for r in table2_rows]
            for row, ratio in pairs:
                if row_spec(row).method is None:
                    continue
                jobs.setdefault(f"{dataset}/{run_name(row, ratio, seed)}", (dataset, row, ratio, seed))
    if adopt_finished and not rerun:
        for dataset, row, ratio, seed in jobs.values():
            cfg = run_config(profile, dataset, row, ratio, seed, overrides or {})
            finished = (ssmis_dir(cfg) / "metrics.json").is_file()
            has_vlm = not needs_vlm(row) or default_vlm_checkpoint(cfg).is_file()
            if finished and has_vlm and not run_file(profile, dataset, row, ratio, seed).is_file():
                try:
                    run_one(profile, dataset, row, ratio, seed, overrides=overrides)
                except ValueError as exc:  # a folder of other settings: leave it alone
                    log.warning("not adopting %s: %s", ssmis_dir(cfg), exc)
    if run_missing:
        todo = [j for j in jobs.values() if rerun or not run_file(profile, j[0], j[1], j[2], j[3]).is_file()]
        for dataset, row, ratio, seed in tqdm(todo, desc="grid runs", disable=not progress):
            run_one(profile, dataset, row, ratio, seed, overrides=overrides, rerun=rerun)
    return load_runs(profile, datasets=list({j[0] for j in jobs.values()}))


def load_runs(profile: str, datasets: Iterable[str] | None = None) -> pd.DataFrame:
    """Every results file under ``results/runs/<dataset>-<profile>/`` as one DataFrame (one row per run)."""
    root = results_dir() / "runs"
    rows = []
    for folder in sorted(root.glob(f"*-{profile}")) if root.is_dir() else []:
        dataset = folder.name[: -len(profile) - 1]
        if datasets is not None and dataset not in set(datasets):
            continue
        for path in sorted(folder.glob("*.json")):
            m = json.loads(path.read_text())
            rows.append({"dataset": m["dataset"], "run": path.stem, "method": m["method"], "ratio": m["ratio"],
                         "seed": m["seed"], "test_dice": m["test_dice"], "test_miou": m["test_miou"],
                         "val_dice": m["val_dice"], "epochs_run": m["epochs_run"],
                         "pretrain_seconds": m.get("pretrain_seconds", 0.0),
                         "ssmis_seconds": m.get("ssmis_seconds", 0.0), "train_seconds": m["train_seconds"]})
    cols = ["dataset", "run", "method", "ratio", "seed", "test_dice", "test_miou", "val_dice", "epochs_run",
            "pretrain_seconds", "ssmis_seconds", "train_seconds"]
    return pd.DataFrame(rows, columns=cols)


def _shares(runs: pd.DataFrame) -> list[float]:
    """The label shares the runs were trained at, without the fixed shares of rows such as the 100 % U-Net.

    Run names tie a fixed share to its row (``supervised-r1`` is the 100 %
    U-Net, never the labelled-only U-Net at 100 %), so those shares are left
    to their rows.
    """
    fixed = {spec.ratio for spec in ROWS.values() if spec.ratio is not None}
    return sorted({float(q) for q in runs["ratio"]} - fixed)


def _datasets(runs: pd.DataFrame, datasets: Iterable[str] | None) -> list[str]:
    return list(datasets) if datasets is not None else list(dict.fromkeys(runs["dataset"]))


def _row_runs(runs: pd.DataFrame, row: str, ratio: float, dataset: str) -> pd.DataFrame:
    """The runs of ``row`` at ``ratio`` (its fixed share where it has one) on ``dataset``, by their run name."""
    stem = re.sub(r"-s0$", "", run_name(row, ratio, 0))
    return runs[(runs["run"].str.replace(r"-s\d+$", "", regex=True) == stem) & (runs["dataset"] == dataset)]


def _paper_line(row: str, ratio: float, table: str) -> pd.Series | None:
    """The paper's line of ``row`` at ``ratio`` in ``table`` ("table1" or "table2"), None where the paper has none."""
    spec = row_spec(row)
    hit = None
    if table == "table1" and spec.paper1:
        p1 = paper_table1()
        hit = p1[(p1["method"] == spec.paper1) & (p1["labels"] == round(100 * ratio))]
    if table == "table2" and spec.paper2:
        p2 = paper_table2()
        s, d, t = spec.paper2
        hit = p2[(p2["sss"] == s) & (p2["dcl"] == d) & (p2["tg"] == t)]
    return hit.iloc[0] if hit is not None and len(hit) else None


def _paper_dice(row: str, ratio: float, dataset: str, table: str) -> float:
    """The paper's Dice of ``row`` at ``ratio`` in the paper's column ``dataset`` stands in for (NaN where none)."""
    key = _PAPER_KEY.get(PAPER_NAMES.get(dataset, ""))
    line = _paper_line(row, ratio, table) if key else None
    return float(line[f"{key}_dice"]) if line is not None else float("nan")


def summarise(runs: pd.DataFrame, rows: Iterable[str], ratios: Iterable[float], table: str,
              datasets: Iterable[str] | None = None) -> pd.DataFrame:
    """Mean ± std (sample std, ddof=1; 0 for one seed) of Dice and mIoU in per cent over seeds, per row, ratio, data set.

    ``runs`` is :func:`load_runs`; runs are matched to rows by
    :func:`dusss.runs.run_name` without the seed. Every (row, ratio, data set) appears,
    with ``n_seeds = 0`` and NaN where no run exists (``seeds`` lists the
    seeds that have a run, space-separated, "" for none), and the paper's numbers
    (``paper_dice``, ``paper_miou``) where the paper has that row, plus those of
    the paper's data sets that have no stand-in here (:data:`PAPER_ONLY`:
    ``paper_bmseg_dice``, ``paper_bmseg_miou``). ``datasets`` None = the data
    sets that have runs.
    """
    datasets = _datasets(runs, datasets)
    out = []
    for row in rows:
        spec = row_spec(row)
        for ratio in ([spec.ratio] if spec.ratio is not None else list(ratios)):
            line = _paper_line(row, ratio, table)
            for dataset in datasets:
                sel = _row_runs(runs, row, ratio, dataset)
                key = _PAPER_KEY.get(PAPER_NAMES.get(dataset, ""), None)
                paper = line if key else None  # a data set standing in for none of the paper's: no paper numbers
                n = len(sel)
                only = {}
                for name in PAPER_ONLY:
                    k = _PAPER_KEY[name]
                    for metric in ("dice", "miou"):
                        only[f"paper_{k}_{metric}"] = (float(paper[f"{k}_{metric}"]) if paper is not None
                                                       else float("nan"))
                out.append({
                    "table": table, "row": row, "label": spec.label, "ratio": ratio, "dataset": dataset,
                    "paper_dataset": PAPER_NAMES.get(dataset, ""), "n_seeds": n,
                    "seeds": " ".join(str(int(x)) for x in sorted(sel["seed"])),
                    "dice_mean": 100 * sel["test_dice"].mean() if n else float("nan"),
                    "dice_std": 100 * sel["test_dice"].std(ddof=1) if n > 1 else (0.0 if n else float("nan")),
                    "miou_mean": 100 * sel["test_miou"].mean() if n else float("nan"),
                    "miou_std": 100 * sel["test_miou"].std(ddof=1) if n > 1 else (0.0 if n else float("nan")),
                    "paper_dice": float(paper[f"{key}_dice"]) if paper is not None else float("nan"),
                    "paper_miou": float(paper[f"{key}_miou"]) if paper is not None else float("nan"),
                    **only,
                })
    cols = ["table", "row", "label", "ratio", "dataset", "paper_dataset", "n_seeds", "seeds", "dice_mean", "dice_std",
            "miou_mean", "miou_std", "paper_dice", "paper_miou"]
    cols += [f"paper_{_PAPER_KEY[name]}_{metric}" for name in PAPER_ONLY for metric in ("dice", "miou")]
    return pd.DataFrame(out, columns=cols)  # the columns even with no rows (e.g. table1_rows=[])


def _pm(mean: float, std: float, n: int) -> str:
    if n == 0 or pd.isna(mean):
        return "–"
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f} (1 seed)"


def _num(x: float) -> str:
    return "–" if pd.isna(x) else f"{x:.2f}"


def _markdown(summary: pd.DataFrame, *, ranks: bool) -> str:
    """One Markdown table: a line per (ratio, row), per data set ours (mean ± std) and the paper's Dice / mIoU.

    The last columns are the paper's numbers on its data sets with no stand-in here (:data:`PAPER_ONLY`).
    """
    datasets = list(dict.fromkeys(summary["dataset"]))
    head = "| labels | method |"
    rule = "|---|---|"
    for d in datasets:
        name = f"{d} (paper: {PAPER_NAMES.get(d, '–')})"
        head += f" {name} Dice | paper Dice | {d} mIoU | paper mIoU | seeds |"
        rule += "---|---|---|---|---|"
        if ranks:
            head += f" {d} rank ours / paper |"
            rule += "---|"
    for name in PAPER_ONLY:
        head += f" {name} (paper only) Dice | {name} mIoU |"
        rule += "---|---|"
    lines = [head, rule]
    rank = {}
    if ranks:
        for d in datasets:
            s = summary[summary["dataset"] == d].set_index("row")
            rank[d] = (s["dice_mean"].rank(ascending=False, method="min"),
                       s["paper_dice"].rank(ascending=False, method="min"))
    for (ratio, row), grp in summary.groupby(["ratio", "row"], sort=False):
        g = grp.set_index("dataset")
        line = f"| {100 * ratio:.0f} % | {g['label'].iloc[0]} |"
        for d in datasets:
            r = g.loc[d]
            line += (f" {_pm(r['dice_mean'], r['dice_std'], r['n_seeds'])} | {_num(r['paper_dice'])} |"
                     f" {_pm(r['miou_mean'], r['miou_std'], r['n_seeds'])} | {_num(r['paper_miou'])} |"
                     f" {r['n_seeds']} |")
            if ranks:
                ours, theirs = rank[d][0][row], rank[d][1][row]
                line += f" {'–' if pd.isna(ours) else int(ours)} / {'–' if pd.isna(theirs) else int(theirs)} |"
        first = grp.iloc[0]
        for name in PAPER_ONLY:
            k = _PAPER_KEY[name]
            line += f" {_num(first[f'paper_{k}_dice'])} | {_num(first[f'paper_{k}_miou'])} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def render_tables(runs: pd.DataFrame, *, table1_rows: Iterable[str] = TABLE1_ROWS,
                  table1_ratios: Iterable[float] | None = None, table2_rows: Iterable[str] = TABLE2_ROWS,
                  table2_ratio: float = 0.5, datasets: Iterable[str] | None = None,
                  seeds: Iterable[int] | None = None) -> dict[str, Any]:
    """Both tables from :func:`load_runs`: ``{"table1", "table2"}`` summaries and ``{"table1_md", "table2_md"}``.

    Table 2's Markdown adds, per data set, each row's Dice rank among the
    rows here next to its rank in the paper (1 = best); ``"effects"`` /
    ``"effects_md"`` (:func:`component_effects`) say, pair by pair, whether
    each component helps here as it did there, and ``"contrasts"`` /
    ``"contrasts_md"`` (:func:`row_contrasts`) give Table 1's comparisons
    (the pairs of :data:`CONTRASTS` among ``table1_rows``) as paired
    differences with 95 % t-intervals; ``"efficiency"``
    (:func:`label_efficiency`) is Dice against label share for the rows of
    :data:`EFFICIENCY_ROWS`. ``table1_ratios`` None = every label share the
    runs have (:func:`_shares`). ``datasets`` None = the data sets that have
    runs (else every one listed, empty cells "–"). With ``seeds``,
    ``"coverage_md"`` (:func:`coverage`) says which cells lack one of them.
    """
    datasets = list(datasets) if datasets is not None else None
    ratios = _shares(runs) if table1_ratios is None else [float(q) for q in table1_ratios]
    table1_rows, table2_rows = list(table1_rows), list(table2_rows)
    t1 = summarise(runs, table1_rows, ratios, "table1", datasets)
    t2 = summarise(runs, table2_rows, [table2_ratio], "table2", datasets)
    effects = component_effects(runs, rows=table2_rows, ratio=table2_ratio, datasets=datasets)
    pairs = [(a, b) for a, b in CONTRASTS if a in table1_rows and b in table1_rows]
    contrasts = row_contrasts(runs, pairs, ratios=ratios, datasets=datasets)
    out = {"table1": t1, "table2": t2, "table1_md": _markdown(t1, ranks=False) if len(t1) else "",
           "table2_md": _markdown(t2, ranks=True) if len(t2) else "", "effects": effects,
           "effects_md": _effects_markdown(effects) if len(effects) else "", "contrasts": contrasts,
           "contrasts_md": _contrasts_markdown(contrasts) if len(contrasts) else "",
           "efficiency": label_efficiency(runs, datasets)}
    if seeds is not None:
        out["coverage_md"] = coverage(out, seeds)
    return out


COMPONENTS = ("SSS", "DCL", "L_tg")  # the positions of RowSpec.paper2
_DIFF_COLS = ["ours", "ci_low", "ci_high", "half_width", "n_pairs", "seeds", "paper", "same_sign", "verdict"]


def _difference(runs: pd.DataFrame, dataset: str, a: str, b: str, ratio: float, table: str,
                words: tuple[str, str]) -> dict[str, Any]:
    """Dice of row ``a`` minus row ``b`` on ``dataset`` at label share ``ratio`` (a row's fixed share where it has one).

    ``ours`` etc. are :func:`dusss.stats.paired_difference` of the two rows'
    runs (points; ``seeds`` = the seeds used, space-separated), ``paper`` the
    paper's difference in ``table`` (NaN where it lacks a row), ``same_sign``
    None while either is missing. ``verdict``: ``words[0]`` when the whole
    interval lies above 0, ``words[1]`` below, "no difference shown" when it
    covers 0, "no interval (1 seed)" with one pair, "–" with none.
    """
    qa = row_spec(a).ratio if row_spec(a).ratio is not None else ratio
    qb = row_spec(b).ratio if row_spec(b).ratio is not None else ratio
    d = paired_difference(_row_runs(runs, a, qa, dataset), _row_runs(runs, b, qb, dataset))
    paper = _paper_dice(a, qa, dataset, table) - _paper_dice(b, qb, dataset, table)
    ours = d["mean"]
    same = None if pd.isna(ours) or pd.isna(paper) else bool((ours > 0) == (paper > 0))
    if d["n_pairs"] < 2:
        verdict = "no interval (1 seed)" if d["n_pairs"] else "–"
    else:
        verdict = words[0] if d["ci_low"] > 0 else (words[1] if d["ci_high"] < 0 else "no difference shown")
    return {"ours": ours, "ci_low": d["ci_low"], "ci_high": d["ci_high"], "half_width": d["half_width"],
            "n_pairs": d["n_pairs"], "seeds": " ".join(map(str, d["seeds"])), "paper": paper, "same_sign": same,
            "verdict": verdict}


def component_effects(runs: pd.DataFrame, *, rows: Iterable[str] = TABLE2_ROWS, ratio: float = 0.5,
                      datasets: Iterable[str] | None = None) -> pd.DataFrame:
    """What switching one component on does to Dice, here and in the paper: one line per pair of Table-2 rows.

    ``runs`` is :func:`load_runs`. A pair is two of ``rows`` whose ``paper2``
    switches ``(sss, dcl, tg)`` differ in exactly one component (e.g. DCL +
    L_tg -> DuSSS for SSS); the paper's seven rows give three pairs per
    component (``row_off`` -> ``row_on``, their labels). ``ours`` = Dice of
    the row with the component minus the row without it at label share
    ``ratio``, paired by seed: mean, ``ci_low`` / ``ci_high`` / ``half_width``
    of the 95 % t-interval, ``n_pairs`` and ``seeds`` (:func:`_difference`);
    ``paper`` = the paper's difference, ``same_sign`` = both have the same
    sign, ``verdict`` = "helps" / "hurts" when the interval excludes 0, "no
    difference shown" when it covers 0. ``datasets`` None = the data sets
    that have runs. As in the paper, the pairs from the baseline (Mean
    Teacher) also add the VLM's text guidance to Step 2, not only the one
    component.
    """
    cols = ["dataset", "component", "row_off", "row_on"] + _DIFF_COLS
    by_switch = {row_spec(r).paper2: r for r in rows if row_spec(r).paper2 is not None}
    out = []
    for dataset in _datasets(runs, datasets):
        for k, name in enumerate(COMPONENTS):
            for off, row_off in by_switch.items():
                if off[k]:
                    continue
                row_on = by_switch.get(off[:k] + (1,) + off[k + 1:])
                if row_on is None:
                    continue
                out.append({"dataset": dataset, "component": name, "row_off": ROWS[row_off].label,
                            "row_on": ROWS[row_on].label,
                            **_difference(runs, dataset, row_on, row_off, ratio, "table2", ("helps", "hurts"))})
    return pd.DataFrame(out, columns=cols)


def _interval(r) -> str:
    """``+1.23 [-0.41, +2.87] (5)``: our mean difference, its 95 % t-interval and the seeds paired; "–" with none."""
    if pd.isna(r.ours):
        return "–"
    ci = "" if pd.isna(r.half_width) else f" [{r.ci_low:+.2f}, {r.ci_high:+.2f}]"
    return f"{r.ours:+.2f}{ci} ({r.n_pairs})"


def _signed(x: float) -> str:
    return "–" if pd.isna(x) else f"{x:+.2f}"


def _effects_markdown(effects: pd.DataFrame) -> str:
    lines = ["| data set | component | without → with | ours Δ Dice [95 % CI] (seeds) | paper Δ Dice | same sign |"
             " verdict |", "|---|---|---|---|---|---|---|"]
    sign = {True: "yes", False: "**no**", None: "–"}
    for r in effects.itertuples():
        lines.append(f"| {r.dataset} | {r.component} | {r.row_off} → {r.row_on} | {_interval(r)} |"
                     f" {_signed(r.paper)} | {sign[r.same_sign]} | {r.verdict} |")
    return "\n".join(lines) + "\n"


# Table 1's questions, each "row a minus row b" at the same label share (U-Net 100 % is one line for every share);
# the headline ones first: does DuSSS beat Mean Teacher, does Mean Teacher beat the labelled part alone, does
# DuSSS's Step 1 beat a CLIP-style one
HEADLINE_CONTRASTS = (("dusss", "mt"), ("mt", "unet"), ("dusss", "clip"))
CONTRASTS = (HEADLINE_CONTRASTS
             + (("unet100", "unet"), ("dusss", "bcp"), ("dusss", "ucmt"), ("dusss", "unet"),  # unet100 - unet: headroom
                ("dusss", "unet100"), ("mt", "bcp"))
             # Table 1's other semi-supervised rows: does each beat the labelled part alone, and does DuSSS beat it?
             + tuple((r, "unet") for r in ("bcp", "ucmt", "cct", "mcnet", "ssnet", "lvit"))
             + tuple(("dusss", r) for r in ("cct", "mcnet", "ssnet", "lvit", "cmitm", "asg", "mgca"))
             # the text-conditioned students at 100 % labels against the U-Net at 100 %
             + (("clipseg", "unet100"), ("vilt", "unet100")))


def row_contrasts(runs: pd.DataFrame, pairs: Iterable[tuple[str, str]] = CONTRASTS, *,
                  ratios: Iterable[float] | None = None, datasets: Iterable[str] | None = None) -> pd.DataFrame:
    """Table 1's comparisons as paired differences: Dice of row ``a`` minus row ``b`` per data set and label share.

    ``runs`` is :func:`load_runs`. One line per data set, pair and share of
    ``ratios`` (None = every share the runs have, :func:`_shares`); a row
    with a fixed share (the 100 % U-Net) is matched at that share to every
    share of the other row. ``ours``, ``ci_low``, ``ci_high``,
    ``half_width``, ``n_pairs``, ``seeds``, ``paper`` and ``same_sign`` are
    as in :func:`component_effects`; ``paper`` is NaN where the paper has no
    such row (the labelled-only U-Net, the CLIP-style VLM, shares other than
    25 % and 50 %); ``verdict`` is "a > b" / "a < b" when the interval
    excludes 0, else "no difference shown". ``datasets`` None = the data
    sets that have runs.
    """
    cols = ["dataset", "ratio", "row_a", "row_b", "label_a", "label_b"] + _DIFF_COLS
    ratios = _shares(runs) if ratios is None else sorted(float(q) for q in ratios)
    pairs = list(pairs)
    for row in dict.fromkeys(r for pair in pairs for r in pair):
        row_spec(row)  # an unknown row fails here, before any work
    out = []
    for dataset in _datasets(runs, datasets):
        for a, b in pairs:
            both_fixed = row_spec(a).ratio is not None and row_spec(b).ratio is not None
            for ratio in ratios[:1] if both_fixed else ratios:
                out.append({"dataset": dataset, "ratio": row_spec(a).ratio if both_fixed else ratio, "row_a": a,
                            "row_b": b, "label_a": ROWS[a].label, "label_b": ROWS[b].label,
                            **_difference(runs, dataset, a, b, ratio, "table1", ("a > b", "a < b"))})
    return pd.DataFrame(out, columns=cols)


def _pct(ratio: float) -> str:
    return f"{100 * ratio:g} %"


def _contrasts_markdown(contrasts: pd.DataFrame) -> str:
    """A line per (data set, pair), a column group per label share: ours Δ [95 % CI] (seeds), paper's Δ, verdict."""
    ratios = sorted(contrasts["ratio"].unique())
    head, rule = "| data set | comparison a − b (Dice) |", "|---|---|"
    for q in ratios:
        head += f" {_pct(q)}: ours [95 % CI] (seeds) | paper | verdict |"
        rule += "---|---|---|"
    lines = [head, rule]
    for (dataset, a, b), grp in contrasts.groupby(["dataset", "label_a", "label_b"], sort=False):
        g = grp.set_index("ratio")
        line = f"| {dataset} | {a} − {b} |"
        for q in ratios:
            if q not in g.index:
                line += " – | – | – |"
                continue
            r = g.loc[q]
            line += f" {_interval(r)} | {_signed(r['paper'])} | {r['verdict']} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def coverage(tables: Mapping[str, pd.DataFrame], seeds: Iterable[int]) -> str:
    """One Markdown paragraph: how many runs the tables hold and which cells lack some of ``seeds``.

    ``tables`` is :func:`render_tables`'s result. A cell is a (row, label
    share, data set); cells shown in both tables (Mean Teacher and DuSSS at
    50 %) are counted once. Lists every cell with a seed missing,
    by data set, with the seeds it has.
    """
    seeds = [int(s) for s in seeds]
    cells = pd.concat([tables["table1"], tables["table2"]], ignore_index=True)
    cells = cells.drop_duplicates(subset=["row", "ratio", "dataset"])
    n_runs = int(cells["n_seeds"].sum())
    want = " ".join(map(str, seeds))
    short = cells[cells["seeds"].apply(lambda s: not set(seeds) <= {int(x) for x in s.split()})]
    text = (f"**Coverage**: {n_runs} runs fill {len(cells)} cells (row, label share, data set) of the two tables; "
            f"the seeds asked for are {want}. ")
    if short.empty:
        return text + "Every cell has a run at every one of these seeds.\n"
    parts = []
    for dataset, grp in short.groupby("dataset", sort=False):
        items = [f"{r.label}{'' if row_spec(r.row).ratio is not None else f' {100 * r.ratio:.0f} %'} ({r.seeds or 'none'})"
                 for r in grp.itertuples()]
        parts.append(f"`{dataset}`: " + "; ".join(items))
    return text + f"{len(short)} cells lack a seed (the seeds they have in brackets): " + ". ".join(parts) + ".\n"


def complexity(cfg: Config | None = None, image_size: int = 224) -> dict[str, float]:
    """Parameters (M) and multiply-accumulates / FLOPs (G) of the segmentation U-Net on one ``image_size`` image.

    The one line under Table 1 (the U-Net every U-Net row tests with); counted
    by :func:`dusss.experiments.complexity.count_complexity` (2 FLOPs per
    multiply-add; ``gmacs`` is half of it), which also counts every other row
    (``python -m dusss complexity``). ``cfg`` None = the ``paper`` profile's
    U-Net (base 64), the network of the paper's Table 1. Beside them the
    paper's 14.75 M / 25.19 G.
    """
    cfg = cfg or make_config("paper")
    params, flops = count_complexity(build_unet(cfg), (torch.zeros(1, 3, image_size, image_size),))
    return {"unet_base": cfg.unet_base, "image_size": image_size, "params_m": params / 1e6,
            "gflops": flops / 1e9, "gmacs": flops / 2e9, "paper_params_m": 14.75, "paper_g": 25.19}


def plot_tables(tables: dict[str, Any]):
    """Bar chart with error bars (std over seeds): test Dice per row, one panel per (table, data set); paper as dots."""
    panels = [(name, d) for name in ("table1", "table2") for d in dict.fromkeys(tables[name]["dataset"])]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.2 * max(len(panels), 1), 3.6), squeeze=False)
    for ax, (name, d) in zip(axes[0], panels):
        s = tables[name][tables[name]["dataset"] == d]
        labels = [f"{r.label[:22]} {100 * r.ratio:.0f}%" for r in s.itertuples()]
        x = np.arange(len(s))
        ax.bar(x, s["dice_mean"].fillna(0), yerr=s["dice_std"].fillna(0), capsize=3, color="tab:blue",
               alpha=0.8, label="this project")
        ax.scatter(x, s["paper_dice"], color="tab:red", marker="D", s=16, zorder=3, label="paper")
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=6)
        ax.set(ylabel="test Dice (%)", title=f"{'Table 1' if name == 'table1' else 'Table 2'}: {d}", ylim=(0, 100))
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def plot_differences(tables: Mapping[str, Any]):
    """Forest plot of the differences: Table 1's contrasts and Table 2's component effects, ours with 95 % t-intervals.

    One panel per kind (``"contrasts"``, ``"effects"`` of :func:`render_tables`),
    one line per (data set, pair, label share): our mean paired difference
    with its 95 % t-interval over seeds (blue) and the paper's difference
    (red). A bar that does not cross 0 is a difference shown; one that does
    is "no difference shown". Lines without our delta are left out; lines
    from one seed have no bar.
    """
    def short(label: str) -> str:
        return label.split(" (")[0]

    kinds = (("contrasts", "Table 1: row a − row b",
              lambda r: f"{r.dataset} {_pct(r.ratio)}: {short(r.label_a)} − {short(r.label_b)}"),
             ("effects", "Table 2: one component switched on",
              lambda r: f"{r.dataset}: +{r.component} ({short(r.row_off)} → {short(r.row_on)})"))
    panels = []
    for key, title, name in kinds:
        d = tables.get(key)
        if d is not None and len(d):
            d = d.dropna(subset=["ours"])
            panels.append((title, d, [name(r) for r in d.itertuples()]))
    height = max([len(p[1]) for p in panels] + [1])
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(7.5 * max(len(panels), 1), 0.24 * height + 1.4),
                             squeeze=False)
    for ax, (title, d, names) in zip(axes[0], panels):
        y = np.arange(len(d))[::-1]
        err = np.vstack([d["ours"] - d["ci_low"], d["ci_high"] - d["ours"]])  # (2, lines)
        ax.errorbar(d["ours"], y, xerr=np.nan_to_num(err), fmt="o", color="tab:blue", ms=4, capsize=2,
                    label="this project: mean, 95 % t-interval over seeds")
        ax.scatter(d["paper"], y, color="tab:red", marker="D", s=16, zorder=3, label="paper")
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(y)
        ax.set_yticklabels(names, fontsize=6)
        ax.set(xlabel="Δ test Dice (points), paired by seed", title=title)
        ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return fig


EFFICIENCY_ROWS = ("unet", "mt", "dusss", "clip")  # the rows of the label-efficiency figure; U-Net 100 % is its ceiling


def label_efficiency(runs: pd.DataFrame, datasets: str | Iterable[str] | None = None,
                     rows: Iterable[str] = EFFICIENCY_ROWS) -> pd.DataFrame:
    """Test Dice (points) per data set, row and label share: mean and 95 % t-interval over seeds.

    ``runs`` is :func:`load_runs`. One line per (data set, row of ``rows``,
    label share the runs have, :func:`_shares`) that has a run, plus the
    100 % U-Net (``unet100``) at its share 1.0 as the reference every row
    would reach with all labels. Columns ``dataset``, ``row``, ``label``,
    ``ratio``, ``mean``, ``ci_low``, ``ci_high``, ``half_width``
    (:func:`dusss.stats.t_interval`; NaN below two seeds), ``n_seeds``,
    ``seeds``. ``datasets`` None = the data sets that have runs.
    """
    datasets = [datasets] if isinstance(datasets, str) else datasets
    cols = ["dataset", "row", "label", "ratio", "mean", "ci_low", "ci_high", "half_width", "n_seeds", "seeds"]
    out = []
    for dataset in _datasets(runs, datasets):
        for row in list(dict.fromkeys(rows)) + ["unet100"]:
            spec = row_spec(row)
            for ratio in [spec.ratio] if spec.ratio is not None else _shares(runs):
                sel = _row_runs(runs, row, ratio, dataset)
                if not len(sel):
                    continue
                ci = t_interval(100 * sel["test_dice"])
                out.append({"dataset": dataset, "row": row, "label": spec.label, "ratio": ratio, "mean": ci["mean"],
                            "ci_low": ci["ci_low"], "ci_high": ci["ci_high"], "half_width": ci["half_width"],
                            "n_seeds": ci["n"], "seeds": " ".join(str(int(s)) for s in sorted(sel["seed"]))})
    return pd.DataFrame(out, columns=cols)


def _plot_efficiency(eff: pd.DataFrame):
    """The figure of :func:`plot_label_efficiency` from :func:`label_efficiency`'s frame."""
    datasets = list(dict.fromkeys(eff["dataset"])) or ["no runs"]
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.4 * len(datasets), 3.4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        d = eff[eff["dataset"] == dataset]
        for row, g in d[d["row"] != "unet100"].groupby("row", sort=False):
            g = g.sort_values("ratio")
            (line,) = ax.plot(g["ratio"], g["mean"], marker="o", ms=3, label=g["label"].iloc[0])
            if g["half_width"].notna().any():
                ax.fill_between(g["ratio"], g["ci_low"], g["ci_high"], color=line.get_color(), alpha=0.15, lw=0)
        for r in d[d["row"] == "unet100"].itertuples():  # the ceiling: all labels, supervised
            ax.axhline(r.mean, color="0.3", ls="--", lw=0.8, label=r.label)
            ax.errorbar([r.ratio], [r.mean], yerr=None if pd.isna(r.half_width) else [[r.half_width]],
                        fmt="s", color="0.3", ms=4, capsize=2)
        shares = sorted(set(d["ratio"]))
        ax.set_xscale("log")
        ax.set_xticks(shares)
        ax.set_xticklabels([_pct(q) for q in shares])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set(xlabel="labelled share of the training set (log scale)", ylabel="test Dice (%)",
               title=f"{dataset} (paper: {PAPER_NAMES.get(dataset, '–')})")
        if len(d):
            ax.legend(fontsize=6, loc="best")
    fig.suptitle("Test Dice against label share: mean over seeds, band = 95 % t-interval", fontsize=9)
    fig.tight_layout()
    return fig


def plot_label_efficiency(runs: pd.DataFrame, datasets: str | Iterable[str] | None = None,
                          rows: Iterable[str] = EFFICIENCY_ROWS):
    """Test Dice against label share, one panel per data set: a line per row, mean and shaded 95 % t-band over seeds.

    ``runs`` is :func:`load_runs`; ``datasets`` one data set, several (one
    panel each, side by side) or None = every one that has runs. The x axis
    is logarithmic with a tick at every share present (e.g. 5, 10, 25, 50,
    100 %); the 100 % U-Net is a grey square with its interval at 100 % and a
    dashed line across the panel. A share with one seed has no band. A band
    is one row's spread over seeds; whether two rows differ is their paired
    interval (:func:`row_contrasts`), narrower where the seeds move both rows
    alike. The numbers are :func:`label_efficiency`'s. Returns the Figure.
    """
    return _plot_efficiency(label_efficiency(runs, datasets, rows))


def write_outputs(tables: dict[str, Any], profile: str, cx: dict[str, float] | None = None) -> dict[str, Path]:
    """CSV + Markdown of both tables to ``results/04_table{1,2}[_<profile>]``, the bar chart to ``figures/``.

    Table 2's component effects (:func:`component_effects`) go to
    ``results/04_table2_effects[_<profile>]`` and Table 1's contrasts
    (:func:`row_contrasts`) to ``results/04_table1_contrasts[_<profile>]``
    when ``tables`` has them, and the coverage paragraph (:func:`coverage`)
    to ``results/04_coverage[_<profile>].md``; their forest plot
    (:func:`plot_differences`) goes to ``figures/04_differences[_<profile>].png``.
    Dice against label share (``"efficiency"``, :func:`label_efficiency`)
    goes to ``results/04_label_efficiency[_<profile>].csv`` and its figure
    (:func:`plot_label_efficiency`) to ``figures/04_label_efficiency[_<profile>].png``.
    The Markdown of Table 1 ends with the complexity line (:func:`complexity`)
    when ``cx`` is given. Returns the written paths.
    """
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in ("table1", "table2"):
        stem = tagged(f"04_{name}", profile)
        tables[name].to_csv(out / f"{stem}.csv", index=False, float_format="%.4f")
        md = tables[f"{name}_md"]
        if name == "table1" and cx:
            md += (f"\nSegmentation network (all rows): U-Net base {cx['unet_base']} at {cx['image_size']}x"
                   f"{cx['image_size']}: {cx['params_m']:.2f} M parameters, {cx['gmacs']:.2f} GMACs = "
                   f"{cx['gflops']:.2f} GFLOPs (paper: {cx['paper_params_m']} M, {cx['paper_g']} G).\n")
        atomic_write_text(out / f"{stem}.md", md)
        paths[f"{name}_csv"], paths[f"{name}_md"] = out / f"{stem}.csv", out / f"{stem}.md"
    for key, name in (("effects", "04_table2_effects"), ("contrasts", "04_table1_contrasts")):
        if key in tables:
            stem = tagged(name, profile)
            tables[key].to_csv(out / f"{stem}.csv", index=False, float_format="%.4f")
            atomic_write_text(out / f"{stem}.md", tables.get(f"{key}_md", ""))
            paths[f"{key}_csv"], paths[f"{key}_md"] = out / f"{stem}.csv", out / f"{stem}.md"
    cov = out / f"{tagged('04_coverage', profile)}.md"
    if "coverage_md" in tables:
        atomic_write_text(cov, tables["coverage_md"])
        paths["coverage_md"] = cov
    else:
        cov.unlink(missing_ok=True)  # an older grid's coverage must not reach the results page with these tables
    fig = plot_tables(tables)
    paths["figure"] = save_figure(fig, tagged("04_tables", profile))
    plt.close(fig)
    if len(tables.get("contrasts", ())) or len(tables.get("effects", ())):
        fig = plot_differences(tables)
        paths["differences_figure"] = save_figure(fig, tagged("04_differences", profile))
        plt.close(fig)
    if len(tables.get("efficiency", ())):
        stem = tagged("04_label_efficiency", profile)
        tables["efficiency"].to_csv(out / f"{stem}.csv", index=False, float_format="%.4f")
        paths["efficiency_csv"] = out / f"{stem}.csv"
        fig = _plot_efficiency(tables["efficiency"])
        paths["efficiency_figure"] = save_figure(fig, stem)
        plt.close(fig)
    return paths


# kinds of work in a grid and how many of each one (data set, seed) needs
def grid_cost(seconds: Mapping[str, float], *, datasets: int, seeds: int,
              table1_rows: Iterable[str] = TABLE1_ROWS, table1_ratios: Iterable[float] = (0.25, 0.5),
              table2_rows: Iterable[str] = TABLE2_ROWS, table2_ratio: float = 0.5,
              parallel: int = 1) -> pd.DataFrame:
    """Cost of a grid from measured seconds per kind of run (``supervised``, ``mt``, ``bcp``, ``dusss``, ``pretrain``).

    Counts the distinct runs of :func:`run_grid` per kind for one data set and
    seed (one pre-training per distinct VLM switch combination), multiplies by
    ``seconds[kind]`` and by ``datasets * seeds``; returns one row per kind
    with ``runs``, ``seconds_each``, ``hours`` (the sum of the runs' times) and
    ``wall_hours`` (``hours / parallel``: the wall time with ``parallel`` runs at
    a time, when ``seconds`` were measured at that load) and a ``total`` row.
    A kind missing from ``seconds`` has NaN hours and makes the total's
    ``hours`` NaN (unknown); the total row's ``priced_hours`` sums the kinds
    that have seconds (a lower bound then) and ``unpriced_runs`` counts the runs
    of the kinds that have none.
    """
    names: dict[str, str] = {}
    vlms = set()
    for row, ratio in [(r, q) for r in table1_rows for q in table1_ratios] + [(r, table2_ratio) for r in table2_rows]:
        spec = row_spec(row)
        if spec.method is None:
            continue
        names[run_name(row, ratio, 0)] = spec.method
        if needs_vlm(row):
            vlms.add(tuple(sorted(spec.switches.items())))
    counts = pd.Series(list(names.values())).value_counts().to_dict()
    counts["pretrain"] = len(vlms)
    k = datasets * seeds
    rows = [{"kind": kind, "runs": n * k, "seconds_each": seconds.get(kind, float("nan")),
             "hours": n * k * seconds.get(kind, float("nan")) / 3600} for kind, n in sorted(counts.items())]
    df = pd.DataFrame(rows)
    total = pd.DataFrame([{"kind": "total", "runs": int(df["runs"].sum()), "seconds_each": float("nan"),
                           "hours": df["hours"].sum(min_count=len(df)), "priced_hours": float(df["hours"].sum()),
                           "unpriced_runs": int(df.loc[df["hours"].isna(), "runs"].sum())}])
    df = pd.concat([df, total], ignore_index=True)
    return df.assign(wall_hours=df["hours"] / max(int(parallel), 1))


def measured_seconds(profile: str, runs: pd.DataFrame | None = None) -> dict[str, float]:
    """Median seconds per kind of run at ``profile``, measured on this machine, for :func:`grid_cost`.

    Step-2 kinds (``supervised``, ``mt``, ``bcp``, ``ucmt``, ``dusss``): the
    median cost of the runs in ``runs`` (:func:`load_runs`, default: all of
    ``profile``), per run the larger of ``ssmis_seconds`` (wall time of the
    grid's call: data, text-map cache, training, testing; only part of the
    run when it resumed a partial one, near 0 when it adopted a finished one)
    and ``train_seconds`` (the training epochs over every call);
    ``pretrain``: the median ``seconds_this_call`` of the finished Step-1 runs
    under ``runs/pretrain/*-<profile>/`` that trained every epoch in one call.
    Kinds with no measurement are missing from the dict.
    """
    runs = load_runs(profile) if runs is None else runs
    wall = runs[["ssmis_seconds", "train_seconds"]].max(axis=1)
    out = {m: float(wall[g.index].median()) for m, g in runs.groupby("method")}
    pre = []
    for path in runs_dir().glob(f"pretrain/*-{profile}/*/metrics.json"):
        m = json.loads(path.read_text())
        cfg = json.loads((path.parent / "config.json").read_text()) if (path.parent / "config.json").is_file() else {}
        if m.get("seconds_this_call", 0) > 0 and m.get("epochs") == cfg.get("vlm_epochs", m.get("epochs")):
            pre.append(m["seconds_this_call"])
    if pre:
        out["pretrain"] = float(pd.Series(pre).median())
    return out


RESULTS_PAGE = "tables_generated"  # docs/<name>[_<profile>].md: the page write_results_page writes
GENERATED_NOTE = ("<!-- generated by dusss.experiments.tables.write_results_page (notebook 04): "
                  "edit the code, not this file -->")
# the charts of write_outputs that the page shows when they exist: (file stem, alt text)
PAGE_FIGURES = (("04_tables", "Tables 1 and 2 as bars"), ("04_differences", "paired differences, 95 % t-intervals"),
                ("04_label_efficiency", "test Dice against the label share"))


def _paper_rows_not_run() -> list[str]:
    """The paper's Table-1 methods no implemented row of :data:`dusss.runs.ROWS` trains (typed from the paper only)."""
    ours = {spec.paper1 for spec in ROWS.values() if spec.paper1 and spec.method}
    return [m for m in dict.fromkeys(paper_table1()["method"]) if m not in ours]


def _paper_rows_unmeasured(profile: str) -> list[str]:
    """The paper's Table-1 methods whose implemented row has no results file at ``profile`` on any data set
    (implemented, not yet run: their cells show the paper's numbers only)."""
    root = results_dir() / "runs"
    out = []
    for row, spec in ROWS.items():
        if not (spec.paper1 and spec.method):
            continue
        name = run_name(row, spec.ratio if spec.ratio is not None else 0.5, 0)  # <stem>-r<ratio>-s0
        stem, ratio = name.rsplit("-r", 1)[0], name.rsplit("-r", 1)[1].rsplit("-s", 1)[0]
        pattern = f"{stem}-r{ratio if spec.ratio is not None else '*'}-s*.json"
        if not any(root.glob(f"*-{profile}/{pattern}")):
            out.append(spec.paper1)
    return list(dict.fromkeys(out))


def write_results_page(profile: str = "demo", page: str | Path | None = None, *, extra: str = "") -> str:
    """Write the generated tables page (default ``docs/tables_generated[_<profile>].md``) and return its text.

    The page is rebuilt whole from ``results/`` on every call: a summary, the
    coverage paragraph (``04_coverage[_<profile>].md``) when it exists, Table 1
    (``04_table1``) with its paired differences (``04_table1_contrasts``) when
    they exist, the paper's Table-1 rows this project does not implement
    (:mod:`dusss.paper_tables`), Table 2 (``04_table2``) with its component
    effects (``04_table2_effects``), the charts of :func:`write_outputs` that
    exist, and ``extra``. Nothing else is written: the hand-written
    ``docs/results.md`` links to this page, and README.md is never touched.
    A missing table file raises ``FileNotFoundError`` naming the notebook that
    writes it.
    """
    page = Path(page) if page else repo_root() / "docs" / f"{tagged(RESULTS_PAGE, profile)}.md"
    res = results_dir()

    def source(path: Path) -> str:
        return f"`{path.relative_to(path.parents[1])}`"

    missing, unmeasured = _paper_rows_not_run(), _paper_rows_unmeasured(profile)
    parts = [f"# Tables 1 and 2, as measured ({profile} profile)\n\n{GENERATED_NOTE}\n",
             "This page is generated by `dusss.experiments.tables.write_results_page` (notebook 04 calls it) from the "
             f"per-run results files under `results/runs/<data set>-{profile}/`: the paper's Tables 1 and 2 rebuilt from this "
             "project's runs (mean ± sample std over seeds, the paper's number beside each cell) and the comparisons "
             "between rows as paired differences over seeds with 95 % t-intervals. A table is complete only when every "
             "row of the paper's is measured" + ("; the rows of the paper's Table 1 not measured here are listed "
                                                  "below Table 1" if missing or unmeasured else "")
             + ". How the runs are made and how to read them: [results.md](results.md).\n"]
    path = res / f"{tagged('04_coverage', profile)}.md"
    if path.is_file():
        parts.append(path.read_text().strip() + "\n")
    paired = ("paired by seed: our mean difference, its 95 % t-interval over seeds in brackets and the number of "
              "seeds in parentheses, beside the paper's; an interval that covers 0 is \"no difference shown\"")
    extras = {"table1": ("04_table1_contrasts", "**Table 1 as differences.** Dice of row a minus row b at the "
                         f"same label share (points), {paired}"),
              "table2": ("04_table2_effects", "**Does each component help?** Dice of the Table-2 row with the "
                         f"component minus the row without it (points), {paired}")}
    for name, title in (("table1", "Table 1 (comparison)"), ("table2", "Table 2 (ablation, 50 % labels)")):
        path = res / f"{tagged(f'04_{name}', profile)}.md"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; run notebooks/04_ablation.ipynb (profile {profile}) first")
        parts.append(f"## {title}\n\nTest Dice / mIoU (%), from {source(path)}:\n\n{path.read_text().strip()}\n")
        stem, intro = extras[name]
        path = res / f"{tagged(stem, profile)}.md"
        diffs = path.read_text().strip() if path.is_file() else ""
        if diffs:
            parts.append(f"{intro}, from {source(path)}:\n\n{diffs}\n")
        if name == "table1" and (missing or unmeasured):
            said = ([f"the paper's Table 1 rows {', '.join(missing)} have no implementation in this project"]
                    if missing else []) + ([f"the rows {', '.join(unmeasured)} are implemented but have no run at "
                                            f"the {profile} profile yet"] if unmeasured else [])
            said = "; ".join(said)
            parts.append(f"**Not measured here.** {said[0].upper() + said[1:]}: their numbers are only typed from the "
                         "paper (`dusss/paper_tables.py`), so Table 1 is not complete. The CLIP-style row above is "
                         "DuSSS's Step 2 guided by a VLM pre-trained with plain cross-modal InfoNCE; the paper's CLIP "
                         "row is the CLIPSeg row.\n")
    figures = [(figures_dir() / f"{tagged(stem, profile)}.png", alt) for stem, alt in PAGE_FIGURES]
    shown = [f"![{alt}]({Path(os.path.relpath(f, page.parent)).as_posix()})" for f, alt in figures if f.is_file()]
    if shown:
        parts.append("## Figures\n\n" + "\n".join(shown) + "\n")
    if extra.strip():
        parts.append(extra.strip() + "\n")
    text = "\n".join(parts)
    page.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(page, text)
    return text


def run(args, cfg: Config) -> int:
    """``python -m dusss tables``: fill the grid for ``cfg.dataset`` and ``cfg.seed`` at ``cfg.profile``, then render.

    Trains every missing run of both tables (all rows of :data:`dusss.runs.TABLE1_ROWS`
    and :data:`dusss.runs.TABLE2_ROWS`; hours at ``demo``), then re-renders the tables
    from every results file of the profile and writes them to ``results/`` and
    ``figures/``. Other ``--set`` keys pass through to every run.
    """
    overrides = {k: v for k, v in parse_overrides(args.overrides).items() if k not in ("dataset", "seed")}
    run_grid(cfg.profile, [cfg.dataset], [cfg.seed], overrides=overrides, run_missing=True)
    runs = load_runs(cfg.profile)
    tables = render_tables(runs, seeds=sorted(set(runs["seed"])))  # coverage: cells lacking a seed some run has
    paths = write_outputs(tables, cfg.profile, complexity())
    print(tables["table1_md"])
    print(tables["table2_md"])
    print("written:", ", ".join(str(p) for p in paths.values()))
    return 0
