"""Tables 1 and 2 of the paper, rebuilt from this project's runs and shown beside the paper's numbers.

The grid: every (row, label ratio, data set, seed) is one Step-2 run
(:func:`dusss.ssmis.train_ssmis`), preceded for text-guided rows by the Step-1
pre-training with that row's loss switches (:func:`dusss.pretrain.pretrain`;
each switch combination has its own folder, :func:`dusss.paths.vlm_variant`).
:func:`run_grid` writes one small JSON per run under
``results/runs/<dataset>-<profile>/`` (the run's ``metrics.json`` plus the
row, the VLM's switches and the seconds spent) and reuses those files unless
told to re-run, so a long grid can be filled over several sittings and the
tables re-rendered at once from whatever exists. :func:`render_tables` turns
those files into Table 1 and Table 2 (mean ± std over seeds, the paper's
numbers beside them: :mod:`dusss.paper_tables`), :func:`write_outputs` writes
CSV + Markdown to ``results/`` and a bar chart to ``figures/``, and
:func:`write_readme_section` pastes the Markdown into the README between
generated-block markers.

Rows (``ROWS``): Table 1 = U-Net at 100 % labels, U-Net on the labelled part
only, Mean Teacher, BCP (:mod:`dusss.baselines`), a CLIP-style VLM (DuSSS's
Step 2 with a VLM pre-trained by plain cross-modal InfoNCE: SSS, IMC and
``L_tg`` off) and DuSSS; BCP and a simplified UCMT come from
:mod:`dusss.baselines`. Table 2 = the seven switch combinations of the paper at 50 %
labels; its baseline (no SSS, no DCL, no ``L_tg``) is the Mean Teacher run and
its last row the DuSSS run, shared with Table 1.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from .config import Config, make_config, parse_overrides
from .paths import default_vlm_checkpoint, results_dir, tagged
from .utils import atomic_write_json, atomic_write_text, get_logger, repo_root

__all__ = ["RowSpec", "ROWS", "TABLE1_ROWS", "TABLE2_ROWS", "PAPER_NAMES", "run_name", "run_file", "run_one",
           "run_grid", "load_runs", "summarise", "render_tables", "complexity", "write_outputs", "plot_tables",
           "grid_cost", "measured_seconds", "write_readme_section", "PRETRAIN_RATIO", "COMPONENTS", "PAPER_ONLY",
           "component_effects", "row_contrasts", "CONTRASTS", "coverage",
           "plot_differences"]

log = get_logger(__name__)

PRETRAIN_RATIO = 0.25  # VLMs are pre-trained on the 25 % labelled split, which lies inside every larger split
PAPER_NAMES = {"qata-synth": "QaTa-COV19", "qata": "QaTa-COV19", "nuclei-real": "MoNuSeg", "monuseg": "MoNuSeg",
               "bmseg": "BM-Seg"}  # our data set -> the paper's column it stands in for
_PAPER_KEY = {"QaTa-COV19": "qata", "BM-Seg": "bmseg", "MoNuSeg": "monuseg"}
PAPER_ONLY = ("BM-Seg",)  # the paper's data sets with no embedded stand-in: shown as paper-only columns


@dataclass(frozen=True)
class RowSpec:
    """One row of Table 1 or 2: how to train it (``method`` + VLM switches) and where the paper's numbers are.

    ``method`` None = not implemented (the row shows the paper's numbers only);
    ``ratio`` fixes the label share (U-Net 100 %); ``paper1`` is the method's
    name in the paper's Table 1, ``paper2`` its ``(sss, dcl, tg)`` in Table 2.
    """

    label: str
    method: str | None
    switches: Mapping[str, bool] = field(default_factory=dict)
    ratio: float | None = None
    paper1: str | None = None
    paper2: tuple[int, int, int] | None = None


def _vlm(sss: bool, imc: bool, tg: bool) -> dict[str, bool]:
    return {"use_sss": sss, "use_cmc": True, "use_imc": imc, "use_tg": tg}


ROWS: dict[str, RowSpec] = {
    "unet100": RowSpec("U-Net, 100 % labels", "supervised", ratio=1.0, paper1="U-Net"),
    "unet": RowSpec("U-Net, labelled part only", "supervised"),
    "mt": RowSpec("Mean Teacher", "mt", paper1="MT", paper2=(0, 0, 0)),
    "bcp": RowSpec("BCP", "bcp", paper1="BCP"),
    "ucmt": RowSpec("UCMT (simplified)", "ucmt", paper1="UCMT"),
    "clip": RowSpec("CLIP-style VLM + text-guided SSMIS", "dusss", _vlm(False, False, False)),
    "sss": RowSpec("SSS", "dusss", _vlm(True, False, False), paper2=(1, 0, 0)),
    "dcl": RowSpec("DCL", "dusss", _vlm(False, True, False), paper2=(0, 1, 0)),
    "sss+tg": RowSpec("SSS + L_tg", "dusss", _vlm(True, False, True), paper2=(1, 0, 1)),
    "dcl+tg": RowSpec("DCL + L_tg", "dusss", _vlm(False, True, True), paper2=(0, 1, 1)),
    "sss+dcl": RowSpec("SSS + DCL", "dusss", _vlm(True, True, False), paper2=(1, 1, 0)),
    "dusss": RowSpec("DuSSS (SSS + DCL + L_tg)", "dusss", _vlm(True, True, True), paper1="DuSSS", paper2=(1, 1, 1)),
}
TABLE1_ROWS = ("unet100", "unet", "mt", "bcp", "ucmt", "clip", "dusss")
TABLE2_ROWS = ("mt", "sss", "dcl", "sss+tg", "dcl+tg", "sss+dcl", "dusss")


def _spec(row: str) -> RowSpec:
    if row not in ROWS:
        raise ValueError(f"unknown table row {row!r}; choose from {', '.join(ROWS)}")
    return ROWS[row]


def run_name(row: str, ratio: float, seed: int) -> str:
    """File stem of one run: ``<method>[-<vlm variant>]-r<ratio>-s<seed>``, shared by rows that train the same thing.

    Table 2's baseline and Table 1's Mean Teacher are one run; so are the two
    DuSSS rows.
    """
    spec = _spec(row)
    ratio = spec.ratio if spec.ratio is not None else ratio
    variant = ""
    if spec.method == "dusss":
        s = spec.switches
        variant = f"-sss{int(s['use_sss'])}-cmc{int(s['use_cmc'])}-imc{int(s['use_imc'])}-tg{int(s['use_tg'])}"
    return f"{spec.method}{variant}-r{ratio:g}-s{seed}"


def run_file(profile: str, dataset: str, row: str, ratio: float, seed: int) -> Path:
    """``results/runs/<dataset>-<profile>/<run_name>.json``: the run's saved results."""
    return results_dir() / "runs" / f"{dataset}-{profile}" / f"{run_name(row, ratio, seed)}.json"


def _config(profile: str, dataset: str, row: str, ratio: float, seed: int, overrides: Mapping[str, Any]) -> Config:
    """The run's config. Text-guided rows train in a folder named by their VLM switches
    (``dusss-sss1-cmc1-imc0-tg1-r0.5-s666``): :func:`dusss.paths.ssmis_dir` names a run by
    method, ratio and seed only, so rows that differ only in their VLM would otherwise share
    one folder and each would retrain over the other's finished run."""
    from .paths import ssmis_dir

    spec = _spec(row)
    ratio = spec.ratio if spec.ratio is not None else ratio
    cfg = make_config(profile, dict(overrides), dataset=dataset, method=spec.method, ratio=ratio, seed=seed,
                      **spec.switches)
    if spec.method == "dusss" and not cfg.out_dir:
        cfg = cfg.replace(out_dir=str(ssmis_dir(cfg).parent / run_name(row, ratio, seed)))
    return cfg


def run_one(profile: str, dataset: str, row: str, ratio: float, seed: int, *,
            overrides: Mapping[str, Any] | None = None, rerun: bool = False, progress: bool = False) -> dict:
    """Train (or reuse) one run of the grid and return its results dict (also written to :func:`run_file`).

    An existing results file is returned as it is unless ``rerun``. Otherwise a
    text-guided row first pre-trains its VLM if the checkpoint of its switches
    is missing (on the :data:`PRETRAIN_RATIO` split, so one VLM serves 25 % and
    50 %), then :func:`dusss.ssmis.train_ssmis` trains the segmentation network
    (``rerun`` retrains it from scratch; a finished run folder is otherwise
    reused). The file holds the run's ``metrics.json`` plus ``row``,
    ``switches``, ``pretrain_seconds`` and ``ssmis_seconds`` (wall time of this
    call; 0 when reused).
    """
    from .pretrain import pretrain
    from .ssmis import train_ssmis

    spec = _spec(row)
    if spec.method is None:
        raise ValueError(f"row {row!r} ({spec.label}) has no implementation in this project; drop it from the grid")
    path = run_file(profile, dataset, row, ratio, seed)
    if path.is_file() and not rerun:
        return json.loads(path.read_text())
    cfg = _config(profile, dataset, row, ratio, seed, overrides or {})
    pre_s = 0.0
    if spec.method == "dusss" and not default_vlm_checkpoint(cfg).is_file():
        t0 = time.perf_counter()
        log.info("no VLM at %s: pre-training it (%s)", default_vlm_checkpoint(cfg), row)
        pretrain(cfg.replace(ratio=min(PRETRAIN_RATIO, cfg.ratio), out_dir=""), progress=progress)
        pre_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = train_ssmis(cfg.replace(resume=not rerun), progress=progress)
    result = {**metrics, "row": row, "switches": dict(spec.switches), "pretrain_seconds": pre_s,
              "ssmis_seconds": time.perf_counter() - t0}
    atomic_write_json(path, result)
    return result


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
    results file whose run folder (:func:`dusss.paths.ssmis_dir`) holds a
    ``metrics.json`` with the same settings (and, for text-guided rows, the
    VLM) is written from it without training; folders of other settings are
    skipped with a warning.
    """
    from tqdm.auto import tqdm

    jobs: dict[str, tuple] = {}
    for dataset in datasets:
        for seed in seeds:
            pairs = [(r, q) for r in table1_rows for q in table1_ratios] + [(r, table2_ratio) for r in table2_rows]
            for row, ratio in pairs:
                if _spec(row).method is None:
                    continue
                jobs.setdefault(f"{dataset}/{run_name(row, ratio, seed)}", (dataset, row, ratio, seed))
    if adopt_finished and not rerun:
        from .paths import ssmis_dir

        for dataset, row, ratio, seed in jobs.values():
            cfg = _config(profile, dataset, row, ratio, seed, overrides or {})
            finished = (ssmis_dir(cfg) / "metrics.json").is_file()
            has_vlm = _spec(row).method != "dusss" or default_vlm_checkpoint(cfg).is_file()
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


def summarise(runs: pd.DataFrame, rows: Iterable[str], ratios: Iterable[float], table: str,
              datasets: Iterable[str] | None = None) -> pd.DataFrame:
    """Mean ± std (sample std, ddof=1; 0 for one seed) of Dice and mIoU in per cent over seeds, per row, ratio, data set.

    ``runs`` is :func:`load_runs`; runs are matched to rows by
    :func:`run_name` without the seed. Every (row, ratio, data set) appears,
    with ``n_seeds = 0`` and NaN where no run exists (``seeds`` lists the
    seeds that have a run, space-separated, "" for none), and the paper's numbers
    (``paper_dice``, ``paper_miou``) where the paper has that row, plus those of
    the paper's data sets that have no stand-in here (:data:`PAPER_ONLY`:
    ``paper_bmseg_dice``, ``paper_bmseg_miou``). ``datasets`` None = the data
    sets that have runs.
    """
    from .paper_tables import paper_table1, paper_table2

    p1, p2 = paper_table1(), paper_table2()
    if datasets is None:
        datasets = list(dict.fromkeys(runs["dataset"])) if len(runs) else []
    runs = runs.assign(stem=runs["run"].str.replace(r"-s\d+$", "", regex=True))
    out = []
    for row in rows:
        spec = _spec(row)
        for ratio in ([spec.ratio] if spec.ratio is not None else list(ratios)):
            stem = re.sub(r"-s0$", "", run_name(row, ratio, 0))
            for dataset in datasets:
                sel = runs[(runs["stem"] == stem) & (runs["dataset"] == dataset)]
                key = _PAPER_KEY.get(PAPER_NAMES.get(dataset, ""), None)
                paper = None
                if key and table == "table1" and spec.paper1:
                    hit = p1[(p1["method"] == spec.paper1) & (p1["labels"] == round(100 * ratio))]
                    paper = hit.iloc[0] if len(hit) else None
                if key and table == "table2" and spec.paper2:
                    s, d, t = spec.paper2
                    hit = p2[(p2["sss"] == s) & (p2["dcl"] == d) & (p2["tg"] == t)]
                    paper = hit.iloc[0] if len(hit) else None
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
                  table1_ratios: Iterable[float] = (0.25, 0.5), table2_rows: Iterable[str] = TABLE2_ROWS,
                  table2_ratio: float = 0.5, datasets: Iterable[str] | None = None,
                  seeds: Iterable[int] | None = None) -> dict[str, Any]:
    """Both tables from :func:`load_runs`: ``{"table1", "table2"}`` summaries and ``{"table1_md", "table2_md"}``.

    Table 2's Markdown adds, per data set, each row's Dice rank among the
    rows here next to its rank in the paper (1 = best); ``"effects"`` /
    ``"effects_md"`` (:func:`component_effects`) say, pair by pair, whether
    each component helps here as it did there, and ``"contrasts"`` /
    ``"contrasts_md"`` (:func:`row_contrasts`) give Table 1's comparisons
    (DuSSS minus each other row, ...) as differences. ``datasets``
    None = the data sets that have runs (else every one listed, empty cells "–").
    With ``seeds``, ``"coverage_md"`` (:func:`coverage`) says which cells lack one of them.
    """
    datasets = list(datasets) if datasets is not None else None
    t1 = summarise(runs, table1_rows, table1_ratios, "table1", datasets)
    t2 = summarise(runs, table2_rows, [table2_ratio], "table2", datasets)
    effects, contrasts = component_effects(t2), row_contrasts(t1)
    out = {"table1": t1, "table2": t2, "table1_md": _markdown(t1, ranks=False) if len(t1) else "",
           "table2_md": _markdown(t2, ranks=True) if len(t2) else "", "effects": effects,
           "effects_md": _effects_markdown(effects) if len(effects) else "", "contrasts": contrasts,
           "contrasts_md": _contrasts_markdown(contrasts) if len(contrasts) else ""}
    if seeds is not None:
        out["coverage_md"] = coverage(out, seeds)
    return out


COMPONENTS = ("SSS", "DCL", "L_tg")  # the positions of RowSpec.paper2


def _difference(on, off) -> tuple[float, float, float, bool | None, int]:
    """Dice of summary line ``on`` minus ``off``: ours, its standard error, the paper's, same sign, fewer seeds.

    The standard error over seeds is ``sqrt(std_on**2 / n_on + std_off**2 / n_off)``
    (NaN below two seeds a line); same sign is None while either delta is missing.
    """
    ours = on.dice_mean - off.dice_mean
    se = (float((on.dice_std ** 2 / on.n_seeds + off.dice_std ** 2 / off.n_seeds) ** 0.5)
          if min(on.n_seeds, off.n_seeds) > 1 else float("nan"))
    paper = on.paper_dice - off.paper_dice
    same = None if pd.isna(ours) or pd.isna(paper) else bool((ours > 0) == (paper > 0))
    return float(ours), se, float(paper), same, int(min(on.n_seeds, off.n_seeds))


def component_effects(table2: pd.DataFrame) -> pd.DataFrame:
    """What switching one component on does to Dice, here and in the paper: one line per pair of Table-2 rows.

    ``table2`` is :func:`render_tables`'s ``"table2"`` summary. A pair is two
    rows whose ``paper2`` switches ``(sss, dcl, tg)`` differ in exactly one
    component (e.g. DCL + L_tg -> DuSSS for SSS); the paper's seven rows give
    three pairs per component (``row_off`` -> ``row_on``). ``ours`` / ``paper`` = Dice of the row with the
    component minus the row without it (points; NaN where either of our runs
    is missing), ``ours_se`` = its standard error over seeds,
    ``sqrt(std_on**2 / n_on + std_off**2 / n_off)`` (NaN below two seeds a
    row), ``same_sign`` = both deltas have the same sign (None while ours is
    missing), ``seeds`` = the fewer seeds of the two rows. As in the
    paper, the pairs from the baseline (Mean Teacher) also add the VLM's text
    guidance to Step 2, not only the one component.
    """
    cols = ["dataset", "component", "row_off", "row_on", "ours", "ours_se", "paper", "same_sign", "seeds"]
    out = []
    for dataset, grp in table2.groupby("dataset", sort=False):
        by_switch = {_spec(r.row).paper2: r for r in grp.itertuples() if _spec(r.row).paper2 is not None}
        for k, name in enumerate(COMPONENTS):
            for off, a in by_switch.items():
                if off[k]:
                    continue
                b = by_switch.get(off[:k] + (1,) + off[k + 1:])
                if b is None:
                    continue
                ours, se, paper, same, seeds = _difference(b, a)
                out.append({"dataset": dataset, "component": name, "row_off": a.label, "row_on": b.label,
                            "ours": ours, "ours_se": se, "paper": paper, "same_sign": same, "seeds": seeds})
    return pd.DataFrame(out, columns=cols)


def _effects_markdown(effects: pd.DataFrame) -> str:
    lines = ["| data set | component | without → with | ours Δ Dice (± SE) | paper Δ Dice | same sign | seeds |",
             "|---|---|---|---|---|---|---|"]
    sign = {True: "yes", False: "**no**", None: "–"}
    for r in effects.itertuples():
        ours, paper = _delta(r.ours, r.ours_se), _delta(r.paper, float("nan"))
        lines.append(f"| {r.dataset} | {r.component} | {r.row_off} → {r.row_on} | {ours} | {paper} |"
                     f" {sign[r.same_sign]} | {r.seeds} |")
    return "\n".join(lines) + "\n"


# Table 1's questions, each "row a minus row b" at the same label share (U-Net 100 % is one line for both shares)
CONTRASTS = (("dusss", "mt"), ("dusss", "clip"), ("dusss", "bcp"), ("dusss", "ucmt"), ("dusss", "unet"),
             ("dusss", "unet100"), ("mt", "unet"), ("mt", "bcp"))


def row_contrasts(table1: pd.DataFrame, pairs: Iterable[tuple[str, str]] = CONTRASTS) -> pd.DataFrame:
    """Table 1's comparisons as differences: Dice of row ``a`` minus row ``b`` per data set and label share.

    ``table1`` is :func:`render_tables`'s ``"table1"`` summary. For each pair
    and each ratio of row ``a`` (a row ``b`` with a fixed ratio, the 100 %
    U-Net, is matched to every ratio of ``a``), ``ours`` ± ``ours_se`` and ``paper`` are as in
    :func:`component_effects` (:func:`_difference`); ``paper`` is NaN where the
    paper has no such row (the labelled-only U-Net, the CLIP-style VLM). Pairs
    with a row missing from ``table1`` are skipped.
    """
    cols = ["dataset", "ratio", "row_a", "row_b", "label_a", "label_b", "ours", "ours_se", "paper", "same_sign",
            "seeds"]
    out = []
    for dataset, grp in table1.groupby("dataset", sort=False):
        for a_row, b_row in pairs:
            for a in grp[grp["row"] == a_row].itertuples():
                b = grp[(grp["row"] == b_row) & ((grp["ratio"] == a.ratio) | (_spec(b_row).ratio is not None))]
                if not len(b):
                    continue
                b = next(b.itertuples())
                ours, se, paper, same, seeds = _difference(a, b)
                out.append({"dataset": dataset, "ratio": a.ratio, "row_a": a_row, "row_b": b_row, "label_a": a.label,
                            "label_b": b.label, "ours": ours, "ours_se": se, "paper": paper, "same_sign": same,
                            "seeds": seeds})
    return pd.DataFrame(out, columns=cols)


def _delta(x: float, se: float) -> str:
    return "–" if pd.isna(x) else f"{x:+.2f}" + ("" if pd.isna(se) else f" ± {se:.2f}")


def _contrasts_markdown(contrasts: pd.DataFrame) -> str:
    """One line per (data set, pair), one column group per label share: ours Δ ± SE, the paper's Δ, seeds."""
    ratios = sorted(contrasts["ratio"].unique())
    head, rule = "| data set | comparison (Dice of a minus b) |", "|---|---|"
    for q in ratios:
        head += f" {100 * q:.0f} %: ours | paper | seeds |"
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
            line += f" {_delta(r['ours'], r['ours_se'])} | {_delta(r['paper'], float('nan'))} | {r['seeds']} |"
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
        items = [f"{r.label}{'' if _spec(r.row).ratio is not None else f' {100 * r.ratio:.0f} %'} ({r.seeds or 'none'})"
                 for r in grp.itertuples()]
        parts.append(f"`{dataset}`: " + "; ".join(items))
    return text + f"{len(short)} cells lack a seed (the seeds they have in brackets): " + ". ".join(parts) + ".\n"


