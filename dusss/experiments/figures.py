"""The runs behind Fig. 4 (qualitative comparison) and Fig. 5 (activation maps): which models, trained if missing.

:func:`comparison_configs` names the Step-2 runs Fig. 4 compares (Mean
Teacher, BCP when it is a registered method, DuSSS guided by the CLIP-style
VLM, DuSSS); the two text-guided ones are runs of the Tables grid (rows
``clip`` and ``dusss`` of :data:`dusss.runs.ROWS`, in the folders
:func:`dusss.runs.run_name` names), so Fig. 4 and Tables 1-2 share one
training of each. :func:`ensure_vlms` pre-trains (or reads) the two VLMs Fig.
5 explains, :func:`ensure_comparison_models` trains (or reads) every run of
Fig. 4. The maps, their measures and the drawing are :mod:`dusss.cam`
(notebook 05 calls both).
"""
from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..methods import METHODS
from ..pretrain import pretrain
from ..runs import ROWS, default_vlm_checkpoint, pretrain_config, run_name, ssmis_dir
from ..ssmis import train_ssmis

__all__ = ["clip_vlm_config", "comparison_configs", "ensure_vlms", "ensure_comparison_models"]

_GUIDED = (("CLIP", "clip"), ("DuSSS", "dusss"))  # Fig. 4's text-guided runs: label -> row of dusss.runs.ROWS


def clip_vlm_config(cfg: Config) -> Config:
    """The CLIP-style VLM of the comparison: the same pre-training with only cross-modal InfoNCE (no SSS, IMC, L_tg).

    Its switches are the Tables grid's ``clip`` row (:data:`dusss.runs.ROWS`), so both use one VLM.
    """
    return cfg.replace(**ROWS["clip"].switches, out_dir="", vlm_checkpoint="")


def comparison_configs(cfg: Config) -> dict[str, Config]:
    """The Step-2 runs Fig. 4 compares, label -> Config, at ``cfg``'s data set, ratio and seed.

    ``MT`` (Mean Teacher), ``BCP`` (only when ``bcp`` is a registered method,
    :data:`dusss.methods.METHODS`), ``CLIP`` (DuSSS's Step 2 guided by the
    CLIP-style VLM of :func:`clip_vlm_config`) and ``DuSSS``. The two
    text-guided runs live in the folders of the Tables grid
    (:func:`dusss.runs.run_name`, e.g. ``dusss-sss0-cmc1-imc0-tg0-r0.25-s666``),
    so Fig. 4 and Tables 1-2 share one training of each.
    """
    base = cfg.replace(out_dir="", vlm_checkpoint="")
    parent = ssmis_dir(base.replace(method="dusss")).parent
    runs = {"MT": base.replace(method="mt")}
    if "bcp" in METHODS:
        runs["BCP"] = base.replace(method="bcp")
    for label, row in _GUIDED:
        c = base.replace(method="dusss", **ROWS[row].switches)
        runs[label] = c.replace(out_dir=str(parent / run_name(row, c.ratio, c.seed)))
    return runs


def ensure_vlms(cfg: Config, *, progress: bool = True) -> dict[str, Path]:
    """Pre-train (or read) the VLMs of :func:`comparison_configs`' guided runs; ``{"DuSSS": vlm.pt, "CLIP": vlm.pt}``.

    Both are the VLMs those runs read (:func:`dusss.runs.pretrain_config`: at
    the pre-training share of ``ratio``, as the Tables grid does), so their
    mask supervision never saw an image that is unlabelled in Step 2; a
    finished run is read, not retrained.
    """
    runs = comparison_configs(cfg)
    paths: dict[str, Path] = {}
    for label in ("DuSSS", "CLIP"):  # the order notebook 05's tables and Fig. 5 show them in
        pretrain(pretrain_config(runs[label]), progress=progress)
        paths[label] = default_vlm_checkpoint(runs[label])
    return paths


def ensure_comparison_models(cfg: Config, *, progress: bool = True) -> dict[str, Path]:
    """Train every run of :func:`comparison_configs` that is missing (after :func:`ensure_vlms`); label -> ``best.pt``.

    Finished runs are read, not retrained (:func:`dusss.ssmis.train_ssmis`
    returns at once), so at the demo profile this reuses what notebooks 02 and
    03 wrote.
    """
    ensure_vlms(cfg, progress=progress)
    paths: dict[str, Path] = {}
    for label, run_cfg in comparison_configs(cfg).items():
        train_ssmis(run_cfg, progress=progress)
        paths[label] = ssmis_dir(run_cfg) / "best.pt"
    return paths
