"""``method=clipseg``: Table 1's CLIP row, a CLIPSeg segmenter that reads each image's report (labelled images only).

The paper lists CLIP (87 M parameters) among the fully supervised rows at
100 % labels, with text used at test time. This method trains
:class:`dusss.textseg.CLIPSegStudent` (CLIPSeg's ViT image tower and FiLM
decoder, conditioned on the report through the frozen MiniLM encoder and a
trainable projection) with ``L_sup`` (Eq. 14) on the labelled images and their
reports, rewritten for each image's augmentation; the loop validates and tests
it with each image's own report. Its table row runs it at ``ratio=1``
(:data:`dusss.runs.ROWS`); below, it is the labelled-only counterpart.
:class:`TextConditioned` is the shared step of the text-conditioned rows
(:mod:`dusss.methods.vilt` too).
"""
from __future__ import annotations

from typing import ClassVar

import torch

from ..config import Config
from ..losses import SupervisedSegLoss
from .base import Models, StepBatch, StepOutput

__all__ = ["TextConditioned", "CLIPSeg"]


class TextConditioned:
    """Labelled images and their reports: ``loss = L_sup(student(x_l, texts_l), y_l)``; subclasses name the student."""

    name: ClassVar[str]
    label: ClassVar[str]
    summary: ClassVar[str]
    student: ClassVar[str]
    uses_unlabelled: ClassVar[bool] = False
    uses_teacher: ClassVar[bool] = False
    uses_text: ClassVar[bool] = False  # the Step-1 VLM's maps: not read (the student reads the reports itself)
    distributed: ClassVar[bool] = False  # not yet run under torchrun

    def __init__(self, cfg: Config, device: torch.device | str = "cpu") -> None:
        self.sup = SupervisedSegLoss()

    def step(self, models: Models, batch: StepBatch) -> StepOutput:
        if batch.texts_l is None:
            raise ValueError(f"method {self.name!r} needs the labelled images' reports (StepBatch.texts_l); the loop "
                             f"fills them for a student with needs_text, here {self.student!r}")
        l_sup = self.sup(models.forward(batch.x_l, batch.texts_l).float(), batch.y_l)
        return StepOutput(l_sup, l_sup)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore."""


class CLIPSeg(TextConditioned):
    """Table 1's CLIP row: :class:`dusss.textseg.CLIPSegStudent` trained on the labelled images and their reports."""

    name: ClassVar[str] = "clipseg"
    label: ClassVar[str] = "CLIP (CLIPSeg)"
    summary: ClassVar[str] = "CLIPSeg segmenter conditioned on each image's report (Table 1's CLIP row), labels only"
    student: ClassVar[str] = "clipseg"
