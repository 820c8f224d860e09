"""``qata-synth``: procedural chest X-rays with COVID-like opacities, masks and QaTa reports.

Each image is drawn from its own seeded generator (``seed``, split, index), so
a set is reproducible and a smaller set with the same seed is a prefix of a
larger one. Anatomy (PA view, radiological convention: the patient's right lung
on the image's left): body outline with neck and shoulders, two lung fields
with apices and diaphragm domes, heart shadow bulging into the patient's left
lung, mediastinum and spine, posterior ribs and clavicles, soft-tissue texture,
lung vessel texture, exposure (gamma/contrast) variation and quantum noise.
Infections: one to four ground-glass opacities with irregular borders, varied
size, shape and zone, clipped to the lung fields; the mask is exactly where an
opacity was added, and the report is :func:`describe_qata` of the mask with the
lung fields as reference. Written in the LViT layout (``covid``-style names,
``mask_`` prefix, xlsx workbooks), so the reader of real QaTa-COV19 reads it.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from ..utils import get_logger
from .layout import SPLITS, split_dir, text_file, write_text_table
from .text import describe_qata

__all__ = ["draw_chest_xray", "generate_qata_synth", "SYNTH_VERSION"]

log = get_logger("dusss.data.synth")
SYNTH_VERSION = 2  # bump when the drawing changes, so stale generated folders are redone
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
_COUNT_P = (0.4, 0.3, 0.18, 0.12)  # P(1..4 drawn lesions); merged lesions lower the final counts a little


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise (size, size) of unit-ish amplitude: a random ``cells`` grid, bicubic upsampled."""
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.BICUBIC)) / 0.8


def _step(d: np.ndarray, width: float) -> np.ndarray:
    """Soft inside-indicator of a signed distance ``d`` (> 0 inside) with edge ``width``."""
    return np.clip(0.5 + d / width, 0.0, 1.0)


def _lung(x: np.ndarray, y: np.ndarray, medial: float, width: float, sign: int, top: float, bottom: float,
          dome: float) -> np.ndarray:
    """Soft mask of one lung field: narrow rounded apex, convex lateral border, diaphragm dome below.

    ``medial`` is the mediastinal border's x, ``sign`` = -1 for the lung on the
    image's left (lateral side at smaller x), +1 for the other.
    """
    u = sign * (x - medial) / width  # 0 at the mediastinum, 1 at the ribs
    t = np.clip((y - top) / (bottom - top), 0, 1)  # 0 at the apex, 1 at the base
    reach = 0.3 + 0.7 * np.sqrt(np.clip(t / 0.55, 0, 1))  # lateral border widens from the apex down
    apex = top + 0.12 * np.clip(u - 0.35, 0, None) ** 2 / 0.42
    base = bottom - dome * np.sin(np.pi * np.clip(u, 0, 1)) + 0.03 * np.clip(u, 0, 1)
    d = np.minimum(np.minimum(u * width, (reach - u) * width), np.minimum(y - apex, base - y))
    return _step(d, 0.03)


