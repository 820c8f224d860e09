"""``method=bcp``: Bidirectional Copy-Paste, Bai, Chen, Li, Wei & Wang,
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
  step budget (BCP: 10k of 40k iterations) copy-paste between labelled images only;
  then the teacher restarts as a copy of the pre-trained student (BCP
  initialises both from the pre-trained model) and follows it by EMA (Eq. 12);
- the loss is this project's pixel-wise BCE (Eq. 14) with those weights, not
  BCP's Dice + CE, so that all rows of Table 1 share one segmentation loss;
  BCP's largest-connected-component filter of the pseudo labels is not used
  (QaTa lesions and nuclei come in many components).
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config
from .base import Models, StepBatch, StepOutput

__all__ = ["BCP", "box_mask", "copy_paste", "WeightedBCELoss"]


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


class BCP:
    """BCP's training step (settings: see the module docstring).

    :meth:`step` returns ``sup`` = the loss on ground-truth pixels,
    ``terms["semi"]`` = the loss on pseudo-labelled pixels (already weighted)
    and ``weight`` = 0 while pre-training on labelled copy-paste, 1 after.
    """

    name: ClassVar[str] = "bcp"
    label: ClassVar[str] = "BCP"
    summary: ClassVar[str] = "BCP: bidirectional copy-paste between labelled and unlabelled images"
    uses_unlabelled: ClassVar[bool] = True
    uses_teacher: ClassVar[bool] = True
    uses_text: ClassVar[bool] = False
    distributed: ClassVar[bool] = False

    def state_dict(self) -> dict:
        """Nothing to save: BCP draws its boxes from torch's global RNG, which the loop's checkpoint holds."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Counterpart of :meth:`state_dict` (nothing to restore)."""

    def __init__(self, cfg: Config, device: torch.device | str = "cpu") -> None:
        self.box, self.u_weight, self.threshold = cfg.bcp_box, cfg.bcp_u_weight, cfg.threshold
        self.pretrain_frac = cfg.bcp_pretrain_frac
        self.loss = WeightedBCELoss()

    def pretrain_steps(self, total_steps: int) -> int:
        """Steps of labelled-only copy-paste before the semi-supervised stage (at least one when the share is > 0)."""
        return max(1, round(self.pretrain_frac * total_steps)) if self.pretrain_frac > 0 else 0

    def step(self, models: Models, batch: StepBatch) -> StepOutput:
        """Loss of one step (pre-training while ``batch.step`` < :meth:`pretrain_steps`)."""
        student, teacher = models.forward, models.teacher
        x_l, y_l, x_u = batch.x_l, batch.y_l, batch.x_u
        pre = self.pretrain_steps(batch.total_steps)
        m = box_mask(x_l.shape[-2], x_l.shape[-1], self.box, device=x_l.device)  # (1, 1, H, W), torch's RNG
        ones = torch.ones_like(y_l)  # (Bl, 1, H, W)
        if batch.step < pre:  # pre-training: copy-paste between labelled images only
            x_mix = copy_paste(x_l, x_l.roll(1, dims=0), m)  # (Bl, 3, H, W)
            y_mix = copy_paste(y_l, y_l.roll(1, dims=0), m)
            l_sup = self.loss(student(x_mix).float(), y_mix, ones)
            return StepOutput(l_sup, l_sup, {"semi": torch.zeros((), device=x_l.device)}, 0.0)
        if batch.step == pre:  # BCP starts teacher and student from the pre-trained model
            teacher.load_state_dict(models.student.state_dict())
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
        z = student(torch.cat([x_in, x_out])).float()  # (2n, 1, H, W): one BatchNorm batch
        y, w = torch.cat([y_in, y_out]), torch.cat([w_in, w_out])  # (2n, 1, H, W)
        gt = torch.cat([(1.0 - m).expand_as(y_in), m.expand_as(y_out)])  # 1 where the target is ground truth
        l_sup = self.loss(z, y, w * gt)
        l_semi = self.loss(z, y, w * (1.0 - gt))
        return StepOutput(l_sup + l_semi, l_sup, {"semi": l_semi}, 1.0)
