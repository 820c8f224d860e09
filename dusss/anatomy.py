"""What "anatomy" is for ASG's Step-1 objective (Table 1's ASG row) on the embedded data.

ASG (Li et al. 2024) parses each report into ``<anatomical region, finding, existence>`` triplets, pools the
image features inside each region's box (Chest ImaGenome boxes on MIMIC-CXR) and aligns them with the report
sentence naming that region; the findings become image tags. Here the reports have a grammar
(:mod:`dusss.data.text`), so the parse is exact and needs no RadGraph:

- **QaTa grammar** (``qata-synth``, ``qata``): the anatomy is the six lung zones, upper / middle / lower third
  of the patient's right and left lung. Their boxes are fixed fractions of the image
  (:data:`QATA_ZONE_BOXES`), the mean lung-field geometry of the generator (:mod:`dusss.data.synth`: lung top
  drawn in [0.12, 0.18], bottom in [0.76, 0.86] of the height; lung fields from about 0.12 to 0.88 of the
  width, split at the midline; radiological convention, the patient's right lung on the image's left). They are
  *not* read from any mask: no lesion or lung mask of any image is used. A report's region phrases are its
  location phrases (``"all left lung"``, ``"lower right lung"``), each naming the zones of one lung; its tags
  are the six zones' infection flags (ASG's finding + existence: a zone the report does not name is "no
  infection" there).
- **MoNuSeg, BM-Seg and free-text grammars** (``nuclei-real``, ...): the reports name image halves or
  quadrants of a tissue tile or a slice, not anatomy, so there are no regions and no tags and ASG reduces to
  its instance-level image-report alignment (:func:`report_anatomy` returns ``None``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .data.text import parse_qata

__all__ = ["QATA_ZONES", "QATA_ZONE_BOXES", "QATA_TAGS", "ReportAnatomy", "report_anatomy", "zone_weights"]

QATA_ZONES = ("upper", "middle", "lower")
_TOP, _BOTTOM = 0.15, 0.81  # mean lung top / bottom of dusss.data.synth (fractions of the height)
_THIRD = (_BOTTOM - _TOP) / 3
_COLUMNS = {"right": (0.12, 0.5), "left": (0.5, 0.88)}  # patient side -> image columns (radiological convention)
# (side, zone) -> (top, bottom, left, right) as fractions of the image
QATA_ZONE_BOXES: dict[tuple[str, str], tuple[float, float, float, float]] = {
    (side, zone): (_TOP + k * _THIRD, _TOP + (k + 1) * _THIRD, *_COLUMNS[side])
    for side in ("right", "left") for k, zone in enumerate(QATA_ZONES)
}
QATA_TAGS = tuple(QATA_ZONE_BOXES)  # the six image tags: infection in (side, zone)


class ReportAnatomy(NamedTuple):
    """A report's anatomy: ``phrases`` ``[(phrase, side, zones)]`` (each names zones of one lung) and ``tags``
    ``(len(QATA_TAGS),)`` float, 1 where the report names infection in that zone."""

    phrases: list[tuple[str, str, tuple[str, ...]]]
    tags: torch.Tensor


def report_anatomy(text: str) -> ReportAnatomy | None:
    """The anatomical regions and tags a QaTa-grammar report names; ``None`` for a report of another grammar.

    ``"No pulmonary infection."`` names no region and has all six tags 0.
    """
    tags = torch.zeros(len(QATA_TAGS))
    if text.strip().rstrip(".").lower() == "no pulmonary infection":
        return ReportAnatomy([], tags)
    parsed = parse_qata(text)
    if parsed is None:
        return None
    phrases = []
    for side, words in parsed[1].items():
        zones = QATA_ZONES if words == "all" else tuple(z for z in QATA_ZONES if z in words.split())
        phrases.append((f"{words} {side} lung", side, zones))
        for zone in zones:
            tags[QATA_TAGS.index((side, zone))] = 1.0
    return ReportAnatomy(phrases, tags)


def zone_weights(side: str, zones: tuple[str, ...], h: int, w: int) -> torch.Tensor:
    """``(h * w,)`` row-major weights of an ``h x w`` patch grid for the union of ``zones`` of lung ``side``:
    the share of each patch's area inside the zones' boxes (0 outside), so pooling works on any grid size."""
    ys, xs = torch.arange(h + 1) / h, torch.arange(w + 1) / w  # patch edges
    out = torch.zeros(h, w)
    for zone in zones:
        top, bottom, left, right = QATA_ZONE_BOXES[(side, zone)]
        dy = (torch.minimum(ys[1:], torch.tensor(bottom)) - torch.maximum(ys[:-1], torch.tensor(top))).clamp_min(0)
        dx = (torch.minimum(xs[1:], torch.tensor(right)) - torch.maximum(xs[:-1], torch.tensor(left))).clamp_min(0)
        out += (dy[:, None] * h) * (dx[None, :] * w)  # the zones of one lung do not overlap
    return out.flatten()
