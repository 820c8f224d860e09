"""Reports from masks: the QaTa-COV19, MoNuSeg and BM-Seg text grammars, flips and paraphrases.

Left/right convention (stated once, tested in ``tests/test_data_text.py``):
chest X-rays are read in the **radiological convention**, as the QaTa-COV19
reports of LViT are written: the patient faces the reader, so the patient's
**right lung is on the image's left** (columns ``x < W/2``) and the patient's
**left lung is on the image's right**. ``describe_qata`` therefore calls a
lesion in the image's right half a "left lung" lesion. MoNuSeg and BM-Seg have
no patient side in their texts: their "left"/"right" are image sides.

A horizontal flip of the image swaps "left" and "right" in every grammar
(:func:`flip_report`); a quarter turn keeps a MoNuSeg/BM-Seg report true
after the words are rotated (:func:`rotate_report`), but makes the QaTa zone
words false, which is why :mod:`dusss.data.augment` restricts text-paired chest
X-rays to report-safe transforms.
"""
from __future__ import annotations

import random
import re

import numpy as np
from scipy import ndimage

from .registry import GRAMMARS

__all__ = [
    "describe_qata", "describe_monuseg", "describe_bmseg", "parse_qata", "render_qata",
    "flip_report", "rotate_report", "paraphrase", "NUMBER_WORDS", "GRAMMARS",
]

# GRAMMARS (dusss.data.registry): the report grammars, name -> GrammarSpec saying which transforms keep a report true
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_ZONES = ("upper", "middle", "lower")
_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity: diagonal pixels belong to one lesion


