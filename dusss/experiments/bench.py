"""Speed benchmark (``python -m dusss bench``): the cost of text guidance, GFLOP/s, throughput, the loader.

Everything is measured in one process, side by side: after warm-up, the
variants being compared take turns (round-robin) and each figure is the median
over ``repeats`` rounds, so a neighbour's load on a shared CPU hits every
variant alike and the *ratios* stay meaningful even when absolute times drift.
Four sections, written to ``results/bench.json`` (``bench_<profile>.json``
outside the demo profile) and printed as a table:

1. ``text_guidance``: one SSMIS training step of the registered methods
   (:class:`dusss.methods.MeanTeacher` / :class:`dusss.methods.DuSSS`'s
   ``step``, backward, Adam, EMA: the code the loop runs) of ``mt`` and of
   ``dusss`` with cached text-guided logits (``text_cache=True``) and with the
   VLM run on every batch (``text_cache=False``), on the same batches; the
   ratios ``dusss / mt`` (target <= 1.15 for the default path) and the one-off
   cost of filling the cache.
2. ``unet_flops``: FLOPs of one U-Net training step counted with
   :class:`torch.utils.flop_counter.FlopCounterMode`, divided by its median time
   for each variant (fp32, channels_last, bfloat16 autocast, torch.compile,
   one thread), over the GFLOP/s of a large float32 matrix product measured in
   the same run (target >= 0.5).
3. ``vlm_pretrain``: Step-1 training throughput (image-report pairs/s) and the
   peak memory of one Step-1 and one Step-2 training step.
4. ``loader``: images/s the Step-2 batch pipeline delivers (images held in
   memory, batched augmentation) next to the images/s the training step
   consumes (``loader_to_step_ratio``; >= 3: the step never waits).
"""
from __future__ import annotations

import copy
import json
import math
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from ..config import Config, ConfigError
from ..losses import SupervisedSegLoss, ema_update
from ..methods import Models, StepBatch, get_method
from ..paths import results_dir, tagged
from ..pretrain import _Objective, _Paraphrases
from ..runs import default_vlm_checkpoint
from ..ssmis import TensorSplit, TextGuidance, _Augmenter, _portable, _Stream, prepare_data
from ..unet import build_unet
from ..utils import atomic_write_json, get_logger, resolve_device, seed_everything
from ..vlm import DuSSSVLM, load_vlm

__all__ = ["benchmark", "step_throughput", "format_table", "bench_path", "run", "peak_memory_mb"]

log = get_logger(__name__)

UNET_VARIANTS = ("fp32", "channels_last", "bf16", "channels_last+bf16", "compile", "threads=1")


