"""The Step-2 consistency-recipe study (issue 20): which perturbation, consistency form, weight and ramp make Mean
Teacher beat the labelled-only U-Net where labels are scarce, judged on the **validation** split only.

``python -m dusss study --datasets qata-synth nuclei-real --seeds 666-668 --workers 2``

Each recipe (:data:`RECIPES`) is a set of Step-2 config values; it trains
``mt`` at the testbed's lowest share (:data:`dusss.experiments.grid.LOWEST_SHARE`)
beside the labelled-only U-Net of the same seed (the grid's own run, shared).
A run's file ``results/study/<dataset>-<profile>/<recipe>-s<seed>.json`` holds
its validation Dice, its per-epoch validation and teacher pseudo-label Dice
and the decline flag; runs whose file exists are skipped and interrupted runs
resume, like the grid. :func:`summarise` gives each recipe's paired difference
of best-checkpoint validation Dice from labelled-only with its 95 %
t-interval; :func:`choose` picks the recipe with the highest mean difference
over both data sets. Test Dice is kept in the files but never read here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import pandas as pd

from ..config import Config, make_config, parse_overrides
from ..paths import results_dir, runs_dir, tagged
from ..plotting import save_figure
from ..runs import run_file
from ..ssmis import train_ssmis
from ..stats import paired_difference
from ..utils import atomic_write_json, atomic_write_text, get_logger
from .grid import LOWEST_SHARE, _in_pool, _run_job, parse_seeds

__all__ = ["RECIPES", "study_file", "run_recipe", "run_study", "load_study", "summarise", "choose", "plot_curves",
           "summary_markdown", "confirm", "write_outputs", "run"]

log = get_logger(__name__)

# name -> Step-2 settings; "previous" is the loop as it was before issue 20 (no perturbation, BCE, weight 1, ramp 2)
RECIPES: dict[str, dict] = {
    "previous": dict(perturb="none", cons_loss="bce", cons_weight=1.0, rampup_epochs=2.0),
    "bce-w1-noise": dict(perturb="noise", noise_std=0.1, cons_loss="bce", cons_weight=1.0, rampup_epochs=2.0),
    "mse-w0.1-none": dict(perturb="none", cons_loss="mse", cons_weight=0.1, rampup_epochs=20.0),
    "mse-w0.1-noise": dict(perturb="noise", noise_std=0.1, cons_loss="mse", cons_weight=0.1, rampup_epochs=20.0),
    "mse-w1-noise": dict(perturb="noise", noise_std=0.1, cons_loss="mse", cons_weight=1.0, rampup_epochs=20.0),
    "mse-w0.1-noise0.3": dict(perturb="noise", noise_std=0.3, cons_loss="mse", cons_weight=0.1, rampup_epochs=20.0),
    "mse-w0.1-strong": dict(perturb="strong", noise_std=0.1, cons_loss="mse", cons_weight=0.1, rampup_epochs=20.0),
    "bce-w0.1-noise": dict(perturb="noise", noise_std=0.1, cons_loss="bce", cons_weight=0.1, rampup_epochs=20.0),
    "mse-w0.1-noise-sepbn": dict(perturb="noise", noise_std=0.1, cons_loss="mse", cons_weight=0.1, rampup_epochs=20.0,
                                 bn_batch="separate"),
    "mse-w0.1-none-sepbn": dict(perturb="none", cons_loss="mse", cons_weight=0.1, rampup_epochs=20.0,
                                bn_batch="separate"),
    "mse-w1-noise-sepbn": dict(perturb="noise", noise_std=0.1, cons_loss="mse", cons_weight=1.0, rampup_epochs=20.0,
                               bn_batch="separate"),
    "bce-w1-noise-sepbn": dict(perturb="noise", noise_std=0.1, cons_loss="bce", cons_weight=1.0, rampup_epochs=2.0,
                               bn_batch="separate"),
}


def study_file(profile: str, dataset: str, recipe: str, seed: int):
    return results_dir() / "study" / f"{dataset}-{profile}" / f"{recipe}-s{seed}.json"


def _recipe_config(profile: str, dataset: str, recipe: str, seed: int, overrides: dict) -> Config:
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    out = runs_dir() / "study" / f"{dataset}-{profile}" / f"{recipe}-s{seed}"
    return make_config(profile, {**overrides, **RECIPES[recipe]}, dataset=dataset, method="mt", ratio=LOWEST_SHARE,
                       seed=seed, out_dir=str(out))


def run_recipe(profile: str, dataset: str, recipe: str, seed: int, overrides: dict | None = None) -> dict:
    """Train (or reuse) one recipe run; returns and writes its study file."""
    path = study_file(profile, dataset, recipe, seed)
    if path.is_file():
        return json.loads(path.read_text())
    cfg = _recipe_config(profile, dataset, recipe, seed, dict(overrides or {}))
    metrics = train_ssmis(cfg, progress=False)
    history = pd.read_csv(cfg.out_dir + "/history.csv")
    result = {**metrics, "recipe": recipe, "settings": RECIPES[recipe],
              "curve_val_dice": history["val_dice"].tolist(),
              "curve_teacher_dice": history["diag_teacher_dice"].tolist()}
    atomic_write_json(path, result)
    return result


def _recipe_job(profile, dataset, recipe, seed, overrides, threads):
    return run_recipe(profile, dataset, recipe, seed, {**overrides, "num_threads": threads})


def _study_job(profile, dataset, name, seed, overrides, threads):
    """One job of the study's pool: the labelled-only grid run (``name`` = ``"labelled-only"``) or a recipe run."""
    if name == "labelled-only":
        return _run_job(profile, dataset, "unet", LOWEST_SHARE, seed, overrides, threads)
    return _recipe_job(profile, dataset, name, seed, overrides, threads)