def draw_chest_xray(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic PA chest X-ray: image uint8 (S, S), lesion mask bool (S, S), lung-field mask bool (S, S)."""
    s = size
    lin = (np.arange(s, dtype=np.float32) + 0.5) / s
    x, y = np.meshgrid(lin, lin)  # (S, S) each, in [0, 1]
    cx = 0.5 + rng.normal(0, 0.012)
    r = np.abs(x - cx)  # distance from the midline
    # body: neck widening to the shoulders, soft edge
    half = rng.uniform(0.41, 0.47) * np.clip(0.3 + 4.5 * (y - 0.02), 0.3, 1)
    body = _step(half - r, 0.04)
    img = 0.05 + body * (0.45 + 0.05 * _smooth_noise(rng, s, 5))
    # lung fields (patient right = image left)
    top, bottom = rng.uniform(0.12, 0.18), rng.uniform(0.76, 0.86)
    lw = rng.uniform(0.30, 0.35)
    r_lung = _lung(x, y, cx - rng.uniform(0.035, 0.055), lw, -1, top + rng.normal(0, 0.01),
                   bottom - rng.uniform(0.0, 0.04), rng.uniform(0.04, 0.08))
    l_lung = _lung(x, y, cx + rng.uniform(0.04, 0.06), lw * rng.uniform(0.95, 1.0), 1, top + rng.normal(0, 0.01),
                   bottom, rng.uniform(0.04, 0.08))
    # heart: low in the chest, mostly on the patient's left (image right)
    hx, hy = cx + rng.uniform(0.04, 0.08), bottom - rng.uniform(0.13, 0.18)
    ha, hb = rng.uniform(0.15, 0.19), rng.uniform(0.12, 0.15)
    heart = _step(1 - np.sqrt(((x - hx) / ha) ** 2 + ((y - hy) / hb) ** 2), 0.4)
    lungs = np.maximum(r_lung, l_lung) * (1 - heart)
    vessels = _smooth_noise(rng, s, max(8, s // 12)) * np.exp(-r * 4.0)  # branching density, denser at the hila
    # air: darkest in the middle of each lung, lighter towards the apices, bases and ribs
    depth = np.clip(1.2 - 1.6 * np.abs(y - (top + bottom) / 2) / (bottom - top), 0.55, 1.0)
    img = img - lungs * depth * (rng.uniform(0.22, 0.3) - 0.05 * vessels - 0.03 * _smooth_noise(rng, s, max(12, s // 6)))
    # mediastinum and spine: bright central band with vertebral segments
    spine = _step(0.035 - r, 0.03) * (0.85 + 0.15 * np.cos(2 * np.pi * y / 0.045))
    mediastinum = _step(0.075 + 0.05 * np.clip((y - top) / (bottom - top), 0, 1) - r, 0.05) * (1 - lungs)
    img = img + 0.06 * spine + 0.08 * mediastinum * body + 0.09 * heart * body
    # posterior ribs: arcs falling laterally; one periodic profile instead of a loop over ribs
    spacing = rng.uniform(0.058, 0.068)
    phase = (y - (top - 0.03) - 0.12 * r - 0.55 * r ** 2) / spacing  # rib index along the arc
    frac = phase - np.floor(phase)
    rib = np.clip(1 - ((frac - 0.5) / 0.28) ** 2, 0, 1) * (phase > 0) * (phase < 11) * (r > 0.05)
    img = img + 0.06 * rib * (0.3 + lungs) * body
    # clavicles: two bars from the sternal notch out and up
    for sgn in (-1, 1):
        x0, y0, x1, y1 = cx + sgn * 0.05, top - 0.01, cx + sgn * rng.uniform(0.3, 0.36), top - rng.uniform(0.05, 0.08)
        t = np.clip(((x - x0) * (x1 - x0) + (y - y0) * (y1 - y0)) / ((x1 - x0) ** 2 + (y1 - y0) ** 2), 0, 1)
        dist = np.hypot(x - (x0 + t * (x1 - x0)), y - (y0 + t * (y1 - y0)))
        img = img + 0.12 * np.clip(1 - (dist / 0.017) ** 2, 0, 1)
    # infections: ground-glass opacities inside the lungs
    field = lungs > 0.5
    lesion_mask = np.zeros((s, s), dtype=bool)
    opacity = np.zeros_like(img)
    border = _smooth_noise(rng, s, 14)  # shared border irregularity, sampled at a shifted window per lesion
    rows = np.flatnonzero(field.any(axis=1))
    third = (rows[-1] - rows[0] + 1) / 3
    side_pref = rng.uniform()  # some cases mostly one lung, some both
    for _ in range(int(rng.choice(4, p=_COUNT_P)) + 1):
        side = (x < cx) if rng.uniform() < side_pref else (x >= cx)
        zone = int(rng.integers(3))  # pick a third first so upper/middle/lower lesions are equally common
        band = np.zeros((s, 1), dtype=bool)
        band[int(rows[0] + zone * third): int(rows[0] + (zone + 1) * third)] = True
        cand = np.flatnonzero((field & side & band).ravel())
        if cand.size == 0:
            continue
        c = int(rng.choice(cand))
        ly, lx = (c // s + 0.5) / s, (c % s + 0.5) / s
        a = rng.uniform(0.045, 0.11)  # 1-4 of these cover ~4 % of the image on average
        b = rng.uniform(0.2, 0.28) if rng.uniform() < 0.12 else a * rng.uniform(0.7, 1.6)  # sometimes a lung-long one
        ang = rng.uniform(-0.5, 0.5)
        ext = 1.35 * max(a, b)  # the irregular border stays inside 1.35 x the ellipse
        r0, r1 = max(0, int((ly - ext) * s)), min(s, int((ly + ext) * s) + 1)
        c0, c1 = max(0, int((lx - ext) * s)), min(s, int((lx + ext) * s) + 1)
        win = (slice(r0, r1), slice(c0, c1))  # all lesion maths in its window
        dx, dy = x[win] - lx, y[win] - ly
        cos, sin = float(np.cos(ang)), float(np.sin(ang))
        u, v = dx * cos + dy * sin, dy * cos - dx * sin
        shift = rng.integers(0, s, size=2)
        d = np.sqrt((u / a) ** 2 + (v / b) ** 2) + 0.3 * np.roll(border, tuple(shift), axis=(0, 1))[win]
        blob = (d < 1.0) & field[win]
        labels, n = ndimage.label(blob)
        if n == 0:
            continue
        blob = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))  # one connected opacity per draw
        blob = ndimage.binary_fill_holes(blob) & field[win]  # no holes inside one opacity
        core = np.clip((1.0 - np.sqrt((u / a) ** 2 + (v / b) ** 2)) / 0.5, 0.35, 1.0)  # haze fades to the border
        lesion_mask[win] |= blob
        opacity[win] = np.maximum(opacity[win], blob * rng.uniform(0.16, 0.3) * core)
    texture = 0.75 + 0.25 * _smooth_noise(rng, s, max(12, s // 6))  # ground-glass mottling
    img = img + opacity * texture
    # exposure and noise
    img = np.clip(img, 0, 1) ** rng.uniform(0.8, 1.25)
    img = (img - 0.5) * rng.uniform(0.9, 1.15) + 0.5 + rng.normal(0, 0.03)
    img = img + rng.normal(0, rng.uniform(0.008, 0.02), size=img.shape).astype(np.float32)
    img8 = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return img8, lesion_mask, field


def _write_png(path: Path, arr: np.ndarray) -> None:
    Image.fromarray(arr).save(path, compress_level=1)


def generate_qata_synth(root: str | os.PathLike, n_train: int, n_val: int, n_test: int, size: int, seed: int,
                        *, progress: bool = True) -> dict[str, float]:
    """Write a ``qata-synth`` set in the LViT layout under ``root``; return seconds and report counts.

    ``n_*`` images per split at ``size`` x ``size`` pixels, image ``i`` of split
    ``k`` drawn from ``np.random.default_rng((seed, k, i))``. The caller
    (:func:`dusss.data.ensure_dataset`) writes the completion marker; this
    function only writes images, masks and workbooks.
    """
    from tqdm.auto import tqdm

    for key, val in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if val < 1:
            raise ValueError(f"generate_qata_synth: {key}={val} must be >= 1")
    if size < 32:
        raise ValueError(f"generate_qata_synth: size={size} must be >= 32 pixels")
    root = Path(root)
    t0 = time.perf_counter()
    reports: list[str] = []
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        folder = split_dir(root, split)
        (folder / "img").mkdir(parents=True, exist_ok=True)
        (folder / "labelcol").mkdir(parents=True, exist_ok=True)
        rows = []
        for i in tqdm(range(n), desc=f"qata-synth {split}", disable=not progress, leave=False):
            rng = np.random.default_rng((seed, _SPLIT_IDS[split], i))
            img, mask, lungs = draw_chest_xray(rng, size)
            name = f"synth_{SPLITS[split][0].lower()}{i:05d}.png"
            _write_png(folder / "img" / name, img)
            _write_png(folder / "labelcol" / f"mask_{name}", (mask * 255).astype(np.uint8))
            rows.append((f"mask_{name}", describe_qata(mask, lungs)))
        write_text_table(text_file(root, split), rows)
        reports += [r[1] for r in rows]
    seconds = time.perf_counter() - t0
    log.info("qata-synth: %d images of %d px in %.1f s, %d distinct reports", len(reports), size, seconds, len(set(reports)))
    return {"seconds": seconds, "images": len(reports), "distinct_reports": len(set(reports))}
