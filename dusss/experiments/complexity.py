"""Params and FLOPs of the network each table row runs at inference, beside the paper's "Param (M)" / "Flops (G)".

``python -m dusss complexity [--size 224] [--profile demo]`` writes
``results/complexity[_<profile>].csv`` (:func:`dusss.paths.tagged`) and prints it.
One line per row of :data:`dusss.runs.ROWS` (Table 1's rows first): the network
that row *tests* with, built at the profile's config and counted on one
``size`` x ``size`` image, beside the paper's Table-1 numbers of the method the
row stands for (:mod:`dusss.paper_tables`; empty where the paper has none).

**What is counted.** Inference only: Step 2 validates, saves and tests the
student alone (:class:`dusss.methods.base.Models`), so every method's extra
networks -- CCT's auxiliary and MC-Net's extra decoders, SS-Net's heads, UCMT's
second student, the EMA teacher -- and, for text-guided rows (DuSSS, the
CLIP-style row: ``uses_text``), the Step-1 VLM are training-only. Their
parameters are in ``train_only_params_m`` (the teacher, a copy of the student,
is named but not added), and ``counted`` says in words what each number holds.
The student is built as :func:`dusss.ssmis.train_ssmis` builds it:
:func:`dusss.textseg.build_student` of the method's ``student`` attribute
(absent = the U-Net, :func:`dusss.unet.build_unet`), so a method whose student
is a registered architecture (:data:`dusss.textseg.STUDENTS`: the U-Net, the
CLIP and ViLT rows' text-conditioned students) is counted with no change here.
A text-conditioned student is run on one image and one report
(:data:`EXAMPLE_REPORT`); a frozen text encoder it holds outside its parameters
(:func:`held_outside`) runs in that pass, so its FLOPs are in ``gflops``, while
its parameters are named in ``counted`` and kept out of ``params_m``, which
holds ``student.parameters()`` (what trains and is saved; the paper's CLIP
row, 87 M, is about the size of a ViT-B image tower alone).

A row with no method, an unregistered method, or a network that fails to build
or run is a line with ``status = "not built"`` and the reason in ``counted``,
never a crash: the table always has every row.

**FLOPs or MACs.** :class:`torch.utils.flop_counter.FlopCounterMode` counts a
multiply-add as 2 FLOPs (convolutions, transposed convolutions and matrix
products; element-wise layers are not counted): ``gflops`` is its count,
``gmacs = gflops / 2``. The paper's "Flops (G)" is on the **MAC** scale:
for LViT's U-Net (14,751,873 parameters = the paper's 14.75 M; this project's
U-Net at base 64) it prints 25.19 G, LViT's own paper prints 50.3 G "FLOPs" for
the same network (2 x 25.15), and a count made the way ``ptflops`` counts
(a transposed conv charged per *output* pixel, i.e. 4x its true MACs for the
2x2 stride-2 up-sampling, plus bias, BatchNorm, ReLU and pooling element-wise
ops) gives 25.20 G. The true MAC count at 224 x 224 is 22.65 G (45.29 GFLOPs),
which the closed form of the convolutions reproduces; the 2.5 G gap to the
paper is that over-count of the four transposed convs, not another network.
So compare ``gmacs`` with ``paper_flops_g``.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..config import Config, ConfigError
from ..methods import METHODS, method_parameters
from ..paper_tables import paper_table1
from ..paths import results_dir, tagged
from ..runs import ROWS, TABLE1_ROWS, row_spec
from ..textseg import build_student, needs_text
from ..utils import atomic_write_text, get_logger
from ..vlm import DuSSSVLM

__all__ = ["count_complexity", "held_outside", "inference_network", "row_complexity", "complexity_table",
           "format_table", "write_complexity", "COLUMNS", "EXAMPLE_REPORT", "run"]

log = get_logger(__name__)

COLUMNS = ["row", "label", "method", "profile", "image_size", "status", "params_m", "gflops", "gmacs",
           "paper_params_m", "paper_flops_g", "train_only_params_m", "counted"]
# a report in the QaTa grammar, the text input of a text-conditioned student's example forward pass
EXAMPLE_REPORT = "Bilateral pulmonary infection, two infected areas, all left lung and lower right lung."


def count_complexity(module: nn.Module, inputs: tuple[Any, ...]) -> tuple[int, int]:
    """``(parameters, FLOPs)`` of ``module`` on one forward pass of ``inputs``, in eval mode without gradients.

    Parameters are all of the module's (trainable or frozen, each counted
    once); FLOPs are :class:`~torch.utils.flop_counter.FlopCounterMode`'s total
    (2 per multiply-add) of everything the forward pass runs.
    """
    was_training = module.training
    module.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            module(*inputs)
    finally:
        module.train(was_training)
    return sum(p.numel() for p in module.parameters()), int(counter.get_total_flops())


def held_outside(module: nn.Module) -> dict[str, int]:
    """Modules that ``module`` (or a submodule) holds as plain attributes, outside its parameters: name -> parameters.

    A text-conditioned student keeps its frozen text encoder so (:mod:`dusss.textseg`): used at test time, yet not
    in ``module.parameters()``.
    """
    seen = {id(p) for p in module.parameters()}
    out = {}
    for prefix, sub in module.named_modules():
        for name, value in vars(sub).items():
            if isinstance(value, nn.Module) and name != "_modules":
                own = [p for p in value.parameters() if id(p) not in seen]
                seen.update(id(p) for p in own)
                if own:
                    out[f"{prefix}.{name}".lstrip(".")] = sum(p.numel() for p in own)
    return out


def inference_network(cfg: Config, size: int) -> tuple[nn.Module, tuple[Any, ...], str]:
    """The network a run of ``cfg.method`` is tested with, the inputs of one ``size`` x ``size`` forward pass
    (plus :data:`EXAMPLE_REPORT` for a text-conditioned student) and a phrase naming it.

    Built as the training loop builds it: :func:`dusss.textseg.build_student` of the method's ``student``
    attribute (absent = the U-Net).
    """
    kind = getattr(METHODS[cfg.method], "student", "unet")
    module = build_student(cfg, kind)
    x = torch.zeros(1, 3, size, size)  # (1, 3, S, S)
    if needs_text(module):
        return module, (x, [EXAMPLE_REPORT]), f"student {kind} ({type(module).__name__}, reads the report at test)"
    what = f"student U-Net (base {cfg.unet_base})" if kind == "unet" else f"student {kind} ({type(module).__name__})"
    return module, (x,), what


def _millions(n: int) -> str:
    return f"{n / 1e6:.3g} M"


def _training_only(cfg: Config, vlm_params: Callable[[Config], tuple[int, int]]) -> tuple[int, list[str]]:
    """Parameters and descriptions of what only training uses: the method's own modules, the teacher, the VLM."""
    cls = METHODS[cfg.method]
    with torch.random.fork_rng(devices=[]):
        method = cls(cfg, torch.device("cpu"))
    params: dict[int, nn.Parameter] = {}
    parts = []
    for name, value in vars(method).items():
        own = {id(p): p for p in value.parameters()} if isinstance(value, nn.Module) else {}
        if own:  # a loss module without parameters is no network
            params.update(own)
            parts.append(f"{name} {_millions(sum(p.numel() for p in own.values()))}")
    hooked = {id(p): p for p in method_parameters(method) if id(p) not in params}
    if hooked:
        params.update(hooked)
        parts.append(f"parameters() {_millions(sum(p.numel() for p in hooked.values()))}")
    total = sum(p.numel() for p in params.values())
    if cls.uses_teacher:
        parts.append("EMA teacher (copy of the student, not added)")
    if cls.uses_text:
        n, frozen = vlm_params(cfg)
        total += n
        parts.append(f"Step-1 VLM {_millions(n)} (frozen text encoder {_millions(frozen)})")
    return total, parts


