"""Wall time of one demo Step-2 run before and after the speed work, same run, same machine, one after the other.

"The same run": ``mt`` at 25 % labels, seed 666, the budget the earlier demo
profile used (6 epochs x 60 steps, no early stopping), 600/150/200 qata-synth
images drawn at 256 px and trained at 128 px, U-Net base 8, torch's default
threads; each version on its own data generator's images (generated before the
clock starts, so only the run is timed). The "before" code is a git worktree
of ``--before`` (default: the last commit before the speed work); the "after"
code is this checkout. Run it on an idle machine (the 1-minute load average is
recorded). Writes the keys ``demo_run_seconds_before``, ``demo_run_seconds_after``
and the run's own split of the "after" time (``run_over_step_seconds``: wall
time of the run over the time of its training steps alone) into
``results/bench.json`` (other keys there are kept).

``--parallel`` measures instead what two runs side by side cost, as the grid
runs them: the median time of one Mean-Teacher training step (the registered
``mt`` step, demo batch and size) in each of two concurrent processes, once
with torch's default threads each (how the earlier grid ran two workers) and
once with ``cores // 2`` threads each (what ``python -m dusss grid --workers 2``
sets), written as ``grid_parallel_step_seconds``.

    .venv/bin/python benchmarks/run_speed.py [--before e55ff36] [--parallel]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = dict(method="mt", ratio=0.25, seed=666, epochs=6, steps_per_epoch=60, patience=100, synth_train=600,
                synth_val=150, synth_test=200, synth_size=256, resume=False)
CHILD = """
import json, sys, time
from dusss.config import make_config
from dusss.data import ensure_dataset
from dusss.ssmis import train_ssmis
settings = json.loads(sys.argv[1])
cfg = make_config("demo", **settings)
ensure_dataset(cfg)  # generated before the clock starts
t0 = time.time()
metrics = train_ssmis(cfg, progress=False)
print(json.dumps({"wall": time.time() - t0, "step_seconds": metrics.get("step_seconds"),
                  "test_dice": metrics["test_dice"], "total_steps": metrics.get("total_steps")}))
"""


def _run(code_dir: Path, work: Path, tag: str) -> dict:
    settings = dict(SETTINGS, data_root=str(work / f"data-{tag}"), out_dir=str(work / f"run-{tag}"))
    env = dict(os.environ, PYTHONPATH=str(code_dir), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings)], cwd=code_dir, env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


STEP_CHILD = """
import copy, json, statistics, sys, time
import torch
from dusss.config import make_config
from dusss.losses import ema_update
from dusss.methods import Models, StepBatch, get_method
from dusss.unet import build_unet
threads = int(sys.argv[1])
if threads:
    torch.set_num_threads(threads)
cfg = make_config("demo", method="mt", seed=0)
torch.manual_seed(0)
student = build_unet(cfg)
teacher = copy.deepcopy(student).requires_grad_(False).train()
opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
method = get_method("mt")(cfg, torch.device("cpu"))
s = cfg.image_size
x_l, y_l = torch.rand(cfg.labelled_bs, 3, s, s), (torch.rand(cfg.labelled_bs, 1, s, s) > 0.9).float()
x_u = torch.rand(cfg.unlabelled_bs, 3, s, s)
times = []
for i in range(23):
    t0 = time.perf_counter()
    out = method.step(Models(student, student, teacher), StepBatch(x_l, y_l, x_u, None, i, 1000, i / 50))
    opt.zero_grad(); out.loss.backward(); opt.step(); ema_update(teacher, student, 0.99, i)
    if i >= 3:
        times.append(time.perf_counter() - t0)
print(json.dumps({"threads": torch.get_num_threads(), "step_seconds": statistics.median(times)}))
"""


def _parallel(threads: int, n: int = 2) -> list[dict]:
    """The step time in each of ``n`` processes started together with ``threads`` torch threads (0: default)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", STEP_CHILD, str(threads)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(n)]
    return [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def parallel() -> int:
    load = os.getloadavg()[0]
    default = _parallel(0)
    split = _parallel(max(1, (os.cpu_count() or 1) // 2))
    single = _parallel(0, n=1)[0]["step_seconds"]
    path = ROOT / "results" / "bench.json"
    bench = json.loads(path.read_text()) if path.is_file() else {}
    med = {"two_workers_default_threads": max(r["step_seconds"] for r in default),
           "two_workers_split_threads": max(r["step_seconds"] for r in split), "one_worker_all_threads": single}
    bench["grid_parallel_step_seconds"] = {**med, "threads_default": default[0]["threads"],
                                           "threads_split": split[0]["threads"], "load_average_1min": load,
                                           "date": time.strftime("%Y-%m-%d")}
    path.write_text(json.dumps(bench, indent=2, sort_keys=True) + "\n")
    print(f"one Mean-Teacher step, two runs side by side: {med['two_workers_default_threads']:.3f} s with "
          f"{default[0]['threads']} threads each, {med['two_workers_split_threads']:.3f} s with {split[0]['threads']} "
          f"each; one run alone: {single:.3f} s -> {path}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", default="e55ff36", help="commit of the code before the speed work")
    p.add_argument("--parallel", action="store_true", help="two runs side by side: default vs split threads")
    args = p.parse_args()
    if args.parallel:
        return parallel()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        old = work / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(old), args.before], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            load = os.getloadavg()[0]
            before = _run(old, work, "before")
            after = _run(ROOT, work, "after")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, check=False)
    path = ROOT / "results" / "bench.json"
    bench = json.loads(path.read_text()) if path.is_file() else {}
    bench.update({
        "demo_run_seconds_before": before["wall"], "demo_run_seconds_after": after["wall"],
        "demo_run_speedup": before["wall"] / after["wall"],
        "run_over_step_seconds": after["wall"] / after["step_seconds"],
        "demo_run": {"settings": SETTINGS, "before_commit": args.before, "load_average_1min": load,
                     "before": before, "after": after, "date": time.strftime("%Y-%m-%d")},
    })
    path.write_text(json.dumps(bench, indent=2, sort_keys=True) + "\n")
    print(f"before {before['wall']:.1f} s, after {after['wall']:.1f} s ({before['wall'] / after['wall']:.2f} x); "
          f"after: run / training steps = {after['wall'] / after['step_seconds']:.3f} -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