# ---------------------------------------------------------------- timing helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _round_robin(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: torch.device,
                 progress: bool = False, desc: str = "") -> dict[str, float]:
    """Median seconds of each callable, run in turns (warm-up rounds first, not timed)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in tqdm(range(warmup + repeats), desc=desc, disable=not progress, leave=False):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """Peak memory while ``fn()`` runs: CUDA ``max_memory_allocated``, or the CPU process's resident set.

    On the CPU the kernel's high-water mark (``VmHWM``) is reset through
    ``/proc/self/clear_refs`` before the call, so ``peak_rss_mb`` is the
    process's peak during ``fn`` and ``delta_mb`` its rise over the resident
    size just before (memory the allocator kept from earlier steps is reused,
    so the rise is the step's *new* memory, a lower bound of what it touches).
    Where ``/proc`` cannot be reset, ``ru_maxrss`` (peak since the process
    started) is reported instead and ``method`` says so.
    """
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mb": peak / 2**20, "delta_mb": (peak - before) / 2**20, "method": "cuda max_memory_allocated"}
    status = Path("/proc/self/status")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _proc_kb(status, "VmRSS")
        fn()
        peak = _proc_kb(status, "VmHWM")
        return {"peak_mb": peak / 1024, "delta_mb": max(peak - before, 0) / 1024, "method": "VmHWM reset"}
    except OSError:
        fn()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"peak_mb": peak / 1024, "delta_mb": float("nan"), "method": "ru_maxrss since start"}


def _proc_kb(status: Path, key: str) -> int:
    for line in status.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"{key} not in {status}")


# ---------------------------------------------------------------- section 1: text guidance
class _MethodStep:
    """One Step-2 training step of a registered method as the loop takes it: ``method.step``, backward, Adam, EMA.

    Its own copies of the student and teacher; ``batch`` builds the method's
    :class:`dusss.methods.StepBatch` from a labelled and an unlabelled batch.
    With ``guidance`` and ``cached=False`` the text-guided logits come from the
    VLM on every step (``text_cache=False``), else from the batch's cached maps.
    """

    def __init__(self, cfg: Config, student: nn.Module, guidance=None, cached: bool = True,
                 amp: bool = False) -> None:
        self.cfg, self.amp = cfg, amp  # amp: bfloat16 autocast of the forward passes (the GPU check)
        self.method = get_method(cfg.method)(cfg, next(student.parameters()).device)
        self.student = copy.deepcopy(student).train()
        teacher = copy.deepcopy(student).requires_grad_(False).train() if self.method.uses_teacher else None
        self.models = Models(self.student, self.student, teacher)
        self.opt = torch.optim.Adam(self.student.parameters(), lr=cfg.lr)
        self.guidance, self.cached = guidance, cached
        self.step_no = 0

    def __call__(self, lb: dict, ub: dict, device: torch.device) -> float:
        x_u = ub["image"].to(device) if self.method.uses_unlabelled else None
        z_text = None
        if self.method.uses_text:
            z_text = (ub["text_logits"].to(device) if self.cached or self.guidance is None
                      else self.guidance.logits(x_u, list(ub["text"])))  # (Bu, 1, H, W)
        batch = StepBatch(lb["image"].to(device), lb["mask"].to(device), x_u, z_text, self.step_no, 1000,
                          self.step_no / 50)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.method.step(self.models, batch)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        self.opt.step()
        if self.models.teacher is not None:
            ema_update(self.models.teacher, self.student, self.cfg.ema_alpha, self.step_no)
        self.step_no += 1
        return float(out.loss.detach())


def _guidance_for(cfg: Config, device: torch.device):
    """The Step-1 VLM of ``cfg`` when it has been pre-trained, else a randomly initialised one (same cost)."""
    path = Path(default_vlm_checkpoint(cfg))
    if path.is_file():
        vlm, source = load_vlm(path, device), _portable(path)
    else:
        vlm = DuSSSVLM.from_config(cfg).to(device).eval().requires_grad_(False)
        source = "random initialisation (no pre-trained VLM found; timing is the same)"
    return TextGuidance(vlm, device, batch_size=max(cfg.labelled_bs + cfg.unlabelled_bs, 8)), source


def _ssmis_material(cfg: Config, device: torch.device, n_batches: int):
    """Data, guidance, cached maps and the loop's batch pipeline for ``n_batches`` steps (sections 1, 3, 4)."""
    data = prepare_data(cfg.replace(method="dusss"))
    pos = {n: i for i, n in enumerate(data.train.names)}
    lab = TensorSplit(data.train, [pos[n] for n in data.labelled])
    unl = TensorSplit(data.train, [pos[n] for n in data.unlabelled][: cfg.unlabelled_bs * n_batches])
    guidance, source = _guidance_for(cfg, device)
    t0 = time.perf_counter()
    maps = guidance.cache(unl)  # (N, 1, H, W) float16
    cache_s = time.perf_counter() - t0
    return {"data": data, "guidance": guidance, "vlm_source": source, "lab": lab, "unl": unl, "maps": maps,
            "lab_aug": _Augmenter.from_config(cfg, cfg.seed + 1, data.text_mode),
            "unl_aug": _Augmenter.from_config(cfg, cfg.seed + 2, data.text_mode),
            "cache_seconds_per_image": cache_s / max(len(unl), 1), "n_unlabelled_total": len(data.unlabelled)}


def _streams(mat: dict, cfg: Config) -> dict[str, _Stream]:
    """The loop's two index streams over the benchmark's labelled and unlabelled images."""
    return {"lab": _Stream(len(mat["lab"]), cfg.labelled_bs, cfg.seed),
            "unl": _Stream(len(mat["unl"]), cfg.unlabelled_bs, cfg.seed + 1)}


def _pipeline_batch(mat: dict, cfg: Config, stream: dict) -> tuple[dict, dict]:
    """One labelled and one unlabelled batch as the training loop makes them (index, decode from uint8, augment)."""
    idx = stream["lab"].next()
    x_l, y_l = mat["lab"].batch(idx)
    x_l, y_l, _, _ = mat["lab_aug"](x_l, y_l)
    idx_u = stream["unl"].next()
    x_u, y_u = mat["unl"].batch(idx_u)
    texts = [mat["unl"].texts[i] for i in idx_u.tolist()]
    x_u, _, maps, texts = mat["unl_aug"](x_u, y_u, mat["maps"][idx_u].float(), texts)
    return {"image": x_l, "mask": y_l}, {"image": x_u, "text_logits": maps, "text": texts}


def _batches(mat: dict, cfg: Config, n: int) -> tuple[list[dict], list[dict]]:
    stream = _streams(mat, cfg)
    pairs = [_pipeline_batch(mat, cfg, stream) for _ in range(n)]
    return [a for a, _ in pairs], [b for _, b in pairs]


def _text_guidance_section(cfg: Config, device: torch.device, mat: dict, repeats: int, warmup: int,
                           progress: bool) -> dict[str, Any]:
    n = warmup + repeats
    lab, unl = _batches(mat, cfg, n)
    seed_everything(cfg.seed)
    student = build_unet(cfg).to(device)
    steps = {"mt": _MethodStep(cfg.replace(method="mt"), student),
             "dusss_cached": _MethodStep(cfg.replace(method="dusss"), student, mat["guidance"], cached=True),
             "dusss_on_the_fly": _MethodStep(cfg.replace(method="dusss"), student, mat["guidance"], cached=False)}
    cursor = {k: 0 for k in steps}

    def caller(name: str) -> Callable[[], float]:
        def fn() -> float:
            i = cursor[name] % n
            cursor[name] += 1
            return steps[name](lab[i], unl[i], device)
        return fn

    med = _round_robin({k: caller(k) for k in steps}, repeats, warmup, device, progress, "text guidance")
    steps_per_epoch = cfg.steps_per_epoch or max(math.ceil(len(mat["data"].labelled) / cfg.labelled_bs),
                                                 math.ceil(mat["n_unlabelled_total"] / cfg.unlabelled_bs))
    cache_run = mat["cache_seconds_per_image"] * mat["n_unlabelled_total"]
    return {
        "step_seconds": med,
        "ratio_cached_over_mt": med["dusss_cached"] / med["mt"],
        "ratio_on_the_fly_over_mt": med["dusss_on_the_fly"] / med["mt"],
        "default_text_cache": cfg.text_cache,
        "cache_seconds_per_image": mat["cache_seconds_per_image"],
        # the one-off cache fill against the mt training time of a full run at this profile's settings
        "cache_share_of_run": cache_run / (cfg.epochs * steps_per_epoch * med["mt"]),
        "batch": {"labelled": cfg.labelled_bs, "unlabelled": cfg.unlabelled_bs, "image_size": cfg.image_size},
        "vlm": mat["vlm_source"],
    }


# ---------------------------------------------------------------- section 2: U-Net GFLOP/s
def _matmul_gflops(n: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    med = _round_robin({"mm": lambda: a @ b}, repeats, 1, device)["mm"]
    return 2.0 * n ** 3 / med / 1e9


class _UnetStep:
    """One supervised U-Net training step (forward, BCE, backward, Adam) under a speed variant."""

    def __init__(self, cfg: Config, device: torch.device, variant: str, x: torch.Tensor, y: torch.Tensor) -> None:
        seed_everything(cfg.seed)
        self.model = build_unet(cfg).to(device).train()
        self.channels_last = "channels_last" in variant
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        self.amp = torch.bfloat16 if "bf16" in variant else None
        self.forward = torch.compile(self.model) if variant == "compile" else self.model
        self.threads = 1 if variant == "threads=1" else None
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.loss = SupervisedSegLoss()
        self.x, self.y, self.device = x, y, device

    def __call__(self) -> None:
        previous = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            with torch.autocast(self.device.type, dtype=self.amp or torch.bfloat16, enabled=self.amp is not None):
                loss = self.loss(self.forward(self.x).float(), self.y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        finally:
            torch.set_num_threads(previous)


def _step_flops(cfg: Config, device: torch.device, x: torch.Tensor, y: torch.Tensor) -> int:
    model = build_unet(cfg).to(device).train()
    with FlopCounterMode(display=False) as counter:
        SupervisedSegLoss()(model(x), y).backward()
    return int(counter.get_total_flops())


def _unet_section(cfg: Config, device: torch.device, repeats: int, warmup: int, variants: tuple[str, ...],
                  matmul_n: int, progress: bool) -> dict[str, Any]:
    b = cfg.labelled_bs + cfg.unlabelled_bs
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.rand(b, 3, cfg.image_size, cfg.image_size, generator=g).to(device)  # (B, 3, H, W)
    y = (torch.rand(b, 1, cfg.image_size, cfg.image_size, generator=g) > 0.9).float().to(device)  # (B, 1, H, W)
    flops = _step_flops(cfg, device, x, y)
    steps: dict[str, _UnetStep] = {}
    skipped: dict[str, str] = {}
    for v in variants:
        try:
            steps[v] = _UnetStep(cfg, device, v, x, y)
            if v == "compile":
                steps[v]()  # compilation happens here, outside the timed rounds
        except Exception as exc:  # torch.compile needs a C++ compiler; report the variant, not a crash
            skipped[v] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            steps.pop(v, None)
            log.warning("U-Net variant %s skipped: %s", v, skipped[v])
    # the same fp32 step at the paper's U-Net width (base 64) on a small batch: is the gap the narrow demo net?
    wide_cfg = cfg.replace(unet_base=64)
    wide_b = 2
    steps["fp32_base64_batch2"] = _UnetStep(wide_cfg, device, "fp32", x[:wide_b], y[:wide_b])
    med = _round_robin(dict(steps), repeats, warmup, device, progress, "U-Net variants")
    flops_of = {v: flops for v in med}
    flops_of["fp32_base64_batch2"] = _step_flops(wide_cfg, device, x[:wide_b], y[:wide_b])
    mm32 = _matmul_gflops(matmul_n, torch.float32, device, repeats)
    mm16 = _matmul_gflops(matmul_n, torch.bfloat16, device, repeats)
    per = {v: {"step_seconds": t, "gflops": flops_of[v] / t / 1e9, "fraction_of_matmul": flops_of[v] / t / 1e9 / mm32,
               "speedup_vs_fp32": med["fp32"] / t if "fp32" in med else float("nan")}
           for v, t in med.items() if v != "fp32_base64_batch2"}
    t_wide = med["fp32_base64_batch2"]
    wide = {"flops_per_step": flops_of["fp32_base64_batch2"], "step_seconds": t_wide, "batch": wide_b,
            "gflops": flops_of["fp32_base64_batch2"] / t_wide / 1e9,
            "fraction_of_matmul": flops_of["fp32_base64_batch2"] / t_wide / 1e9 / mm32}
    best = max(per, key=lambda v: per[v]["gflops"])
    return {"flops_per_step": flops, "batch": b, "image_size": cfg.image_size, "unet_base": cfg.unet_base,
            "matmul_n": matmul_n, "matmul_fp32_gflops": mm32, "matmul_bf16_gflops": mm16,
            "variants": per, "skipped": skipped, "paper_width_fp32": wide, "best_variant": best,
            "best_fraction_of_matmul": per[best]["fraction_of_matmul"],
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}


# ---------------------------------------------------------------- section 3: VLM pre-training, memory
def _vlm_section(cfg: Config, device: torch.device, mat: dict, repeats: int, warmup: int,
                 progress: bool) -> dict[str, Any]:
    data = mat["data"]
    items = [data.train[i % len(data.train)] for i in range(cfg.vlm_batch_size)]
    images = torch.stack([it["image"] for it in items]).to(device)  # (B, 3, H, W)
    masks = torch.stack([it["mask"] for it in items]).to(device)  # (B, 1, H, W)
    texts = [it["text"] for it in items]
    para = _Paraphrases(cfg.seed)
    texts2 = [para[t][0] for t in texts]
    labelled = torch.arange(len(items), device=device) % 2 == 0  # half the batch carries a mask, as at ratio 0.5
    seed_everything(cfg.seed)
    model = DuSSSVLM.from_config(cfg).to(device).train()
    model.text_encoder.precompute(texts + texts2)
    objective = _Objective(cfg).to(device)
    params = [p for p in list(model.parameters()) + list(objective.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.vlm_lr, weight_decay=cfg.vlm_weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)

    def vlm_step() -> None:
        terms = objective(model, images, texts, texts2, masks, labelled, gen)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()

    med = _round_robin({"vlm": vlm_step}, repeats, warmup, device, progress, "VLM step")["vlm"]
    (lab,), (unl,) = _batches(mat, cfg, 1)
    ssmis_step = _MethodStep(cfg.replace(method="dusss"), build_unet(cfg).to(device), mat["guidance"],
                             cached=cfg.text_cache)
    ssmis_step(lab, unl, device)  # first step allocates the optimiser state
    return {"pairs_per_second": cfg.vlm_batch_size / med, "step_seconds": med, "batch": cfg.vlm_batch_size,
            "peak_memory_vlm_step": peak_memory_mb(vlm_step, device),
            "peak_memory_ssmis_step": peak_memory_mb(lambda: ssmis_step(lab, unl, device), device)}


# ---------------------------------------------------------------- section 4: data loading
def _loader_section(cfg: Config, mat: dict, step_seconds: float, n_batches: int) -> dict[str, Any]:
    """Images/s of the loop's batch pipeline (both streams: index, uint8 -> float, batched augmentation of
    images, masks and cached maps) next to the images/s the training step consumes."""
    stream = _streams(mat, cfg)
    _pipeline_batch(mat, cfg, stream)  # warm-up
    times = []
    for _ in range(max(n_batches, 20)):  # a median over many batches: one slow batch under load moves nothing
        t0 = time.perf_counter()
        _pipeline_batch(mat, cfg, stream)
        times.append(time.perf_counter() - t0)
    per_batch = statistics.median(times)
    delivered = (cfg.labelled_bs + cfg.unlabelled_bs) / per_batch
    consumed = (cfg.labelled_bs + cfg.unlabelled_bs) / step_seconds
    return {"num_workers": 0, "pipeline_seconds_per_step": per_batch, "delivered_images_per_second": delivered,
            "step_images_per_second": consumed, "loader_to_step_ratio": delivered / consumed}


# ---------------------------------------------------------------- GPU check: the step alone
def step_throughput(cfg: Config, *, amp: bool | None = None, steps: int = 20, warmup: int = 5) -> dict[str, Any]:
    """Images/s of the SSMIS training step (``dusss`` with cached text maps, and ``mt``) at ``cfg``'s size.

    Random images, masks and text maps of ``cfg``'s batch and image size stand
    in for data (the step's cost does not depend on the pixel values), so no
    data set or VLM is needed: this is what ``benchmarks/gpu_check.sh`` runs at
    the paper profile. ``amp`` (default: on for CUDA) runs the forward passes
    under bfloat16 autocast. Each figure is the median of ``steps`` timed steps
    after ``warmup`` untimed ones, the two methods taking turns.
    """
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    amp = device.type == "cuda" if amp is None else amp
    g = torch.Generator().manual_seed(cfg.seed)
    s, bl, bu = cfg.image_size, cfg.labelled_bs, cfg.unlabelled_bs
    lb = {"image": torch.rand(bl, 3, s, s, generator=g).to(device),
          "mask": (torch.rand(bl, 1, s, s, generator=g) > 0.9).float().to(device)}
    ub = {"image": torch.rand(bu, 3, s, s, generator=g).to(device),
          "text_logits": (4 * torch.randn(bu, 1, s, s, generator=g)).to(device)}
    seed_everything(cfg.seed)
    student = build_unet(cfg).to(device)
    steps_ = {"mt": _MethodStep(cfg.replace(method="mt"), student, amp=amp),
              "dusss_cached": _MethodStep(cfg.replace(method="dusss"), student, cached=True, amp=amp)}  # maps given
    med = _round_robin({k: (lambda st=st: st(lb, ub, device)) for k, st in steps_.items()}, steps, warmup, device)
    out = {"device": str(device), "machine": _machine(device), "amp_bf16": amp, "image_size": s,
           "batch": bl + bu, "unet_base": cfg.unet_base, "step_seconds": med,
           "images_per_second": {k: (bl + bu) / t for k, t in med.items()},
           "ratio_cached_over_mt": med["dusss_cached"] / med["mt"]}
    if device.type == "cuda":
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


# ---------------------------------------------------------------- entry points
def benchmark(cfg: Config, *, repeats: int = 5, warmup: int = 2, variants: tuple[str, ...] = UNET_VARIANTS,
              matmul_n: int = 2048, progress: bool = False) -> dict[str, Any]:
    """Run the four measurements at the settings of ``cfg`` and return them as one dict (see the module docstring).

    ``repeats`` timed rounds follow ``warmup`` untimed ones; each time is a
    median. ``variants`` picks the U-Net speed variants of section 2 (a subset
    of :data:`UNET_VARIANTS`; ``compile`` takes a while to compile on a CPU);
    ``matmul_n`` is the side of the float32 reference product. The data set of
    ``cfg`` is generated on first use, and the VLM is the pre-trained one when
    its checkpoint exists (a random one otherwise: the cost is the same).
    """
    unknown = [v for v in variants if v not in UNET_VARIANTS]
    if unknown:
        raise ConfigError(f"unknown U-Net variant(s) {unknown}; choose from {UNET_VARIANTS}")
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    mat = _ssmis_material(cfg, device, warmup + repeats)
    text = _text_guidance_section(cfg, device, mat, repeats, warmup, progress)
    unet = _unet_section(cfg, device, repeats, warmup, tuple(variants), matmul_n, progress)
    vlm = _vlm_section(cfg, device, mat, repeats, warmup, progress)
    default_step = text["step_seconds"]["dusss_cached" if cfg.text_cache else "dusss_on_the_fly"]
    loader = _loader_section(cfg, mat, default_step, warmup + repeats)
    return {
        "profile": cfg.profile, "device": str(device), "machine": _machine(device), "torch": torch.__version__,
        "repeats": repeats, "warmup": warmup, "load_average_1min": os.getloadavg()[0],
        "seconds": time.perf_counter() - t0,
        "text_guidance": text, "unet_flops": unet, "vlm_pretrain": vlm, "loader": loader,
    }


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads"


def format_table(result: dict[str, Any]) -> str:
    """The benchmark dict as a Markdown table (the one docs/speed.md quotes)."""
    t, u, v, d = result["text_guidance"], result["unet_flops"], result["vlm_pretrain"], result["loader"]
    s = t["step_seconds"]
    rows = [
        ("1 text guidance", "SSMIS step, mt", f"{1e3 * s['mt']:.1f} ms"),
        ("", "SSMIS step, dusss cached text maps (text_cache=true)",
         f"{1e3 * s['dusss_cached']:.1f} ms = {t['ratio_cached_over_mt']:.3f} x mt"),
        ("", "SSMIS step, dusss VLM every step (text_cache=false)",
         f"{1e3 * s['dusss_on_the_fly']:.1f} ms = {t['ratio_on_the_fly_over_mt']:.3f} x mt"),
        ("", "one-off cache fill", f"{1e3 * t['cache_seconds_per_image']:.2f} ms/image "
                                   f"= {100 * t['cache_share_of_run']:.1f} % of an mt run"),
        ("2 U-Net GFLOP/s", "float32 matmul reference",
         f"{u['matmul_fp32_gflops']:.1f} GFLOP/s (bf16: {u['matmul_bf16_gflops']:.1f})"),
    ]
    for name, r in u["variants"].items():
        rows.append(("", f"U-Net step, {name}", f"{r['gflops']:.1f} GFLOP/s = {r['fraction_of_matmul']:.2f} x matmul"
                                                  f" ({r['speedup_vs_fp32']:.2f} x fp32 speed)"))
    w = u["paper_width_fp32"]
    rows.append(("", f"U-Net step, fp32, paper width (base 64, batch {w['batch']})",
                 f"{w['gflops']:.1f} GFLOP/s = {w['fraction_of_matmul']:.2f} x matmul"))
    for name, why in u["skipped"].items():
        rows.append(("", f"U-Net step, {name}", f"skipped ({why[:60]})"))
    rows += [
        ("3 VLM pre-training", "throughput", f"{v['pairs_per_second']:.1f} pairs/s (batch {v['batch']})"),
        ("", "peak memory, Step-1 step", f"{v['peak_memory_vlm_step']['peak_mb']:.0f} MB "
                                         f"(+{v['peak_memory_vlm_step']['delta_mb']:.0f} MB)"),
        ("", "peak memory, Step-2 step", f"{v['peak_memory_ssmis_step']['peak_mb']:.0f} MB "
                                         f"(+{v['peak_memory_ssmis_step']['delta_mb']:.0f} MB)"),
        ("4 data loading", "batch pipeline delivers (in memory, batched augmentation)",
         f"{d['delivered_images_per_second']:.0f} images/s"),
        ("", "training step consumes", f"{d['step_images_per_second']:.0f} images/s "
                                       f"(loader_to_step_ratio = {d['loader_to_step_ratio']:.1f})"),
    ]
    lines = ["| section | measurement | value |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def bench_path(profile: str) -> Path:
    """``results/bench.json`` for the demo profile, ``results/bench_<profile>.json`` otherwise."""
    return results_dir() / f"{tagged('bench', profile)}.json"


def run(args, cfg: Config) -> int:
    """``python -m dusss bench``: run :func:`benchmark`, print its table and write the JSON.

    With ``--steps-only`` it runs :func:`step_throughput` instead (the GPU
    check), prints images/s and writes ``results/bench_steps_<profile>_<device type>.json``.
    """
    if getattr(args, "steps_only", False):
        res = step_throughput(cfg, steps=getattr(args, "repeats", 20), warmup=getattr(args, "warmup", 5))
        path = atomic_write_json(results_dir() / f"bench_steps_{cfg.profile}_{res['device'].split(':')[0]}.json", res)
        print(f"{res['machine']}: batch {res['batch']} at {res['image_size']} px, U-Net base {res['unet_base']}, "
              f"bf16 autocast {res['amp_bf16']}")
        for name, ips in res["images_per_second"].items():
            print(f"  {name:<13} {ips:8.1f} images/s  ({1e3 * res['step_seconds'][name]:.1f} ms/step)")
        print(f"  dusss / mt step time: {res['ratio_cached_over_mt']:.3f}  -> {path}")
        return 0
    variants = tuple(v for v in UNET_VARIANTS if not (getattr(args, "no_compile", False) and v == "compile"))
    result = benchmark(cfg, repeats=getattr(args, "repeats", 5), warmup=getattr(args, "warmup", 2),
                       variants=variants, matmul_n=getattr(args, "matmul_n", 2048), progress=True)
    path = bench_path(cfg.profile)
    if path.is_file():  # keep the keys other benchmarks wrote (benchmarks/run_speed.py: the whole-run times)
        kept = {k: v for k, v in json.loads(path.read_text()).items() if k.startswith(("demo_run", "run_over"))}
        result = {**kept, **result}
    result["loader_to_step_ratio"] = result["loader"]["loader_to_step_ratio"]
    atomic_write_json(path, result)
    print(f"machine: {result['machine']} (1-min load average {result['load_average_1min']:.2f})")
    print(format_table(result))
    print(f"-> {path}")
    return 0
