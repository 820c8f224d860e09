"""``method=vilt``: Table 1's ViLT row, a ViLT transformer with a segmentation head that reads each image's report.

The paper lists ViLT (87.4 M parameters) among the fully supervised rows at
100 % labels, with text used at test time. This method trains
:class:`dusss.textseg.ViLTStudent` (one transformer over the report's tokens
and the image's patches; a conv head on the patch outputs) with ``L_sup``
(Eq. 14) on the labelled images and their reports, exactly as
:class:`dusss.methods.clipseg.CLIPSeg` trains its student.
"""
from __future__ import annotations

from typing import ClassVar

from .clipseg import TextConditioned

__all__ = ["ViLT"]


class ViLT(TextConditioned):
    """Table 1's ViLT row: :class:`dusss.textseg.ViLTStudent` trained on the labelled images and their reports."""

    name: ClassVar[str] = "vilt"
    label: ClassVar[str] = "ViLT"
    summary: ClassVar[str] = "ViLT with a segmentation head, reading each image's report (Table 1's ViLT row), labels only"
    student: ClassVar[str] = "vilt"