def run_study(profile: str, datasets: Iterable[str], seeds: Iterable[int], recipes: Iterable[str] = tuple(RECIPES),
              *, workers: int = 1, overrides: dict | None = None) -> None:
    """Every missing labelled-only baseline (a grid run, shared with the grid) and recipe run, ``workers`` at a time
    in one pool, so no worker waits for the baselines."""
    seeds, datasets, recipes = list(seeds), list(datasets), list(recipes)
    todo = [(d, "labelled-only", s) for s in seeds for d in datasets
            if not run_file(profile, d, "unet", LOWEST_SHARE, s).is_file()]
    todo += [(d, r, s) for s in seeds for d in datasets for r in recipes if not study_file(profile, d, r, s).is_file()]
    _in_pool(_study_job, profile, todo, dict(overrides or {}), workers, "study runs")


def load_study(profile: str) -> pd.DataFrame:
    """Every recipe run plus the labelled-only runs of the same seeds at the lowest share, one row per run."""
    rows = []
    for path in sorted((results_dir() / "study").glob(f"*-{profile}/*.json")):
        m = json.loads(path.read_text())
        rows.append({"dataset": m["dataset"], "recipe": m["recipe"], "seed": m["seed"], "val_dice": m["val_dice"],
                     "best_epoch": m["best_epoch"], "decline": m.get("pseudo_label_decline", False),
                     "curve_val_dice": m["curve_val_dice"], "curve_teacher_dice": m["curve_teacher_dice"],
                     "test_dice": m["test_dice"]})
    study = pd.DataFrame(rows, columns=["dataset", "recipe", "seed", "val_dice", "best_epoch", "decline",
                                        "curve_val_dice", "curve_teacher_dice", "test_dice"])
    for dataset in sorted(set(study["dataset"])):
        for seed in sorted(set(study.loc[study["dataset"] == dataset, "seed"])):
            path = run_file(profile, dataset, "unet", LOWEST_SHARE, seed)
            if path.is_file():
                m = json.loads(path.read_text())
                study.loc[len(study)] = [dataset, "labelled-only", seed, m["val_dice"], m["best_epoch"], False,
                                         None, None, m["test_dice"]]
    return study


def summarise(study: pd.DataFrame) -> pd.DataFrame:
    """Per data set and recipe: validation Dice (points) minus labelled-only, paired by seed, with its 95 % interval."""
    out = []
    for dataset, grp in study.groupby("dataset"):
        base = grp[grp["recipe"] == "labelled-only"].assign(test_dice=lambda d: d["val_dice"])
        for recipe, runs in grp[grp["recipe"] != "labelled-only"].groupby("recipe"):
            d = paired_difference(runs.assign(test_dice=runs["val_dice"]), base)
            out.append({"dataset": dataset, "recipe": recipe, "val_dice": 100 * runs["val_dice"].mean(),
                        "minus_labelled_only": d["mean"], "ci_low": d["ci_low"], "ci_high": d["ci_high"],
                        "n_pairs": d["n_pairs"], "declines": int(runs["decline"].sum()),
                        "mean_best_epoch": runs["best_epoch"].mean()})
    return pd.DataFrame(out, columns=["dataset", "recipe", "val_dice", "minus_labelled_only", "ci_low", "ci_high",
                                      "n_pairs", "declines", "mean_best_epoch"])


def choose(summary: pd.DataFrame) -> str:
    """The recipe with the highest mean (over data sets) validation gain over labelled-only."""
    if summary.empty:
        raise ValueError("no recipe runs yet; run `python -m dusss study` first")
    return str(summary.groupby("recipe")["minus_labelled_only"].mean().idxmax())