def complexity(cfg: Config | None = None, image_size: int = 224) -> dict[str, float]:
    """Parameters (M) and multiply-accumulates / FLOPs (G) of the segmentation U-Net on one ``image_size`` image.

    Counted with ``torch.utils.flop_counter.FlopCounterMode``, which counts a
    multiply-add as 2 FLOPs (convolutions and matrix products only); ``gmacs``
    is half of it. ``cfg`` None = the ``paper`` profile's U-Net (base 64), the
    network of the paper's Table 1. Beside them the paper's 14.75 M / 25.19 G.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .unet import build_unet, count_parameters

    cfg = cfg or make_config("paper")
    model = build_unet(cfg).eval()
    x = torch.zeros(1, 3, image_size, image_size)  # (1, 3, S, S)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    flops = counter.get_total_flops()
    return {"unet_base": cfg.unet_base, "image_size": image_size, "params_m": count_parameters(model) / 1e6,
            "gflops": flops / 1e9, "gmacs": flops / 2e9, "paper_params_m": 14.75, "paper_g": 25.19}


def plot_tables(tables: dict[str, Any]):
    """Bar chart with error bars (std over seeds): test Dice per row, one panel per (table, data set); paper as dots."""
    import matplotlib.pyplot as plt
    import numpy as np

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
    """Forest plot of the differences: Table 1's contrasts and Table 2's component effects, ours ± 2 SE, paper as dots.

    One panel per kind (``"contrasts"``, ``"effects"`` of :func:`render_tables`),
    one line per (data set, pair, label share); a bar that does not cross 0 is
    a difference beyond two standard errors. Lines without our delta are left
    out; lines from one seed have no bar.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    def short(label: str) -> str:
        return label.split(" (")[0]

    kinds = (("contrasts", "Table 1: row a − row b",
              lambda r: f"{r.dataset} {100 * r.ratio:.0f}%: {short(r.label_a)} − {short(r.label_b)}"),
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
        ax.errorbar(d["ours"], y, xerr=2 * d["ours_se"].fillna(0), fmt="o", color="tab:blue", ms=4, capsize=2,
                    label="this project (± 2 SE)")
        ax.scatter(d["paper"], y, color="tab:red", marker="D", s=16, zorder=3, label="paper")
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(y)
        ax.set_yticklabels(names, fontsize=6)
        ax.set(xlabel="Δ test Dice (points)", title=title)
        ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return fig


def write_outputs(tables: dict[str, Any], profile: str, cx: dict[str, float] | None = None) -> dict[str, Path]:
    """CSV + Markdown of both tables to ``results/04_table{1,2}[_<profile>]``, the bar chart to ``figures/``.

    Table 2's component effects (:func:`component_effects`) go to
    ``results/04_table2_effects[_<profile>]`` and Table 1's contrasts
    (:func:`row_contrasts`) to ``results/04_table1_contrasts[_<profile>]``
    when ``tables`` has them, and the coverage paragraph (:func:`coverage`)
    to ``results/04_coverage[_<profile>].md``; their forest plot
    (:func:`plot_differences`) goes to ``figures/04_differences[_<profile>].png``.
    The Markdown of Table 1 ends with the complexity line (:func:`complexity`)
    when ``cx`` is given. Returns the written paths.
    """
    from .plotting import save_figure

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
        cov.unlink(missing_ok=True)  # an older grid's coverage must not reach the README with these tables
    import matplotlib.pyplot as plt

    fig = plot_tables(tables)
    paths["figure"] = save_figure(fig, tagged("04_tables", profile))
    plt.close(fig)
    if len(tables.get("contrasts", ())) or len(tables.get("effects", ())):
        fig = plot_differences(tables)
        paths["differences_figure"] = save_figure(fig, tagged("04_differences", profile))
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
    """
    names: dict[str, str] = {}
    vlms = set()
    for row, ratio in [(r, q) for r in table1_rows for q in table1_ratios] + [(r, table2_ratio) for r in table2_rows]:
        spec = _spec(row)
        if spec.method is None:
            continue
        names[run_name(row, ratio, 0)] = spec.method
        if spec.method == "dusss":
            vlms.add(tuple(sorted(spec.switches.items())))
    counts = pd.Series(list(names.values())).value_counts().to_dict()
    counts["pretrain"] = len(vlms)
    k = datasets * seeds
    rows = [{"kind": kind, "runs": n * k, "seconds_each": seconds.get(kind, float("nan")),
             "hours": n * k * seconds.get(kind, float("nan")) / 3600} for kind, n in sorted(counts.items())]
    df = pd.DataFrame(rows)
    total = pd.DataFrame([{"kind": "total", "runs": int(df["runs"].sum()), "seconds_each": float("nan"),
                           "hours": df["hours"].sum(min_count=len(df))}])
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
    from .paths import runs_dir

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


BEGIN, END = "<!-- tables:begin (generated by dusss.tables.write_readme_section) -->", "<!-- tables:end -->"


def write_readme_section(profile: str = "demo", readme: str | Path | None = None, *, extra: str = "") -> str:
    """Paste ``results/04_table{1,2}[_<profile>].md`` (and ``extra``) into the README after ``<!-- section:tables -->``.

    ``results/04_table1_contrasts[_<profile>].md`` follows Table 1 and
    ``results/04_table2_effects[_<profile>].md`` Table 2 when they exist;
    ``results/04_coverage[_<profile>].md`` opens the block when it exists.
    The generated block sits between :data:`BEGIN` and :data:`END`, inserted
    right after the marker line the first time and replaced on later calls;
    nothing else in the README changes. Returns the block.
    """
    readme = Path(readme) if readme else repo_root() / "README.md"
    text = readme.read_text()
    marker = "<!-- section:tables -->"
    if marker not in text:
        raise ValueError(f"{readme} has no line {marker!r}; add it under the heading '## Tables 1 and 2'")
    path = results_dir() / f"{tagged('04_coverage', profile)}.md"
    parts = [path.read_text().strip() + "\n"] if path.is_file() else []
    extras = {"table1": ("04_table1_contrasts", "**Table 1 as differences.** Dice of one row minus another at the "
                         "same label share (points; ± the standard error over seeds), ours and the paper's"),
              "table2": ("04_table2_effects", "**Does each component help?** Dice of the Table-2 row with the "
                         "component minus the row without it (points), ours and the paper's")}
    for name, title in (("table1", "Table 1 (comparison)"), ("table2", "Table 2 (ablation, 50 % labels)")):
        path = results_dir() / f"{tagged(f'04_{name}', profile)}.md"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; run notebooks/04_ablation.ipynb (profile {profile}) first")
        parts.append(f"**{title}**, test Dice / mIoU (%), from `{path.relative_to(path.parents[1])}`:\n\n"
                     f"{path.read_text().strip()}\n")
        stem, intro = extras[name]
        path = results_dir() / f"{tagged(stem, profile)}.md"
        diffs = path.read_text().strip() if path.is_file() else ""
        if diffs:
            parts.append(f"{intro}, from `{path.relative_to(path.parents[1])}`:\n\n{diffs}\n")
    block = BEGIN + "\n" + "\n".join(parts) + (f"\n{extra.strip()}\n" if extra else "") + END
    if BEGIN in text and END in text:
        start, stop = text.index(BEGIN), text.index(END) + len(END)
        text = text[:start] + block + text[stop:]
    else:
        i = text.index(marker) + len(marker)
        text = text[:i] + "\n" + block + text[i:]
    atomic_write_text(readme, text)
    return block


def run(args, cfg: Config) -> int:
    """``python -m dusss tables``: fill the grid for ``cfg.dataset`` and ``cfg.seed`` at ``cfg.profile``, then render.

    Trains every missing run of both tables (all rows of :data:`TABLE1_ROWS`
    and :data:`TABLE2_ROWS`; hours at ``demo``), then re-renders the tables
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
