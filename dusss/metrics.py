"""Dice and IoU as the paper and LViT compute them: per image, then averaged.

A prediction is foreground where ``sigmoid(logit) > threshold`` (0.5 in the
paper). For each image, ``Dice = 2|P and Y| / (|P| + |Y|)`` and
``IoU = |P and Y| / |P or Y|`` over its pixels; the reported Dice and mIoU are
the means over images (the paper's formula with one foreground class).

The empty-mask case, stated: when the ground truth **and** the prediction of an
image are both empty, its Dice and IoU are 1 (a correct "nothing here"); when
only one of them is empty they are 0. No smoothing constant is added, so a
score is never inflated on small lesions.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

__all__ = ["binarize", "dice_iou_per_image", "summarize_scores", "dice_of_masks"]


def binarize(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Foreground mask ``sigmoid(logits) > threshold`` as a bool tensor of the same shape.

    Compared in logit space (``logits > log(t / (1 - t))``), which is exact and
    avoids saturating the sigmoid.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold {threshold!r} must be in (0, 1); set config key threshold")
    return logits > math.log(threshold / (1.0 - threshold))


def dice_of_masks(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image Dice and IoU of two binary masks ``(B, 1, H, W)`` (or ``(B, H, W)``): two ``(B,)`` tensors.

    Both empty -> 1, exactly one empty -> 0 (see the module docstring). Used by
    :func:`dice_iou_per_image` and by the pseudo-label diagnostics, whose
    masks are already binary.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} and mask shape {tuple(target.shape)} differ")
    p = pred.bool().flatten(1)  # (B, HW)
    y = target.bool().flatten(1)  # (B, HW)
    inter = (p & y).sum(1).double()  # (B,)
    total = p.sum(1).double() + y.sum(1).double()  # (B,)
    union = (p | y).sum(1).double()  # (B,)
    both_empty = total == 0
    dice = torch.where(both_empty, torch.ones_like(total), 2.0 * inter / total.clamp_min(1.0))
    iou = torch.where(both_empty, torch.ones_like(union), inter / union.clamp_min(1.0))
    return dice, iou


def dice_iou_per_image(logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image Dice and IoU of predicted ``logits`` against a {0,1} ``target``, both ``(B, 1, H, W)``.

    The prediction is thresholded with :func:`binarize`; the target counts as
    foreground where it is > 0.5. Returns two float64 ``(B,)`` tensors on the
    input's device.
    """
    return dice_of_masks(binarize(logits, threshold), target > 0.5)


def summarize_scores(dice: Sequence[float] | Iterable[float], iou: Sequence[float] | Iterable[float]) -> dict[str, float]:
    """``{"dice", "miou", "dice_std", "n"}``: means over images (the paper's Dice and mIoU) and the Dice spread."""
    d = torch.as_tensor(list(dice), dtype=torch.float64)
    j = torch.as_tensor(list(iou), dtype=torch.float64)
    if d.numel() == 0:
        raise ValueError("no images were scored; check that the split is not empty")
    std = float(d.std(unbiased=False)) if d.numel() > 1 else 0.0
    return {"dice": float(d.mean()), "miou": float(j.mean()), "dice_std": std, "n": int(d.numel())}