def _number(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def _as_bool_mask(mask: np.ndarray, what: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise ValueError(f"{what} expects a 2-D mask (H, W), got shape {mask.shape}; pass mask[0] for a 1xHxW tensor")
    return mask > 0.5 if mask.dtype.kind == "f" else mask.astype(bool)


def _lung_rows(lung: np.ndarray | None, side: slice, height: int, band: tuple[float, float]) -> tuple[float, float]:
    """Top and bottom row (inclusive, float) of one lung: from its mask when known, else the default band."""
    if lung is not None:
        rows = np.flatnonzero(lung[:, side].any(axis=1))
        if rows.size:
            return float(rows[0]), float(rows[-1] + 1)
    return band[0] * height, band[1] * height


def describe_qata(mask: np.ndarray, lung_mask: np.ndarray | None = None, *,
                  band: tuple[float, float] = (0.1, 0.9), min_overlap: float = 0.05) -> str:
    """The QaTa-COV19 report of a chest X-ray infection mask (LViT's grammar, radiological left/right).

    ``Unilateral|Bilateral pulmonary infection, <n> infected area(s), <loc>[ and <loc>].`` with
    ``<loc> = <zones> left|right lung``. Lesions are 8-connected components of
    ``mask`` (H, W); a lesion belongs to the lung on the side of its centroid,
    image left = patient's right lung. Each lung's height (rows of ``lung_mask``
    on that side, else ``band`` as fractions of the image height) is cut into
    upper/middle/lower thirds; a lesion touches a third when it covers at least
    ``min_overlap`` of the lung height inside it. A single lesion touching all
    three thirds of its lung is written ``all``; otherwise the touched thirds
    are listed top to bottom (``upper middle lower`` when several lesions
    together touch all three; ``upper lower`` for two separate lesions, the one
    case the published grammar does not list). The left lung is named first.
    An empty mask gives ``No pulmonary infection.``; more than ten lesions are
    written as digits.
    """
    m = _as_bool_mask(mask, "describe_qata")
    lung = None if lung_mask is None else _as_bool_mask(lung_mask, "describe_qata lung_mask")
    h, w = m.shape
    labels, n = ndimage.label(m, structure=_EIGHT)
    if n == 0:
        return "No pulmonary infection."
    sides = {"left": slice(w // 2, w), "right": slice(0, w // 2)}  # patient side -> image columns
    zones: dict[str, set[str]] = {"left": set(), "right": set()}
    spans_all = {"left": False, "right": False}
    for idx, obj in enumerate(ndimage.find_objects(labels), start=1):
        rows, cols = np.nonzero(labels[obj] == idx)
        cx = cols.mean() + obj[1].start
        side = "left" if cx >= w / 2 else "right"
        top, bottom = _lung_rows(lung, sides[side], h, band)
        third = (bottom - top) / 3.0
        r0, r1 = obj[0].start, obj[0].stop  # lesion rows [r0, r1)
        touched = set()
        for k, zone in enumerate(_ZONES):
            z0, z1 = top + k * third, top + (k + 1) * third
            if k == 0:
                z0 = -np.inf  # a lesion above the lung top still counts as upper
            if k == 2:
                z1 = np.inf
            if min(r1, z1) - max(r0, z0) >= min_overlap * (bottom - top):
                touched.add(zone)
        if not touched:  # a thin sliver: the third holding its centre row
            c = rows.mean() + r0
            touched.add(_ZONES[int(np.clip((c - top) // max(third, 1e-9), 0, 2))])
        zones[side] |= touched
        spans_all[side] |= len(touched) == 3
    return render_qata(n, {s: ("all" if spans_all[s] else " ".join(z for z in _ZONES if z in zones[s]))
                           for s in ("left", "right") if zones[s]})


def render_qata(count: int, locations: dict[str, str]) -> str:
    """Write a QaTa report from a lesion count and ``{"left"|"right": zone words}`` (left first)."""
    if not locations:
        return "No pulmonary infection."
    lat = "Bilateral" if len(locations) == 2 else "Unilateral"
    area = "area" if count == 1 else "areas"
    locs = " and ".join(f"{locations[s]} {s} lung" for s in ("left", "right") if s in locations)
    return f"{lat} pulmonary infection, {_number(count)} infected {area}, {locs}."


_QATA_RE = re.compile(
    r"^(?P<lat>Unilateral|Bilateral) pulmonary infection, (?P<count>\w+) infected areas?, (?P<locs>.+?)\.?$",
    re.IGNORECASE,
)
_LOC_RE = re.compile(r"^(?P<zones>all|(?:upper|middle|lower)(?: (?:upper|middle|lower))*) (?P<side>left|right) lung$")


def parse_qata(text: str) -> tuple[int, dict[str, str]] | None:
    """``(count, {side: zones})`` of a QaTa-grammar report, or ``None`` when ``text`` is not in the grammar."""
    match = _QATA_RE.match(text.strip())
    if not match:
        return None
    word = match["count"].lower()
    count = NUMBER_WORDS.index(word) if word in NUMBER_WORDS else (int(word) if word.isdigit() else None)
    if count is None:
        return None
    locations: dict[str, str] = {}
    for part in match["locs"].split(" and "):
        loc = _LOC_RE.match(part.strip().lower())
        if not loc or loc["side"] in locations:
            return None
        locations[loc["side"]] = loc["zones"]
    return count, locations


# ---------------------------------------------------------------- MoNuSeg
_QUADRANTS = {(0, 0): "upper left", (0, 1): "upper right", (1, 0): "lower left", (1, 1): "lower right"}


def describe_monuseg(mask: np.ndarray, *, high: float = 1.35, cv_even: float = 0.35, sparse: float = 0.08) -> str:
    """The MoNuSeg density report of a nuclei mask (H, W), in LViT's templates.

    Two sentences. Distribution: foreground fraction below ``sparse`` ->
    ``The nuclei are sparsely distributed.``; else the coefficient of variation
    of the four quadrants' densities below ``cv_even`` -> ``evenly``, above ->
    ``irregularly``. Location: the region whose density exceeds ``high`` times
    the mean -- a quadrant, a half (``lower``, ``left``, ...) when both its
    quadrants do, ``The nuclei density is higher around.`` when the border ring
    is denser than the centre -- else nothing. Sides are image sides.
    """
    m = _as_bool_mask(mask, "describe_monuseg").astype(np.float64)
    h, w = m.shape
    mean = m.mean()
    if mean == 0:
        return "No nuclei are visible."
    q = np.array([[m[: h // 2, : w // 2].mean(), m[: h // 2, w // 2:].mean()],
                  [m[h // 2:, : w // 2].mean(), m[h // 2:, w // 2:].mean()]])  # (2, 2) quadrant densities
    if mean < sparse:
        first = "The nuclei are sparsely distributed."
    elif q.std() / mean < cv_even:
        first = "The nuclei are evenly distributed."
    else:
        first = "The nuclei are irregularly distributed."
    dense = q > high * mean
    halves = {"upper": dense[0].all(), "lower": dense[1].all(), "left": dense[:, 0].all(), "right": dense[:, 1].all()}
    where = next((k for k, v in halves.items() if v), None)
    if where is None and dense.sum() == 1:
        where = _QUADRANTS[tuple(int(i) for i in np.argwhere(dense)[0])]
    if where is not None:
        return f"{first} The nuclei density in the {where} is high."
    bh, bw = max(1, h // 6), max(1, w // 6)
    centre = m[bh:-bh, bw:-bw]
    ring = (m.sum() - centre.sum()) / max(1, m.size - centre.size)
    if ring > high * centre.mean():
        return f"{first} The nuclei density is higher around."
    return first


# ---------------------------------------------------------------- BM-Seg
def describe_bmseg(mask: np.ndarray, *, small: float = 0.002, large: float = 0.02) -> str:
    """A BM-Seg bone-metastasis report from a lesion mask (H, W); BM-Seg publishes no text.

    ``<No|One|Two|...> bone metastas(is|es)[, <size>, in the <region> of the image][ and ...].``
    Lesions are 8-connected components, sorted by area; each gets a size word
    (area fraction below ``small`` -> ``small``, above ``large`` -> ``large``,
    else ``medium``) and the image region of its centroid (thirds: ``upper``,
    ``central``, ``lower`` x ``left``, ``middle``, ``right``; image sides, the
    slice orientation is not recorded in BM-Seg). At most three lesions are
    described; the count covers all of them.
    """
    m = _as_bool_mask(mask, "describe_bmseg")
    h, w = m.shape
    labels, n = ndimage.label(m, structure=_EIGHT)
    if n == 0:
        return "No bone metastasis."
    areas = ndimage.sum_labels(m, labels, index=np.arange(1, n + 1))
    centres = ndimage.center_of_mass(m, labels, index=np.arange(1, n + 1))
    parts = []
    for i in np.argsort(-areas, kind="stable")[:3]:
        frac = areas[i] / m.size
        size = "small" if frac < small else ("large" if frac > large else "medium")
        cy, cx = centres[i]
        row = ("upper", "central", "lower")[min(2, int(3 * cy / h))]
        col = ("left", "middle", "right")[min(2, int(3 * cx / w))]
        region = "centre" if (row, col) == ("central", "middle") else f"{row} {col}"
        parts.append(f"{size} in the {region}")
    noun = "bone metastasis" if n == 1 else "bone metastases"
    return f"{_number(n).capitalize()} {noun}, " + ", ".join(parts) + "."


# ---------------------------------------------------------------- transforms of reports
_SWAP_LR = {"left": "right", "right": "left"}


def flip_report(text: str, grammar: str) -> str:
    """The report of the horizontally flipped image: ``left`` and ``right`` swap in every grammar.

    For QaTa the lungs trade places, so the lung order is restored (left lung
    first) by re-rendering; ``grammar="none"`` raises, since an unknown text
    cannot be known to stay true.
    """
    if grammar == "qata":
        parsed = parse_qata(text)
        if parsed is not None:
            count, locs = parsed
            return render_qata(count, {_SWAP_LR[s]: z for s, z in locs.items()})
    flippable = tuple(name for name, spec in GRAMMARS.items() if spec.flips)  # image-side left/right words
    if grammar in flippable:
        return re.sub(r"\b(left|right)\b", lambda mt: _SWAP_LR[mt.group(1)], text)
    raise ValueError(f"cannot flip a report of grammar {grammar!r}; use one of {flippable} or a report-safe augmentation")


# A quarter turn counter-clockwise (torch.rot90 k=1 on (H, W)) sends grid cell (r, c) of an
# n x n grid to (n - 1 - c, r): the top-left corner goes to the bottom-left.
_ROWS3, _COLS3 = ("upper", "central", "lower"), ("left", "middle", "right")
_HALF_CCW = {"upper": "left", "left": "lower", "lower": "right", "right": "upper"}


def _turn_monuseg(mt: re.Match) -> str:
    words = mt.group(1)
    if " " not in words:
        return f"in the {_HALF_CCW[words]}"
    r, c = ("upper", "lower").index(words.split()[0]), ("left", "right").index(words.split()[1])
    r, c = 1 - c, r
    return f"in the {('upper', 'lower')[r]} {('left', 'right')[c]}"


def _turn_bmseg(mt: re.Match) -> str:
    words = mt.group(1)
    if words == "centre":
        return "in the centre"
    r, c = _ROWS3.index(words.split()[0]), _COLS3.index(words.split()[1])
    r, c = 2 - c, r
    return "in the centre" if (r, c) == (1, 1) else f"in the {_ROWS3[r]} {_COLS3[c]}"


def rotate_report(text: str, k: int, grammar: str) -> str:
    """The report of the image turned by ``k`` quarter turns counter-clockwise (``torch.rot90`` k).

    Defined for MoNuSeg and BM-Seg, whose texts locate things on the image grid
    (a turn sends ``upper right`` to ``upper left``, MoNuSeg's ``lower`` half to
    ``right``, BM-Seg's ``upper middle`` to ``central left``). QaTa's zones are
    anatomical, so a turn makes them false: that raises ``ValueError``.
    """
    k %= 4
    if k == 0:
        return text
    if grammar == "monuseg":
        pattern, turn = r"in the (upper left|upper right|lower left|lower right|upper|lower|left|right)\b", _turn_monuseg
    elif grammar == "bmseg":
        pattern, turn = r"in the (centre|(?:upper|central|lower) (?:left|middle|right))\b", _turn_bmseg
    else:
        raise ValueError(f"a quarter turn makes a {grammar!r} report false; restrict augmentation to report-safe transforms")
    for _ in range(k):
        text = re.sub(pattern, turn, text)
    return text


# ---------------------------------------------------------------- paraphrases
def _qata_variants(count: int, locs: dict[str, str]) -> list[str]:
    n = _number(count)
    areas = "area" if count == 1 else "areas"
    lesions = "lesion" if count == 1 else "lesions"
    bilateral = len(locs) == 2

    def zone(z: str, side: str, style: int) -> str:
        if z == "all":
            return ("the whole " if style else "the entire ") + f"{side} lung"
        zs = z.split()
        words = ", ".join(zs[:-1]) + (" and " if len(zs) > 1 else "") + zs[-1]
        return f"the {words} {'zone' if len(zs) == 1 else 'zones'} of the {side} lung" if style else f"the {z} {side} lung"

    where0 = " and ".join(zone(z, s, 0) for s, z in locs.items())
    where1 = " and ".join(zone(z, s, 1) for s, z in locs.items())
    lungs = "both lungs" if bilateral else f"the {next(iter(locs))} lung only"
    return [
        f"Infection in {lungs}: {n} infected {areas}, in {where0}.",
        f"{n.capitalize()} {lesions} of pulmonary infection involving {lungs}, located in {where1}.",
        f"{'Both lungs are' if bilateral else 'One lung is'} infected, with {n} affected {areas}: {where1}.",
        f"Opacities in {lungs}, {n} in total, seen in {where0}.",
        f"{'Bilateral' if bilateral else 'One-sided'} lung infection with {n} {lesions}, at {where1}.",
    ]


_SYNONYMS = [  # whole-word substitutions with the same meaning, for the MoNuSeg/BM-Seg texts and free text
    ("The nuclei are evenly distributed.", "Nuclei are spread uniformly."),
    ("The nuclei are sparsely distributed.", "Nuclei are scattered sparsely."),
    ("The nuclei are irregularly distributed.", "Nuclei are spread unevenly."),
    ("The nuclei density is higher around.", "Nuclei are denser towards the edges."),
    ("The nuclei density in the", "Nuclei are crowded in the"),
    (" is high.", "."),
    ("bone metastases", "skeletal metastatic lesions"),
    ("bone metastasis", "skeletal metastatic lesion"),
    ("infection", "infectious involvement"),
]


def paraphrase(text: str, n: int, seed: int) -> list[str]:
    """``n`` reports that say the same as ``text`` in other words, chosen reproducibly by ``seed``.

    QaTa-grammar reports are parsed and re-rendered with fixed templates
    (laterality, count and every zone preserved: "Bilateral pulmonary
    infection, two infected areas, ..." -> "Infection in both lungs: two
    infected areas, in ..."). Other texts get synonym substitutions and
    sentence-order changes. All returned strings differ from ``text`` and from
    each other; when fewer than ``n`` distinct variants exist the list cycles
    through them (so the result always has ``n`` items, ``n >= 0``).
    """
    if n < 0:
        raise ValueError(f"paraphrase needs n >= 0, got {n}")
    parsed = parse_qata(text)
    if parsed is not None:
        variants = _qata_variants(*parsed)
    else:
        swapped = text
        for a, b in _SYNONYMS:
            swapped = swapped.replace(a, b)
        sentences = [s.strip() for s in re.split(r"(?<=\.)\s+", text.strip()) if s.strip()]
        swapped_sentences = [s.strip() for s in re.split(r"(?<=\.)\s+", swapped.strip()) if s.strip()]
        variants = [swapped, "Findings: " + swapped[:1].lower() + swapped[1:], "Report: " + text]
        if len(sentences) > 1:
            variants.append(" ".join(reversed(swapped_sentences)))
    variants = [v for i, v in enumerate(variants) if v != text and v not in variants[:i]]
    random.Random(seed).shuffle(variants)
    return [variants[i % len(variants)] for i in range(n)] if variants else [text] * n
