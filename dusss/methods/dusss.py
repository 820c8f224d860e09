"""``method=dusss``: Step 2 of DuSSS, Mean Teacher whose pseudo label is merged with the text-guided mask.

The student learns from the unlabelled images with ``L_semi`` (Eqs. 15-17):
the targets are the merged pseudo label ``σ(z_teacher + z_text)`` and the
text-guided mask ``σ(z_text)`` drawn by the frozen Step-1 VLM from each image's
**own** report (Eq. 10). Everything else is :class:`MeanTeacher`'s, including
the perturbed teacher view and the consistency form and weight. With a VLM
pre-trained by plain cross-modal InfoNCE it is the CLIP-style row of the
tables (the VLM is chosen by the Step-1 switches, not by the method).
"""
from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from .base import StepBatch
from .mean_teacher import MeanTeacher

__all__ = ["DuSSS"]


class DuSSS(MeanTeacher):
    """:class:`MeanTeacher` with the text-guided logits of each unlabelled image in its targets (Eqs. 15-17)."""

    name: ClassVar[str] = "dusss"
    label: ClassVar[str] = "DuSSS"
    summary: ClassVar[str] = "DuSSS Step 2: Mean Teacher + text-guided masks from the frozen VLM"
    uses_text: ClassVar[bool] = True

    def targets_text(self, batch: StepBatch) -> Tensor | None:
        if batch.text_logits is None:
            raise ValueError("method dusss needs the text-guided logits of the unlabelled batch; the loop gives them "
                             "to methods with uses_text = True")
        return batch.text_logits