def confirm(study: pd.DataFrame, recipe: str) -> pd.DataFrame:
    """The chosen ``recipe``'s **test** Dice minus labelled-only per data set, paired by seed, with its 95 % interval.

    The one place the study reads test Dice: for the recipe :func:`choose` picked
    on validation, never to pick it. Run the recipe on more seeds (``--recipes
    <recipe> --seeds ...``) to narrow the interval.
    """
    out = []
    for dataset, grp in study.groupby("dataset"):
        runs, base = grp[grp["recipe"] == recipe], grp[grp["recipe"] == "labelled-only"]
        if len(runs):
            d = paired_difference(runs, base)
            out.append({"dataset": dataset, "recipe": recipe, "test_dice": 100 * runs["test_dice"].mean(),
                        "labelled_only": 100 * base[base["seed"].isin(runs["seed"])]["test_dice"].mean(),
                        "minus_labelled_only": d["mean"], "ci_low": d["ci_low"], "ci_high": d["ci_high"],
                        "n_pairs": d["n_pairs"], "seeds": ",".join(str(s) for s in sorted(runs["seed"]))})
    return pd.DataFrame(out, columns=["dataset", "recipe", "test_dice", "labelled_only", "minus_labelled_only",
                                      "ci_low", "ci_high", "n_pairs", "seeds"])


def plot_curves(study: pd.DataFrame):
    """Validation Dice and teacher pseudo-label Dice per epoch, mean over the seeds still running at that epoch (runs
    stop early), one line per recipe (solid: separate BatchNorm batches, dotted: joint), per data set."""
    import matplotlib.pyplot as plt

    datasets = sorted(set(study["dataset"]))
    fig, axes = plt.subplots(2, max(len(datasets), 1), figsize=(5 * max(len(datasets), 1), 6), squeeze=False)
    for j, dataset in enumerate(datasets):
        grp = study[(study["dataset"] == dataset) & (study["recipe"] != "labelled-only")]
        for recipe, runs in grp.groupby("recipe"):
            for i, key in enumerate(("curve_val_dice", "curve_teacher_dice")):
                curves = pd.DataFrame(runs[key].tolist()).mean(axis=0)
                separate = RECIPES.get(recipe, {}).get("bn_batch") == "separate"  # solid: two BatchNorm batches
                axes[i, j].plot(range(1, len(curves) + 1), 100 * curves, label=recipe, ls="-" if separate else ":",
                                lw=2.0 if separate else 1.2)
        base = study[(study["dataset"] == dataset) & (study["recipe"] == "labelled-only")]
        if len(base):
            axes[0, j].axhline(100 * base["val_dice"].mean(), color="k", ls="--", label="labelled-only (best)")
        axes[0, j].set(title=f"{dataset}: validation Dice", xlabel="epoch", ylabel="Dice")
        axes[1, j].set(title=f"{dataset}: teacher pseudo-label Dice", xlabel="epoch", ylabel="Dice")
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    return fig


def run(args, cfg: Config) -> int:
    """``python -m dusss study``: run the missing recipe runs, then print the summary and the chosen recipe."""
    overrides = {k: v for k, v in parse_overrides(args.overrides).items()
                 if k not in ("dataset", "seed", "ratio", "method")}
    run_study(cfg.profile, args.datasets, parse_seeds(args.seeds), args.recipes or tuple(RECIPES),
              workers=args.workers, overrides=overrides)
    write_outputs(cfg.profile)
    return 0


def summary_markdown(summary: pd.DataFrame) -> str:
    """The summary as a Markdown table, best recipe first per data set, each with its settings and interval."""
    lines = ["| data set | recipe | settings | val Dice | minus labelled-only [95 % CI] | seeds | declines |",
             "|---|---|---|---|---|---|---|"]
    for _, r in summary.sort_values(["dataset", "minus_labelled_only"], ascending=[True, False]).iterrows():
        ci = ("n/a (one seed)" if r["n_pairs"] < 2 else f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]")
        settings = ", ".join(f"{k}={v}" for k, v in RECIPES.get(r["recipe"], {}).items())
        lines.append(f"| {r['dataset']} | `{r['recipe']}` | {settings} | {r['val_dice']:.2f} | "
                     f"{r['minus_labelled_only']:+.2f} {ci} | {int(r['n_pairs'])} | {int(r['declines'])} |")
    return "\n".join(lines) + "\n"


def write_outputs(profile: str) -> dict[str, Path]:
    """``results/study_summary[_profile].csv`` and ``.md`` and ``figures/study_curves[_profile].png`` from the
    study's results files; prints the table and the chosen recipe. Returns the paths."""
    study = load_study(profile)
    summary = summarise(study)
    path = results_dir() / f"{tagged('study_summary', profile)}.csv"
    summary.to_csv(path, index=False)
    atomic_write_text(path.with_suffix(".md"), summary_markdown(summary))
    figure = save_figure(plot_curves(study), tagged("study_curves", profile))
    chosen = choose(summary)
    check = results_dir() / f"{tagged('study_confirm', profile)}.csv"
    confirm(study, chosen).to_csv(check, index=False)
    print(summary.to_string(index=False))
    print(f"chosen recipe (highest mean validation gain over labelled-only): {chosen} -> {path}")
    print(f"its test Dice minus labelled-only -> {check}")
    return {"csv": path, "markdown": path.with_suffix(".md"), "figure": figure, "confirm": check}
