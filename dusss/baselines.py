"""Semi-supervised baselines of Table 1 that reuse the Step-2 training loop (:mod:`dusss.ssmis`).

``method=bcp``: Bidirectional Copy-Paste, Bai, Chen, Li, Wei & Wang,
"Bidirectional Copy-Paste for Semi-Supervised Medical Image Segmentation",
CVPR 2023 (github.com/DeepMed-Lab-ECNU/BCP). Settings, following its 2D (ACDC)
code where this loop allows:

- a box of ``bcp_box`` = 2/3 of the image side (one random position per batch)
  is copied from an unlabelled image into a labelled one ("inward") and from a
  labelled image into an unlabelled one ("outward"); the targets are mixed in
  exactly the same way from the ground truth and the teacher's hard pseudo label
  (``sigmoid(z_teacher) > threshold``);
- pixels whose target is a pseudo label weigh ``bcp_u_weight`` = 0.5 (BCP's
  ``u_weight``), pixels whose target is ground truth weigh 1;
- pre-training on labelled data: the first ``bcp_pretrain_frac`` = 1/4 of the
  epochs (BCP: 10k of 40k iterations) copy-paste between labelled images only;
  then the teacher restarts as a copy of the pre-trained student (BCP
  initialises both from the pre-trained model) and follows it by EMA (Eq. 12);
- the loss is this project's pixel-wise BCE (Eq. 14) with those weights, not
  BCP's Dice + CE, so that all rows of Table 1 share one segmentation loss;
  BCP's largest-connected-component filter of the pseudo labels is not used
  (QaTa lesions and nuclei come in many components).

UCMT (Shen et al., IJCAI 2023) is not implemented here (see the README).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Config

__all__ = ["BASELINE_METHODS", "box_mask", "copy_paste", "WeightedBCELoss", "BCPStep", "make_baseline"]

BASELINE_METHODS = ("bcp",)  # methods whose training step lives in this module


def box_mask(height: int, width: int, frac: float, *, generator: torch.Generator | None = None,
             device: torch.device | str = "cpu") -> Tensor:
    """``(1, 1, H, W)`` float mask, 1 inside one random axis-aligned box of ``round(frac·H) x round(frac·W)``.

    The box lies wholly inside the image; its top-left corner is drawn
    uniformly from the positions that allow that (BCP's ``generate_mask``).
    ``frac`` must be in (0, 1].
    """
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"box fraction {frac!r} must be in (0, 1]; BCP uses 2/3 (config key bcp_box)")
    bh, bw = max(1, round(frac * height)), max(1, round(frac * width))
    top = int(torch.randint(0, height - bh + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - bw + 1, (1,), generator=generator))
    mask = torch.zeros(1, 1, height, width, device=device)  # (1, 1, H, W)
    mask[..., top:top + bh, left:left + bw] = 1.0
    return mask


def copy_paste(background: Tensor, foreground: Tensor, mask: Tensor) -> Tensor:
    """``background ⊙ (1 − M) + foreground ⊙ M``: paste the box ``M`` of ``foreground`` into ``background``.

    Works for images ``(B, C, H, W)``, masks / labels ``(B, 1, H, W)`` and
    per-pixel weights alike, so images and their targets are mixed identically.
    """
    return background * (1.0 - mask) + foreground * mask


class WeightedBCELoss(nn.Module):
    """Eq. 14 (pixel-wise BCE on logits) with a per-pixel weight, averaged over all pixels and images.

    BCP's mixed loss weighs pseudo-labelled pixels by ``u_weight`` and
    ground-truth pixels by 1; with all weights 1 this equals
    :class:`dusss.losses.SupervisedSegLoss`.
    """

    def forward(self, logits: Tensor, target: Tensor, weight: Tensor) -> Tensor:
        """Mean of ``weight · BCE(logits, target)``; all three ``(B, 1, H, W)``."""
        per_pixel = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
        return (weight * per_pixel).mean()


class BCPStep:
    """One BCP training step inside :func:`dusss.ssmis.train_ssmis` (settings: see the module docstring).

    :meth:`__call__` gets the student, the teacher, a labelled batch and an
    unlabelled batch and returns ``(loss, l_sup, terms, weight)`` for the
    loop: ``l_sup`` is the loss on ground-truth pixels, ``terms["semi"]`` the
    loss on pseudo-labelled pixels (already weighted), ``weight`` the share of
    the semi-supervised stage (0 while pre-training, 1 after).
    """

    def __init__(self, cfg: Config) -> None:
        self.box, self.u_weight, self.threshold = cfg.bcp_box, cfg.bcp_u_weight, cfg.threshold
        self.pre_epochs = max(1, round(cfg.bcp_pretrain_frac * cfg.epochs)) if cfg.bcp_pretrain_frac > 0 else 0
        self.loss = WeightedBCELoss()

    def __call__(self, student: nn.Module, teacher: nn.Module, x_l: Tensor, y_l: Tensor, x_u: Tensor,
                 epoch: int, step: int) -> tuple[Tensor, Tensor, dict[str, Tensor], float]:
        """Loss of one step at ``epoch`` (0-based, as the loop counts before it increments) and ``step``."""
        m = box_mask(x_l.shape[-2], x_l.shape[-1], self.box, device=x_l.device)  # (1, 1, H, W), torch's RNG
        ones = torch.ones_like(y_l)  # (Bl, 1, H, W)
        if epoch < self.pre_epochs:  # pre-training: copy-paste between labelled images only
            x_mix = copy_paste(x_l, x_l.roll(1, dims=0), m)  # (Bl, 3, H, W)
            y_mix = copy_paste(y_l, y_l.roll(1, dims=0), m)
            l_sup = self.loss(student(x_mix), y_mix, ones)
            return l_sup, l_sup, {"semi": torch.zeros((), device=x_l.device)}, 0.0
        if epoch == self.pre_epochs and step == 0:  # BCP starts teacher and student from the pre-trained model
            teacher.load_state_dict(student.state_dict())
        n = min(len(x_l), len(x_u))
        x_l, y_l, x_u, ones = x_l[:n], y_l[:n], x_u[:n], ones[:n]
        with torch.no_grad():
            y_u = (torch.sigmoid(teacher(x_u)) > self.threshold).to(x_u.dtype)  # (n, 1, H, W) hard pseudo labels
        x_u2, y_u2 = x_u.roll(1, dims=0), y_u.roll(1, dims=0)  # the outward mix pairs each labelled image anew
        x_in = copy_paste(x_l, x_u, m)  # labelled background, unlabelled box
        y_in = copy_paste(y_l, y_u, m)
        w_in = copy_paste(ones, self.u_weight * ones, m)
        x_out = copy_paste(x_u2, x_l, m)  # unlabelled background, labelled box
        y_out = copy_paste(y_u2, y_l, m)
        w_out = copy_paste(self.u_weight * ones, ones, m)
        z = student(torch.cat([x_in, x_out]))  # (2n, 1, H, W): one BatchNorm batch
        y, w = torch.cat([y_in, y_out]), torch.cat([w_in, w_out])  # (2n, 1, H, W)
        gt = torch.cat([(1.0 - m).expand_as(y_in), m.expand_as(y_out)])  # 1 where the target is ground truth
        l_sup = self.loss(z, y, w * gt)
        l_semi = self.loss(z, y, w * (1.0 - gt))
        return l_sup + l_semi, l_sup, {"semi": l_semi}, 1.0


def make_baseline(cfg: Config) -> Any:
    """The step object for ``cfg.method`` if it is in :data:`BASELINE_METHODS`, else None."""
    if cfg.method == "bcp":
        return BCPStep(cfg)
    return None
