"""The testbed grid: every (row, label share, seed, data set) run, in parallel, resumable, with progress.

``python -m dusss grid --grid sweep --datasets qata-synth nuclei-real --seeds 666-670 --workers 2``

- Each run is :func:`dusss.experiments.tables.run_one`: its results file
  ``results/runs/<dataset>-<profile>/<run name>.json`` is written atomically
  when the run ends, and a run whose file exists is skipped, so the command can
  be stopped at any point and started again: finished runs are kept, and an
  interrupted run continues from its ``last.pt`` (Step 2 resumes exactly).
  A run folder left by other settings (its results file deleted after the
  row's defaults changed) is moved to ``runs/archive/stale/`` and the run
  trained afresh (:func:`dusss.experiments.tables.set_aside_stale`); only this
  command does so, for a run it is about to train.
- ``--workers N`` runs N runs side by side, each in its own process with
  ``cores // N`` torch threads (two processes with two threads each on two
  cores run at a fraction of the speed of two with one).
- Text-guided rows need a Step-1 VLM for their switches, data seed and
  pre-training share (:func:`dusss.runs.pretrain_ratio`); those are trained
  first, one job each, so two runs never pre-train the same VLM at once.

The grids (:data:`GRIDS`) are named sets of (row, share) cells; ``--list``
prints the jobs and the measured cost of the ones already run.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Iterable

from tqdm.auto import tqdm

from ..config import Config, parse_overrides
from ..pretrain import pretrain
from ..runs import (ROWS, TABLE1_ROWS, TABLE2_ROWS, default_vlm_checkpoint, needs_vlm, pretrain_config, run_config,
                    run_file, run_name)
from ..utils import get_logger
from .tables import run_one, set_aside_stale

__all__ = ["GRIDS", "LOWEST_SHARE", "grid_jobs", "run_jobs", "parse_seeds", "run"]

log = get_logger(__name__)

LOWEST_SHARE = 0.05  # the testbed's scarce-label share (issue 16: where methods can differ), beside the paper's 25/50 %
SHARES = (LOWEST_SHARE, 0.25, 0.5)
GRIDS: dict[str, tuple[tuple[str, float], ...]] = {
    # the labelled-only U-Net against the label share: the headroom a semi-supervised method can win back
    "sweep": tuple(("unet", q) for q in (0.02, LOWEST_SHARE, 0.1, 0.25, 0.5)) + (("unet100", 1.0),),
    # the first sanity check and the recipe rows: Mean Teacher against labelled-only at every share
    "mt": tuple((r, q) for q in SHARES for r in ("unet", "mt")) + (("unet100", 1.0),),
    # the headline contrasts: DuSSS - MT, MT - labelled-only, DuSSS - CLIP-style at every share
    "headline": tuple((r, q) for q in SHARES for r in ("unet", "mt", "dusss", "clip")) + (("unet100", 1.0),),
    # Table 1 (the rows implemented here) and Table 2 (the switch combinations at 50 %)
    "table1": tuple((r, q) for q in SHARES for r in TABLE1_ROWS if ROWS[r].ratio is None)
    + tuple((r, ROWS[r].ratio) for r in TABLE1_ROWS if ROWS[r].ratio is not None),
    "table2": tuple((r, 0.5) for r in TABLE2_ROWS),
}


def parse_seeds(text: str) -> list[int]:
    """``"666-670"`` or ``"666,668"`` (or a mix) -> the seeds."""
    seeds: list[int] = []
    for part in text.replace(" ", "").split(","):
        if "-" in part:
            lo, hi = part.split("-")
            seeds += list(range(int(lo), int(hi) + 1))
        elif part:
            seeds.append(int(part))
    return seeds


def grid_jobs(profile: str, grids: Iterable[str], datasets: Iterable[str], seeds: Iterable[int], *,
              rows: Iterable[str] | None = None, shares: Iterable[float] | None = None) -> list[tuple]:
    """The distinct runs ``(dataset, row, share, seed)`` of the named grids, cheapest rows first within a seed.

    Seeds are the outer loop, so a grid stopped halfway has whole seeds of
    every cell (paired differences need the same seeds in both rows).
    ``rows`` / ``shares`` keep only those cells of the grids (e.g. the new
    rows at the lowest share first); a row or share no named grid has raises
    ``ValueError``.
    """
    grids = list(grids)
    for name in grids:
        if name not in GRIDS:
            raise ValueError(f"unknown grid {name!r}; choose from {', '.join(GRIDS)}")
    cells = {(r, q) for name in grids for r, q in GRIDS[name]}
    if rows is not None:
        rows = list(rows)
        unknown = sorted(set(rows) - {r for r, _ in cells})
        if unknown:
            raise ValueError(f"row(s) {', '.join(unknown)} are in none of the grids {', '.join(grids)}; "
                             f"their rows are {', '.join(sorted({r for r, _ in cells}))}")
    if shares is not None:
        shares = [float(q) for q in shares]
        unknown = sorted(set(shares) - {q for _, q in cells})
        if unknown:
            raise ValueError(f"share(s) {', '.join(f'{q:g}' for q in unknown)} are in none of the grids "
                             f"{', '.join(grids)}; their shares are {', '.join(f'{q:g}' for q in sorted({q for _, q in cells}))}")
    jobs: dict[str, tuple] = {}
    for seed in seeds:
        for dataset in datasets:
            for name in grids:
                for row, share in GRIDS[name]:
                    if (rows is not None and row not in rows) or (shares is not None and share not in shares):
                        continue
                    key = f"{dataset}/{run_name(row, share, seed)}"
                    jobs.setdefault(key, (dataset, row, share, seed))
    return list(jobs.values())


def _threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(workers, 1))


def _pretrain_job(profile: str, dataset: str, row: str, share: float, seed: int, overrides: dict,
                  threads: int) -> str:
    cfg = run_config(profile, dataset, row, share, seed, {**overrides, "num_threads": threads})
    path = default_vlm_checkpoint(cfg)
    if not path.is_file():
        pretrain(pretrain_config(cfg), progress=False)
    return str(path)


def _run_job(profile: str, dataset: str, row: str, share: float, seed: int, overrides: dict, threads: int) -> dict:
    overrides = {**overrides, "num_threads": threads}
    if not run_file(profile, dataset, row, share, seed).is_file():  # about to train: a stale folder must not stop it
        set_aside_stale(run_config(profile, dataset, row, share, seed, overrides))
    return run_one(profile, dataset, row, share, seed, overrides=overrides)


def run_jobs(profile: str, jobs: list[tuple], *, workers: int = 1, overrides: dict | None = None,
             progress: bool = True) -> list[dict]:
    """Run every job whose results file is missing, ``workers`` at a time; returns the results of those run."""
    overrides = dict(overrides or {})
    todo = [j for j in jobs if not run_file(profile, *j).is_file()]
    threads = _threads(workers)
    vlms: dict[str, tuple] = {}
    for dataset, row, share, seed in todo:
        if needs_vlm(row):
            cfg = run_config(profile, dataset, row, share, seed, overrides)
            if not default_vlm_checkpoint(cfg).is_file():
                vlms.setdefault(str(default_vlm_checkpoint(cfg)), (dataset, row, share, seed))
    log.info("grid: %d of %d runs to do (%d VLMs to pre-train first), %d worker(s) x %d thread(s)", len(todo),
             len(jobs), len(vlms), workers, threads)
    _in_pool(_pretrain_job, profile, list(vlms.values()), overrides, workers, "pre-train VLMs", progress)
    return _in_pool(_run_job, profile, todo, overrides, workers, "grid runs", progress)


def _in_pool(fn, profile: str, items: list[tuple], overrides: dict, workers: int, desc: str,
             progress: bool = True) -> list:
    """``fn(profile, *item, overrides, threads)`` for every item, ``workers`` processes at a time (each a fresh
    spawned process with ``cores // workers`` threads; in this process when ``workers`` is 1); the results.

    A failed item stops the loop with its error; what finished before stays saved by ``fn``.
    """
    if not items:
        return []
    threads = _threads(workers)
    if workers == 1:
        return [fn(profile, *item, overrides, threads) for item in tqdm(items, desc=desc, disable=not progress)]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        futures = [pool.submit(fn, profile, *item, overrides, threads) for item in items]
        return [f.result() for f in tqdm(as_completed(futures), total=len(futures), desc=desc,
                                         disable=not progress)]


def run(args, cfg: Config) -> int:
    """``python -m dusss grid``: run the named grids' missing runs (or ``--list`` them) at ``--profile``."""
    overrides = {k: v for k, v in parse_overrides(args.overrides).items() if k not in ("dataset", "seed", "ratio",
                                                                                         "method")}
    jobs = grid_jobs(cfg.profile, args.grid, args.datasets, parse_seeds(args.seeds),
                     rows=getattr(args, "rows", None), shares=getattr(args, "shares", None))
    if args.list:
        done = [j for j in jobs if run_file(cfg.profile, *j).is_file()]
        print(f"{len(jobs)} runs in grid(s) {', '.join(args.grid)}; {len(done)} done, {len(jobs) - len(done)} to do")
        for dataset, row, share, seed in jobs:
            mark = "done" if run_file(cfg.profile, dataset, row, share, seed).is_file() else "todo"
            print(f"  {mark}  {dataset:<12} {row:<8} {share:<5g} seed {seed}")
        return 0
    t0 = time.time()
    results = run_jobs(cfg.profile, jobs, workers=args.workers, overrides=overrides)
    print(f"{len(results)} runs trained in {(time.time() - t0) / 3600:.2f} h; results under "
          f"{run_file(cfg.profile, args.datasets[0], 'unet', 0.5, 0).parent.parent}")
    return 0