def _paper_numbers(name: str | None) -> tuple[float, float]:
    """The paper's Table-1 ``(params_m, gflops)`` of method ``name`` (given once per method; NaN where none)."""
    if not name:
        return float("nan"), float("nan")
    p1 = paper_table1()
    hit = p1[(p1["method"] == name) & p1["params_m"].notna()]
    return (float(hit["params_m"].iloc[0]), float(hit["gflops"].iloc[0])) if len(hit) else (float("nan"),) * 2


def row_complexity(row: str, cfg: Config, size: int = 224, *,
                   vlm_params: Callable[[Config], tuple[int, int]] | None = None) -> dict[str, Any]:
    """One line of the table for ``row`` at ``cfg``'s settings (``image_size`` set to ``size``).

    ``status`` is ``"measured"`` or ``"not built"`` (then ``counted`` says why
    and the numbers are NaN). ``vlm_params(cfg) -> (total, frozen)`` counts
    the Step-1 VLM (default: build :class:`~dusss.vlm.DuSSSVLM`); pass a cached
    one to build it once for several rows.
    """
    spec = row_spec(row)
    paper_params, paper_g = _paper_numbers(spec.paper1)
    line = {"row": row, "label": spec.label, "method": spec.method or "", "profile": cfg.profile, "image_size": size,
            "status": "not built", "params_m": float("nan"), "gflops": float("nan"), "gmacs": float("nan"),
            "paper_params_m": paper_params, "paper_flops_g": paper_g, "train_only_params_m": float("nan"),
            "counted": ""}
    if spec.method is None:
        return {**line, "counted": "not built: no implementation in this project (paper's numbers only)"}
    if spec.method not in METHODS:
        return {**line, "counted": f"not built: method {spec.method!r} is not registered in dusss.methods"}
    try:
        row_cfg = cfg.replace(method=spec.method, image_size=size, **spec.switches,
                              **({"ratio": spec.ratio} if spec.ratio is not None else {}))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(row_cfg.seed)
            module, inputs, what = inference_network(row_cfg, size)
        params, flops = count_complexity(module, inputs)
        outside = held_outside(module)
        train_only, parts = _training_only(row_cfg, vlm_params or _vlm_params)
    except Exception as exc:  # a row that cannot be built yet is a line of the table, not a crash
        log.warning("complexity of row %s: %s: %s", row, type(exc).__name__, exc)
        return {**line, "counted": f"not built: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"}
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    if frozen:
        what += f", of which frozen {_millions(frozen)}"
    if outside:
        what += "; also run, held outside its parameters (not in params_m): " + ", ".join(
            f"{name} {_millions(n)}" for name, n in outside.items())
    counted = f"inference: {what}; train only: " + ("; ".join(parts) if parts else "nothing")
    return {**line, "status": "measured", "params_m": params / 1e6, "gflops": flops / 1e9, "gmacs": flops / 2e9,
            "train_only_params_m": train_only / 1e6, "counted": counted}


