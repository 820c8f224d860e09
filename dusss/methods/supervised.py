"""``method=supervised``: the U-Net trained on the labelled images only (``L_sup``, Eq. 14).

At ``ratio=1`` it is Table 1's U-Net; below, the labelled-only reference every
semi-supervised row must beat. It takes the same step budget as the others.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from ..config import Config
from ..losses import SupervisedSegLoss
from .base import Models, StepBatch, StepOutput

__all__ = ["Supervised"]


class Supervised:
    """Labelled images only: ``loss = L_sup(student(x_l), y_l)``."""

    name: ClassVar[str] = "supervised"
    label: ClassVar[str] = "U-Net"
    summary: ClassVar[str] = "U-Net on the labelled images only"
    uses_unlabelled: ClassVar[bool] = False
    uses_teacher: ClassVar[bool] = False
    uses_text: ClassVar[bool] = False
    distributed: ClassVar[bool] = True

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.sup = SupervisedSegLoss()

    def step(self, models: Models, batch: StepBatch) -> StepOutput:
        l_sup = self.sup(models.forward(batch.x_l).float(), batch.y_l)
        return StepOutput(l_sup, l_sup)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore."""
