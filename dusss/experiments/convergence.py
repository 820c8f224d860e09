"""Convergence of the testbed's Step-2 runs: validation Dice per epoch, from the per-run results files.

Issue 16 asks for a budget long enough that validation Dice has plateaued for
every method, and for the curves that show it. Each grid run's results file
(``results/runs/<set>-<profile>/<run>.json``) carries the run's per-epoch
``history`` (:data:`HISTORY_COLUMNS`, read from the run folder's
``history.csv`` by :func:`read_history`), so the curves are redrawn from
committed files without the (uncommitted) run folders:

- :func:`attach_histories` adds the history to results files written before
  it was kept there, from their run folders where those exist;
- :func:`load_histories` is the long table (row, share, seed, epoch, ...);
- :func:`convergence_summary` says per row and share how many runs stopped
  early (validation Dice did not improve for ``patience`` epochs: a plateau)
  and how many were still improving at their last epoch;
- :func:`plot_convergence` draws validation and teacher pseudo-label Dice per
  epoch, one panel per share, one colour per row (thin: seeds; thick: mean
  over the seeds still running at that epoch).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import matplotlib.pyplot as plt

from ..paths import results_dir
from ..runs import ROWS, row_spec
from ..utils import atomic_write_json, repo_root

__all__ = ["HISTORY_COLUMNS", "read_history", "attach_histories", "load_histories", "convergence_summary",
           "pseudo_label_summary", "plot_convergence"]

# kept per epoch in each results file: the learning rate, validation Dice and the pseudo-label diagnostics (Dice of
# the teacher's, the text-guided and the merged labels of the unlabelled images against their hidden masks)
HISTORY_COLUMNS = ("epoch", "lr", "val_dice", "diag_teacher_dice", "diag_text_dice", "diag_merged_dice")


def read_history(folder: str | Path) -> dict[str, list[float]]:
    """:data:`HISTORY_COLUMNS` of ``folder/history.csv`` as lists (NaN where a run has no value, e.g. no
    teacher); ``{}`` when the folder has no history."""
    path = Path(folder) / "history.csv"
    if not path.is_file():
        return {}
    frame = pd.read_csv(path)
    return {c: [float(v) for v in frame[c]] if c in frame else [float("nan")] * len(frame) for c in HISTORY_COLUMNS}


def _folder(result: dict) -> Path:
    out = Path(result.get("out_dir", ""))
    return out if out.is_absolute() else repo_root() / out


def attach_histories(profile: str, datasets: Iterable[str] | None = None) -> int:
    """Add ``history`` to every results file of ``profile`` that lacks it (or lacks a column of
    :data:`HISTORY_COLUMNS`), read from its run folder's
    ``history.csv`` (``out_dir`` in the file); returns how many files were updated. Files whose run folder is
    not on this machine are left as they are."""
    root = results_dir() / "runs"
    updated = 0
    for folder in sorted(root.glob(f"*-{profile}")) if root.is_dir() else []:
        if datasets is not None and folder.name[: -len(profile) - 1] not in set(datasets):
            continue
        for path in sorted(folder.glob("*.json")):
            result = json.loads(path.read_text())
            if set(HISTORY_COLUMNS) <= set(result.get("history") or {}) or not result.get("out_dir"):
                continue
            history = read_history(_folder(result))
            if history and len(history["epoch"]) == int(result.get("epochs_run", len(history["epoch"]))):
                atomic_write_json(path, {**result, "history": history})
                updated += 1
    return updated


def _row_of(result: dict, stem: str) -> str:
    """The table row a results file belongs to: its ``row`` key, else the method's unique row."""
    if result.get("row"):
        return str(result["row"])
    rows = [r for r, spec in ROWS.items() if spec.method == result["method"] and not spec.switches]
    return rows[0] if rows else stem


def load_histories(profile: str, dataset: str, rows: Iterable[str] | None = None) -> pd.DataFrame:
    """One line per (row, share, seed, epoch) of the runs of ``dataset`` at ``profile`` that carry a history:
    columns ``row``, ``label``, ``ratio``, ``seed``, ``epoch``, ``val_dice``, ``teacher_dice``, ``text_dice``,
    ``merged_dice`` (points; NaN where a method has no such label),
    ``lr``, ``best_epoch``, ``epochs_run``, ``stopped_early``. ``rows`` None = every row."""
    folder = results_dir() / "runs" / f"{dataset}-{profile}"
    keep = None if rows is None else set(rows)
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        result = json.loads(path.read_text())
        history = result.get("history")
        row = _row_of(result, path.stem)
        if not history or (keep is not None and row not in keep):
            continue
        label = row_spec(row).label if row in ROWS else row
        for i, epoch in enumerate(history["epoch"]):
            out.append({"row": row, "label": label, "ratio": float(result["ratio"]), "seed": int(result["seed"]),
                        "epoch": int(epoch), "val_dice": 100 * history["val_dice"][i],
                        "teacher_dice": 100 * history["diag_teacher_dice"][i],
                        "text_dice": 100 * history.get("diag_text_dice", [float("nan")] * len(history["epoch"]))[i],
                        "merged_dice": 100 * history.get("diag_merged_dice", [float("nan")] * len(history["epoch"]))[i],
                        "lr": history["lr"][i],
                        "best_epoch": int(result.get("best_epoch", -1)), "epochs_run": int(result["epochs_run"]),
                        "stopped_early": bool(result.get("stopped_early", False))})
    cols = ["row", "label", "ratio", "seed", "epoch", "val_dice", "teacher_dice", "text_dice", "merged_dice", "lr",
            "best_epoch", "epochs_run", "stopped_early"]
    return pd.DataFrame(out, columns=cols)


