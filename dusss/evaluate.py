"""Score a segmentation model on a split: Dice and mIoU per image, as the paper reports them.

:func:`evaluate_model` is what training uses every epoch (validation) and at the
end (test, best checkpoint); :func:`evaluate_checkpoint` and ``python -m dusss
evaluate --checkpoint PATH --split test`` score a saved ``best.pt``/``last.pt``
and write ``eval_<split>.json`` and ``eval_<split>_per_image.csv`` beside it (or
into ``--out``). Definitions, including the empty-mask case, are in
:mod:`dusss.metrics`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .config import Config, make_config, upgrade_keys
from .data import LViTDataset
from .errors import CheckpointError
from .methods import get_method
from .metrics import binarize, dice_of_masks, summarize_scores
from .textseg import build_student, segment
from .utils import atomic_write_json, get_logger, load_checkpoint, resolve_device

__all__ = ["evaluate_model", "evaluate_checkpoint", "load_student"]

log = get_logger(__name__)


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset: Dataset, *, device: torch.device | str = "cpu", threshold: float = 0.5,
                   batch_size: int = 16, progress: bool = False) -> tuple[dict[str, float], "Any"]:
    """Per-image Dice/IoU of ``model`` (logits out) on ``dataset`` (LViT items): ``(summary, per-image DataFrame)``.

    The model is put in eval mode (and left there); a text-conditioned model
    (:func:`dusss.textseg.needs_text`) reads each image's own report. The summary is
    :func:`dusss.metrics.summarize_scores` (``dice``, ``miou``, ``dice_std``,
    ``n``); the DataFrame has one row per image: ``name``, ``dice``, ``iou``,
    ``gt_pixels``, ``pred_pixels``.
    """
    model.eval()
    device = torch.device(device)
    rows: list[dict[str, Any]] = []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        x, y = batch["image"].to(device), batch["mask"].to(device) > 0.5  # (B, 3, H, W), (B, 1, H, W)
        pred = binarize(segment(model, x, batch.get("text")), threshold)  # (B, 1, H, W)
        dice, iou = dice_of_masks(pred, y)
        for i, name in enumerate(batch["name"]):
            rows.append({"name": name, "dice": float(dice[i]), "iou": float(iou[i]),
                         "gt_pixels": int(y[i].sum()), "pred_pixels": int(pred[i].sum())})
    table = pd.DataFrame(rows, columns=["name", "dice", "iou", "gt_pixels", "pred_pixels"])
    return summarize_scores(table["dice"], table["iou"]), table


def load_student(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Config, dict]:
    """Rebuild the student saved in ``best.pt`` / ``last.pt``: ``(model in eval mode, its Config, checkpoint)``.

    The architecture is the one the run's method trains (its ``student``
    attribute: the U-Net, or a text-conditioned segmenter of :mod:`dusss.textseg`).
    """
    ckpt = load_checkpoint(path, map_location="cpu")
    if not isinstance(ckpt, dict) or "student" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is not an ssmis checkpoint (no 'student'/'config'); use the best.pt or "
                              "last.pt that `python -m dusss ssmis` writes")
    cfg = _config_from_dict(ckpt["config"])
    model = build_student(cfg, getattr(get_method(cfg.method), "student", "unet"))
    model.load_state_dict(ckpt["student"])
    return model.to(device).eval(), cfg, ckpt


def _config_from_dict(data: dict) -> Config:
    data = upgrade_keys(data)
    profile = data.pop("profile", "demo")
    known = {f.name for f in dataclasses.fields(Config)}
    return make_config(profile, {k: v for k, v in data.items() if k in known})


def evaluate_checkpoint(checkpoint: str | Path, *, split: str = "test", data_root: str | Path | None = None,
                        device: str = "auto", out_dir: str | Path | None = None) -> dict[str, Any]:
    """Score the student of an ssmis checkpoint on ``split``; write and return ``eval_<split>.json``.

    The image size and network width come from the checkpoint's config; the
    data folder is ``data_root`` if given, else the one the run used. Results
    go beside the checkpoint unless ``out_dir`` is given.
    """
    checkpoint = Path(checkpoint)
    model, cfg, ckpt = load_student(checkpoint, resolve_device(device))
    root = Path(data_root) if data_root else cfg.resolved_data_root()
    dataset = LViTDataset(root, split, cfg.image_size)
    summary, table = evaluate_model(model, dataset, device=next(model.parameters()).device,
                                    threshold=cfg.threshold, batch_size=cfg.labelled_bs + cfg.unlabelled_bs,
                                    progress=True)
    out = Path(out_dir) if out_dir else checkpoint.parent
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / f"eval_{split}_per_image.csv", index=False)
    result = {"checkpoint": str(checkpoint), "split": split, "data_root": str(root), "method": cfg.method,
              "ratio": cfg.ratio, "epoch": int(ckpt.get("epoch", -1)), "threshold": cfg.threshold, **summary}
    atomic_write_json(out / f"eval_{split}.json", result)
    return result