def _vlm_params(cfg: Config) -> tuple[int, int]:
    """``(all parameters, frozen text-encoder parameters)`` of the Step-1 VLM of ``cfg``."""
    with torch.random.fork_rng(devices=[]):
        vlm = DuSSSVLM.from_config(cfg)
    return sum(p.numel() for p in vlm.parameters()), sum(p.numel() for p in vlm.text_encoder.backbone.parameters())


def complexity_table(cfg: Config, size: int = 224, rows: Iterable[str] | None = None) -> pd.DataFrame:
    """:func:`row_complexity` for ``rows`` (None: Table 1's rows, then every other row of :data:`ROWS`).

    The VLM is built once per distinct row config (rows sharing one Step 2
    config share it).
    """
    rows = list(rows) if rows is not None else list(dict.fromkeys([*TABLE1_ROWS, *ROWS]))
    cache: dict[Config, tuple[int, int]] = {}

    def vlm_params(c: Config) -> tuple[int, int]:
        if c not in cache:
            cache[c] = _vlm_params(c)
        return cache[c]

    return pd.DataFrame([row_complexity(r, cfg, size, vlm_params=vlm_params) for r in rows], columns=COLUMNS)


def _cell(x: Any, fmt: str) -> str:
    return "–" if isinstance(x, float) and pd.isna(x) else format(x, fmt)


def format_table(table: pd.DataFrame) -> str:
    """Markdown of :func:`complexity_table` (numbers rounded; ``counted`` as the last column)."""
    head = ("| row | label | params (M) | GMACs | GFLOPs | paper params (M) | paper Flops (G, MAC scale) "
            "| train-only params (M) | counted |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.row} | {r.label} | {_cell(r.params_m, '.3f')} | {_cell(r.gmacs, '.3f')} | "
                     f"{_cell(r.gflops, '.3f')} | {_cell(r.paper_params_m, '.2f')} | {_cell(r.paper_flops_g, '.2f')} | "
                     f"{_cell(r.train_only_params_m, '.2f')} | {r.counted} |")
    return "\n".join(lines) + "\n"


def write_complexity(table: pd.DataFrame, profile: str):
    """Write ``table`` to ``results/complexity[_<profile>].csv`` (atomically) and return the path."""
    path = results_dir() / f"{tagged('complexity', profile)}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, table.to_csv(index=False, float_format="%.6g"))
    return path


def run(args: argparse.Namespace, cfg: Config) -> int:
    """``python -m dusss complexity``: count every row at ``cfg``'s profile on one ``--size`` image, write, print."""
    size = int(getattr(args, "size", 224))
    if size <= 0 or size % 16:
        raise ConfigError(f"--size {size} must be a positive multiple of 16 (the U-Net pools four times); "
                          "the paper's is 224")
    table = complexity_table(cfg, size)
    path = write_complexity(table, cfg.profile)
    print(f"profile {cfg.profile}, one {size}x{size} image; GMACs = GFLOPs / 2, the scale of the paper's Flops (G)")
    print(format_table(table))
    print("written:", path)
    return 0