def convergence_summary(hist: pd.DataFrame) -> pd.DataFrame:
    """Per (row, share): runs, how many stopped early (a plateau: no validation gain for ``patience`` epochs),
    how many had their best epoch at their last one (still improving when the budget ran out), the median
    best and last epoch, and the mean validation gain over each run's last three epochs (points)."""
    cols = ["row", "label", "ratio", "runs", "stopped_early", "best_at_last_epoch", "median_best_epoch",
            "median_epochs_run", "gain_last3"]
    out = []
    for (row, ratio), g in hist.groupby(["row", "ratio"], sort=False):
        runs = g.groupby("seed")
        per = runs.agg(best=("best_epoch", "first"), last=("epochs_run", "first"), early=("stopped_early", "first"))
        gains = [s.sort_values("epoch")["val_dice"].iloc[-1] - s.sort_values("epoch")["val_dice"].iloc[-4]
                 for _, s in runs if len(s) >= 4]
        out.append({"row": row, "label": g["label"].iloc[0], "ratio": ratio, "runs": len(per),
                    "stopped_early": int(per["early"].sum()), "best_at_last_epoch": int((per["best"] == per["last"]).sum()),
                    "median_best_epoch": float(per["best"].median()), "median_epochs_run": float(per["last"].median()),
                    "gain_last3": float(np.mean(gains)) if gains else float("nan")})
    return pd.DataFrame(out, columns=cols).sort_values(["ratio", "row"], kind="stable").reset_index(drop=True)


def pseudo_label_summary(hist: pd.DataFrame) -> pd.DataFrame:
    """Per (row, share): the mean over seeds, at each run's best epoch, of validation Dice and of the Dice of
    the teacher's, the text-guided and the merged pseudo labels of the unlabelled images (points; NaN for a
    label a method does not make), and the runs counted. Why a semi-supervised row wins or loses is read here:
    a text-guided mask below the teacher's label pulls the merged label down."""
    cols = ["row", "label", "ratio", "runs", "val_dice", "teacher_dice", "text_dice", "merged_dice"]
    best = hist[hist["epoch"] == hist["best_epoch"]]
    out = []
    for (row, ratio), g in best.groupby(["row", "ratio"], sort=False):
        out.append({"row": row, "label": g["label"].iloc[0], "ratio": ratio, "runs": int(g["seed"].nunique()),
                    **{k: float(g[k].mean()) for k in cols[4:]}})
    return pd.DataFrame(out, columns=cols).sort_values(["ratio", "row"], kind="stable").reset_index(drop=True)


def plot_convergence(hist: pd.DataFrame, title: str = ""):
    """Validation Dice (top) and the teacher's pseudo-label Dice on the unlabelled images (bottom) per epoch,
    one column per label share, one colour per row: thin lines the seeds, thick the mean over the seeds still
    running at that epoch (early-stopped runs drop out)."""
    shares = sorted(hist["ratio"].unique()) or [float("nan")]
    fig, axes = plt.subplots(2, len(shares), figsize=(3.8 * len(shares), 5.6), squeeze=False, sharex=True)
    colours = {row: f"C{i}" for i, row in enumerate(dict.fromkeys(hist["row"]))}
    for j, ratio in enumerate(shares):
        d = hist[hist["ratio"] == ratio]
        for i, key in enumerate(("val_dice", "teacher_dice")):
            ax = axes[i, j]
            for row, g in d.groupby("row", sort=False):
                if g[key].isna().all():
                    continue
                for _, s in g.groupby("seed"):
                    ax.plot(s["epoch"], s[key], color=colours[row], lw=0.6, alpha=0.35)
                mean = g.groupby("epoch")[key].mean()
                ax.plot(mean.index, mean.values, color=colours[row], lw=2, label=g["label"].iloc[0])
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(f"{ratio:.0%} labels" if ratio == ratio else "no runs")
            if j == 0:
                ax.set_ylabel("validation Dice" if key == "val_dice" else "teacher pseudo-label Dice")
            if i == 1:
                ax.set_xlabel("epoch")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    for ax in axes[0, 1:]:
        h, lab = ax.get_legend_handles_labels()
        for hh, ll in zip(h, lab):
            if ll not in labels:
                handles.append(hh)
                labels.append(ll)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
    fig.suptitle(title or "Convergence of the Step-2 runs", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    return fig
