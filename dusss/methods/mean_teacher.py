"""``method=mt``: Mean Teacher (Tarvainen & Valpola 2017) as SSL4MIS runs it in 2D, the loop DuSSS builds on.

The student learns from the labelled images with ``L_sup`` (Eq. 14) and from
the unlabelled ones by consistency with the EMA teacher's prediction (Eqs.
12-13) on a perturbed view (:mod:`dusss.methods.consistency`: ``perturb``,
``noise_std``, ``cons_loss``, ``cons_weight``, ``rampup_epochs``). With
``bn_batch="joint"`` (as in Mean Teacher and SSL4MIS) labelled and
unlabelled images go through the student as one batch, so BatchNorm
normalises them together; ``"separate"`` (the default, the consistency
study's choice: every joint-batch recipe scored below labelled-only on
``nuclei-real``, which mixes H&E and fluorescence) forwards them as two batches. Under DistributedDataParallel
the two forwards feed one backward, so each parameter's gradient is reduced
once (tests/test_ddp_training.py trains ``mt`` with ``"separate"``).
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ..config import Config
from ..losses import SupervisedSegLoss, TextGuidedSemiLoss
from .base import Models, StepBatch, StepOutput
from .consistency import Perturbation, consistency_weight

__all__ = ["MeanTeacher"]


class MeanTeacher:
    """``loss = L_sup + w(t) · L_cons(student(x_u'), σ(teacher(x_u'')))``; subclasses add text (DuSSS)."""

    name: ClassVar[str] = "mt"
    label: ClassVar[str] = "Mean Teacher"
    summary: ClassVar[str] = "Mean Teacher: consistency with an EMA teacher on a perturbed view"
    uses_unlabelled: ClassVar[bool] = True
    uses_teacher: ClassVar[bool] = True
    uses_text: ClassVar[bool] = False
    distributed: ClassVar[bool] = True

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.cfg = cfg
        self.sup, self.semi = SupervisedSegLoss(), TextGuidedSemiLoss(cfg.cons_loss)
        self.perturb = Perturbation.from_config(cfg)

    def targets_text(self, batch: StepBatch) -> Tensor | None:
        """Text-guided logits to merge into the target (None: plain Mean Teacher)."""
        return None

    def step(self, models: Models, batch: StepBatch) -> StepOutput:
        x_s, x_t = self.perturb.views(batch.x_u)  # (Bu, 3, H, W) student / teacher views
        n_l = len(batch.x_l)
        if self.cfg.bn_batch == "separate":
            z = torch.cat([models.forward(batch.x_l), models.forward(x_s)]).float()  # two BatchNorm batches
        else:
            z = models.forward(torch.cat([batch.x_l, x_s])).float()  # (Bl + Bu, 1, H, W): one BatchNorm batch
        with torch.no_grad():
            z_teacher = models.teacher(x_t).float()  # (Bu, 1, H, W) Eq. 13 pseudo-label logits
        terms = self.semi(z[n_l:], z_teacher, self.targets_text(batch), return_dict=True)
        l_sup = self.sup(z[:n_l], batch.y_l)
        weight = consistency_weight(self.cfg, batch.epoch)
        return StepOutput(l_sup + weight * terms["semi"], l_sup, terms, weight)

    def state_dict(self) -> dict:
        return {"perturb": self.perturb.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.perturb.load_state_dict(state.get("perturb", {}))
