"""The run registry: what a run is called, where it lives and which Step-1 VLM it reads, in one place.

Every harness names runs through this module -- :mod:`dusss.experiments.tables`
and :mod:`dusss.experiments.grid` (the Tables grid), :mod:`dusss.experiments.figures`
(Fig. 4), ``scripts/ssmis_table.py`` and the notebooks -- and the library reads
its folders from it (:mod:`dusss.pretrain`, :mod:`dusss.ssmis`):

- **Pre-training share.** A Step-2 run at label share ``q`` reads a VLM
  pre-trained at :func:`pretrain_ratio` ``(q) = min(q, PRETRAIN_RATIO)``, whose
  config is :func:`pretrain_config`; :func:`default_vlm_checkpoint` is its
  ``vlm.pt``.
- **VLM variants.** A Step-1 run is named by its loss switches
  (:func:`vlm_variant`, e.g. ``sss1-cmc1-imc1-tg1``), or by its objective when that
  is not DuSSS's (``mgca-tg0``, ``cmitm-tg0``, ``asg-tg0``), in :func:`pretrain_dir`.
- **Rows.** :data:`ROWS` are the rows of Tables 1 and 2 (a method of
  :mod:`dusss.methods` plus, for text-guided rows, the VLM switches);
  :func:`run_name` names one run of a row (``<method>[-<variant>]-r<ratio>-s<seed>``),
  :func:`run_file` is its results file under ``results/runs/`` and
  :func:`run_config` its config. Step-2 runs outside the tables live in
  :func:`ssmis_dir`.

The roots these folders hang from (``runs/``, ``results/``) are :mod:`dusss.paths`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .config import Config, ConfigError, make_config
from .methods import get_method
from .paths import results_dir, runs_dir

__all__ = ["PRETRAIN_RATIO", "pretrain_ratio", "pretrain_config", "VLM_SWITCHES", "VLM_OBJECTIVE", "vlm_variant",
           "pretrain_dir", "default_vlm_checkpoint", "ssmis_dir", "RowSpec", "ROWS", "TABLE1_ROWS", "TABLE2_ROWS", "row_spec",
           "run_name", "run_file", "needs_vlm", "run_config"]

# ---------------------------------------------------------------- Step 1: which VLM a run reads
PRETRAIN_RATIO = 0.25  # a Step-2 run at share q reads a VLM pre-trained at min(q, 0.25): inside its labelled split


def pretrain_ratio(ratio: float) -> float:
    """The label share the Step-1 VLM of a Step-2 run at ``ratio`` is pre-trained at: ``min(ratio, 0.25)``.

    The VLM's mask supervision must only see images labelled in the Step-2
    run (the leakage guard of :func:`dusss.ssmis.train_ssmis` refuses any
    other), and the 25 % split lies inside every larger one, so one VLM
    serves 25 %, 50 % and 100 %; a smaller share gets its own.
    """
    return min(float(ratio), PRETRAIN_RATIO)


def pretrain_config(cfg: Config) -> Config:
    """The Step-1 run a Step-2 run at ``cfg`` reads: the same settings at :func:`pretrain_ratio` share, in its
    default folder (:func:`pretrain_dir`). Pass it to :func:`dusss.pretrain.pretrain` to train that VLM."""
    return cfg.replace(ratio=pretrain_ratio(cfg.ratio), out_dir="")


VLM_SWITCHES = ("use_sss", "use_cmc", "use_imc", "use_tg")  # the Step-1 loss switches a VLM variant is named by
VLM_OBJECTIVE = "step1_objective"  # ... and the Step-1 objective (dusss.config.STEP1_OBJECTIVES); "dusss" if omitted


def vlm_variant(switches: Config | Mapping[str, Any]) -> str:
    """Short name of the Step-1 loss of a config or a mapping (every key of :data:`VLM_SWITCHES`, and
    :data:`VLM_OBJECTIVE` unless it is ``"dusss"``), e.g. ``sss1-cmc1-imc1-tg1`` (DuSSS), ``sss0-cmc1-imc0-tg0``
    (CLIP-style) or ``mgca-tg0`` (MGCA's objective, which runs with SSS/CMC/IMC off, so only ``L_tg`` is named):
    a VLM of another objective never shares a folder with a DuSSS one."""
    keys = VLM_SWITCHES + (VLM_OBJECTIVE,)
    s = {k: getattr(switches, k) for k in keys} if isinstance(switches, Config) else switches
    objective = s.get(VLM_OBJECTIVE, "dusss")
    if objective != "dusss":
        return f"{objective}-tg{int(s['use_tg'])}"
    return f"sss{int(s['use_sss'])}-cmc{int(s['use_cmc'])}-imc{int(s['use_imc'])}-tg{int(s['use_tg'])}"


def pretrain_dir(cfg: Config) -> Path:
    """``out_dir`` if set, else ``runs/pretrain/<dataset>-<profile>/<variant>-s<seed>[-r<ratio>]``.

    The ``-r<ratio>`` suffix marks a VLM pre-trained below :data:`PRETRAIN_RATIO`.
    """
    if cfg.out_dir:
        return Path(cfg.out_dir)
    suffix = f"-r{cfg.ratio:g}" if cfg.ratio < PRETRAIN_RATIO else ""
    return runs_dir() / "pretrain" / f"{cfg.dataset}-{cfg.profile}" / f"{vlm_variant(cfg)}-s{cfg.seed}{suffix}"


def default_vlm_checkpoint(cfg: Config) -> Path:
    """``vlm_checkpoint`` if set, else ``vlm.pt`` in :func:`pretrain_dir` of :func:`pretrain_config` ``(cfg)``:
    the VLM of the same settings at the pre-training share of ``cfg.ratio``."""
    if cfg.vlm_checkpoint:
        return Path(cfg.vlm_checkpoint)
    return pretrain_dir(pretrain_config(cfg)) / "vlm.pt"


# ---------------------------------------------------------------- Step 2: where a run lives
def _stem(method: str | None, ratio: float, seed: int, variant: str = "") -> str:
    """``<method>[-<variant>]-r<ratio>-s<seed>``: the one spelling of a Step-2 run's folder and results file."""
    return f"{method}{f'-{variant}' if variant else ''}-r{ratio:g}-s{seed}"


def ssmis_dir(cfg: Config) -> Path:
    """``out_dir`` if set, else ``runs/ssmis/<dataset>-<profile>/<method>-r<ratio>-s<seed>``."""
    if cfg.out_dir:
        return Path(cfg.out_dir)
    return runs_dir() / "ssmis" / f"{cfg.dataset}-{cfg.profile}" / _stem(cfg.method, cfg.ratio, cfg.seed)


# ---------------------------------------------------------------- the rows of Tables 1 and 2
@dataclass(frozen=True)
class RowSpec:
    """One row of Table 1 or 2: how to train it (``method`` + VLM switches) and where the paper's numbers are.

    ``method`` None = not implemented (the row shows the paper's numbers only);
    ``ratio`` fixes the label share (U-Net 100 %); ``paper1`` is the method's
    name in the paper's Table 1, ``paper2`` its ``(sss, dcl, tg)`` in Table 2.
    """

    label: str
    method: str | None
    switches: Mapping[str, Any] = field(default_factory=dict)
    ratio: float | None = None
    paper1: str | None = None
    paper2: tuple[int, int, int] | None = None


def _vlm(sss: bool, imc: bool, tg: bool) -> dict[str, bool]:
    return {"use_sss": sss, "use_cmc": True, "use_imc": imc, "use_tg": tg}


def _objective(objective: str, tg: bool = False) -> dict[str, Any]:
    """A VLM pre-trained with a Step-1 objective that is not DuSSS's (``step1_objective`` = ``"mgca"``,
    ``"cmitm"``, ``"asg"``) in place of SSS/CMC/IMC; ``L_tg`` off by default, as in the CLIP-style row."""
    return {"step1_objective": objective, "use_sss": False, "use_cmc": False, "use_imc": False, "use_tg": tg}


ROWS: dict[str, RowSpec] = {
    "unet100": RowSpec("U-Net, 100 % labels", "supervised", ratio=1.0, paper1="U-Net"),
    "clipseg": RowSpec("CLIP (CLIPSeg, reads the report), 100 % labels", "clipseg", ratio=1.0, paper1="CLIP"),
    "vilt": RowSpec("ViLT (reads the report), 100 % labels", "vilt", ratio=1.0, paper1="ViLT"),
    "unet": RowSpec("U-Net, labelled part only", "supervised"),
    "mt": RowSpec("Mean Teacher", "mt", paper1="MT", paper2=(0, 0, 0)),
    "bcp": RowSpec("BCP", "bcp", paper1="BCP"),
    "ucmt": RowSpec("UCMT (simplified)", "ucmt", paper1="UCMT"),
    "cct": RowSpec("CCT", "cct", paper1="CCT"),
    "mcnet": RowSpec("MC-Net", "mcnet", paper1="MC-Net"),
    "ssnet": RowSpec("SS-Net (simplified)", "ssnet", paper1="SS-Net"),
    "lvit": RowSpec("LViT (LViT-T, reads the report; EPI + LV loss)", "lvit", paper1="LViT"),
    "clip": RowSpec("CLIP-style VLM + text-guided SSMIS", "dusss", _vlm(False, False, False)),
    "cmitm": RowSpec("CMITM-pretrained VLM + text-guided SSMIS", "dusss", _objective("cmitm"), paper1="CMITM"),
    "asg": RowSpec("ASG-pretrained VLM + text-guided SSMIS", "dusss", _objective("asg"), paper1="ASG"),
    "mgca": RowSpec("MGCA-pretrained VLM + text-guided SSMIS", "dusss", _objective("mgca"), paper1="MGCA"),
    "sss": RowSpec("SSS", "dusss", _vlm(True, False, False), paper2=(1, 0, 0)),
    "dcl": RowSpec("DCL", "dusss", _vlm(False, True, False), paper2=(0, 1, 0)),
    "sss+tg": RowSpec("SSS + L_tg", "dusss", _vlm(True, False, True), paper2=(1, 0, 1)),
    "dcl+tg": RowSpec("DCL + L_tg", "dusss", _vlm(False, True, True), paper2=(0, 1, 1)),
    "sss+dcl": RowSpec("SSS + DCL", "dusss", _vlm(True, True, False), paper2=(1, 1, 0)),
    "dusss": RowSpec("DuSSS (SSS + DCL + L_tg)", "dusss", _vlm(True, True, True), paper1="DuSSS", paper2=(1, 1, 1)),
}
TABLE1_ROWS = ("unet100", "clipseg", "vilt", "unet", "mt", "bcp", "ucmt", "cct", "mcnet", "ssnet", "lvit", "clip",
               "cmitm", "asg", "mgca", "dusss")
TABLE2_ROWS = ("mt", "sss", "dcl", "sss+tg", "dcl+tg", "sss+dcl", "dusss")


def row_spec(row: str) -> RowSpec:
    """The :class:`RowSpec` of ``row``; an unknown row raises :class:`~dusss.config.ConfigError` naming the rows."""
    if row not in ROWS:
        raise ConfigError(f"unknown table row {row!r}; choose from {', '.join(ROWS)}")
    return ROWS[row]


def run_name(row: str, ratio: float, seed: int) -> str:
    """File stem of one run: ``<method>[-<vlm variant>]-r<ratio>-s<seed>``, shared by rows that train the same thing.

    Table 2's baseline and Table 1's Mean Teacher are one run; so are the two
    DuSSS rows. A row with a fixed share (:attr:`RowSpec.ratio`) ignores ``ratio``.
    """
    spec = row_spec(row)
    ratio = spec.ratio if spec.ratio is not None else ratio
    return _stem(spec.method, ratio, seed, vlm_variant(spec.switches) if spec.switches else "")


def run_file(profile: str, dataset: str, row: str, ratio: float, seed: int) -> Path:
    """``results/runs/<dataset>-<profile>/<run_name>.json``: the run's saved results."""
    return results_dir() / "runs" / f"{dataset}-{profile}" / f"{run_name(row, ratio, seed)}.json"


def needs_vlm(row: str) -> bool:
    """Whether the row's method reads the Step-1 VLM's text-guided masks (so a VLM must be pre-trained first)."""
    spec = row_spec(row)
    return spec.method is not None and get_method(spec.method).uses_text


def run_config(profile: str, dataset: str, row: str, ratio: float, seed: int, overrides: Mapping[str, Any]) -> Config:
    """The run's config. Text-guided rows train in a folder named by their VLM switches
    (``dusss-sss1-cmc1-imc0-tg1-r0.5-s666``): :func:`ssmis_dir` names a run by
    method, ratio and seed only, so rows that differ only in their VLM would otherwise share
    one folder and each would retrain over the other's finished run."""
    spec = row_spec(row)
    ratio = spec.ratio if spec.ratio is not None else ratio
    cfg = make_config(profile, dict(overrides), dataset=dataset, method=spec.method, ratio=ratio, seed=seed,
                      **spec.switches)
    if spec.switches and not cfg.out_dir:
        cfg = cfg.replace(out_dir=str(ssmis_dir(cfg).parent / run_name(row, ratio, seed)))
    return cfg
