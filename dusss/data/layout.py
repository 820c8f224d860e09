"""The LViT data layout (used by DuSSS for QaTa-COV19, MoNuSeg and BM-Seg) and its reader.

::

    <root>/Train_Folder/img/<image>        <root>/Train_Folder/labelcol/<mask>   <root>/Train_Folder/Train_text.xlsx
    <root>/Val_Folder/...                  Val_text.xlsx
    <root>/Test_Folder/...                 Test_text.xlsx

The workbook's columns are ``Image`` (the **mask** file name) and
``Description``. An image ``x.png`` pairs with the mask ``mask_x.png``
(QaTa-COV19) or with the mask of the same stem (MoNuSeg: ``x.tif`` -> ``x.png``;
BM-Seg and user data). Every pairing, text and image problem raises
:class:`DataError` naming the file and saying what to do, when the data set is
opened (or, for pixel problems, the first time the image is decoded), never as
a silent skip.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from ..errors import DusssError
from ..utils import get_logger

from .registry import GRAMMARS

__all__ = [
    "DataError", "SPLITS", "IMAGE_EXTS", "Sample", "split_dir", "text_file", "scan_split", "read_text_table",
    "read_image", "read_mask", "load_pair", "LViTDataset", "write_text_table",
]

log = get_logger("dusss.data")

SPLITS = {"train": "Train_Folder", "val": "Val_Folder", "test": "Test_Folder"}
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class DataError(DusssError):
    """A data folder, file or value a user supplied is not usable; the message says which and what to do."""


@dataclass(frozen=True)
class Sample:
    """One image of a split: its name (image stem), image and mask paths, and report."""

    name: str
    image: Path
    mask: Path
    text: str


def split_dir(root: str | os.PathLike, split: str) -> Path:
    """``<root>/Train_Folder`` etc. for ``split`` in ``train|val|test`` (``DataError`` for another name)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {sorted(SPLITS)}")
    return Path(root) / SPLITS[split]


def text_file(root: str | os.PathLike, split: str) -> Path:
    """The split's workbook, ``<root>/<Split>_Folder/<Split>_text.xlsx``."""
    folder = split_dir(root, split)
    return folder / f"{folder.name.split('_')[0]}_text.xlsx"


def write_text_table(path: str | os.PathLike, rows: Sequence[tuple[str, str]]) -> Path:
    """Write ``(mask file name, report)`` rows as an LViT workbook with columns ``Image``, ``Description``."""
    import pandas as pd

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(list(rows), columns=["Image", "Description"]).to_excel(path, index=False)
    return path


def read_text_table(path: str | os.PathLike) -> dict[str, str]:
    """``{mask file name: report}`` from an LViT workbook, validating columns, blanks and duplicates."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"text workbook {path} is missing; every split needs one with columns Image, Description "
                        f"(write it with dusss.data.write_text_table, or see README 'Your own data')")
    try:
        table = pd.read_excel(path, dtype=str)
    except Exception as exc:  # openpyxl raises several unrelated types for a broken file
        raise DataError(f"cannot read text workbook {path}: {exc}; re-save it as .xlsx") from exc
    table.columns = [str(c).strip() for c in table.columns]
    missing = {"Image", "Description"} - set(table.columns)
    if missing:
        raise DataError(f"text workbook {path} lacks column(s) {sorted(missing)} (has {list(table.columns)}); "
                        f"the first sheet needs the columns 'Image' (mask file name) and 'Description'")
    out: dict[str, str] = {}
    for row, (image, text) in enumerate(zip(table["Image"], table["Description"]), start=2):  # row 1 = header
        if not isinstance(image, str) or not image.strip():
            raise DataError(f"text workbook {path} row {row} has an empty 'Image' cell; fill it or delete the row")
        image = image.strip()
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"text workbook {path} row {row} ({image}) has an empty 'Description'; write the report")
        if image in out:
            raise DataError(f"text workbook {path} lists {image} twice (second time in row {row}); keep one row per mask")
        out[image] = text.strip()
    return out


def _mask_candidates(image: Path) -> list[str]:
    return [f"mask_{image.name}", f"mask_{image.stem}.png", f"{image.stem}.png", image.name]


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


def scan_split(root: str | os.PathLike, split: str) -> list[Sample]:
    """Pair every image of a split with its mask and report, or raise ``DataError`` naming the file.

    Checks, in order: the split folder and its ``img``/``labelcol`` folders
    exist; every image has a mask (``mask_<image>`` or the same stem); every
    mask has an image; no two images share a stem; every image has one text row
    (keyed by mask file name, or by image file name as some exports do).
    Pixels are not read here (see :func:`load_pair`).
    """
    folder = split_dir(root, split)
    if not folder.is_dir():
        raise DataError(f"split folder {folder} is missing; a data set in the LViT layout needs "
                        f"{'/'.join(SPLITS.values())} (create it with `python -m dusss data prepare-...`, or see README 'Your own data')")
    img_dir, mask_dir = folder / "img", folder / "labelcol"
    for sub in (img_dir, mask_dir):
        if not sub.is_dir():
            raise DataError(f"folder {sub} is missing; each split folder needs img/ (images) and labelcol/ (masks)")
    images = _list_images(img_dir)
    if not images:
        raise DataError(f"{img_dir} holds no images ({', '.join(IMAGE_EXTS)}); put the split's images there")
    masks = {p.name: p for p in _list_images(mask_dir)}
    texts = read_text_table(text_file(root, split))
    samples, used, stems = [], set(), {}
    for image in images:
        if image.stem in stems:
            raise DataError(f"images {stems[image.stem].name} and {image.name} in {img_dir} share the name {image.stem!r}; rename one")
        stems[image.stem] = image
        mask_name = next((c for c in _mask_candidates(image) if c in masks), None)
        if mask_name is None:
            raise DataError(f"image {image} has no mask in {mask_dir} (looked for {', '.join(_mask_candidates(image)[:3])}); "
                            f"add the mask or remove the image")
        used.add(mask_name)
        text = texts.get(mask_name, texts.get(image.name))
        if text is None:
            raise DataError(f"image {image.name} (mask {mask_name}) has no row in {text_file(root, split)}; "
                            f"add a row with Image={mask_name} and its Description")
        samples.append(Sample(image.stem, image, masks[mask_name], text))
    orphans = sorted(set(masks) - used)
    if orphans:
        raise DataError(f"mask {mask_dir / orphans[0]} has no image in {img_dir}"
                        f"{f' (and {len(orphans) - 1} more)' if len(orphans) > 1 else ''}; add the image or remove the mask")
    return samples


def _decode(path: Path, *, palette_to_rgb: bool = False) -> np.ndarray:
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                if im.mode == "P" and palette_to_rgb:  # palette images: colours, not indices
                    im = im.convert("RGB")
                arr = np.asarray(im.convert("I;16") if im.mode == "I" else im)
    except Exception as exc:  # PIL/tifffile raise many types for a broken file
        raise DataError(f"cannot read image {path}: {exc}; replace the file with a valid PNG/JPEG/TIFF") from exc
    if arr.size == 0 or min(arr.shape[:2]) == 0:
        raise DataError(f"image {path} is empty (shape {arr.shape}); replace the file")
    return arr


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as float32 (H, W, 3) in [0, 1]: gray replicated, alpha dropped, >8-bit data min-max scaled."""
    path = Path(path)
    arr = _decode(path, palette_to_rgb=True)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # channel-first TIFF
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise DataError(f"image {path} has shape {arr.shape}; expected a 2-D gray or RGB(A) image")
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    arr = arr.astype(np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def read_mask(path: str | os.PathLike, *, tolerance: float = 0.01) -> np.ndarray:
    """A mask file as bool (H, W), thresholded at half its maximum; ``DataError`` when it is not binary.

    A mask may use any one foreground value (1, 255, ...). It is not binary when
    more than ``tolerance`` of its pixels lie between 10 % and 90 % of the
    maximum (a gray image, a soft mask or an instance-label map), or when it has
    colour channels that disagree.
    """
    path = Path(path)
    arr = _decode(path)
    if arr.ndim == 3:
        if arr.shape[-1] == 4:
            arr = arr[..., :3]
        if arr.shape[-1] == 3 and not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            raise DataError(f"mask {path} is a colour image; save it as a single-channel binary mask (0 = background)")
        arr = arr[..., 0]
    arr = arr.astype(np.float64)
    top = arr.max()
    if top <= 0:
        return np.zeros(arr.shape, dtype=bool)
    rel = arr / top
    grey = float(((rel > 0.1) & (rel < 0.9)).mean())
    if grey > tolerance:
        raise DataError(f"mask {path} is not binary: {grey:.1%} of its pixels are neither background nor foreground "
                        f"(values {int(arr.min())}..{int(top)}); save it as 0 / 255 (instance labels: label > 0)")
    return rel >= 0.5


def load_pair(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """Decode and check one sample: image (H, W, 3) float, mask (H, W) bool, of the same size."""
    image, mask = read_image(sample.image), read_mask(sample.mask)
    if image.shape[:2] != mask.shape:
        raise DataError(f"image {sample.image} is {image.shape[1]}x{image.shape[0]} but its mask {sample.mask} is "
                        f"{mask.shape[1]}x{mask.shape[0]} (W x H); resize the mask with nearest-neighbour interpolation")
    return image, mask


def _resize(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image (3, S, S) uint8 (area/bilinear, antialiased) and mask (1, S, S) bool (nearest after area vote)."""
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]  # (1, 3, H, W)
    msk = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]  # (1, 1, H, W)
    if img.shape[-2:] != (size, size):
        img = F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        msk = F.interpolate(msk, size=(size, size), mode="area" if mask.shape[0] >= size else "nearest")
    img8 = (img[0].clamp(0, 1) * 255.0 + 0.5).to(torch.uint8)  # (3, S, S)
    return img8, msk[0] >= 0.5  # (1, S, S)


class LViTDataset(Dataset):
    """A split of a data set in the LViT layout as a ``torch`` Dataset of dicts.

    Items: ``image`` float (3, S, S) in [0, 1] (gray replicated to 3 channels),
    ``mask`` float (1, S, S) in {0, 1}, ``text`` str, ``name`` str (image stem),
    ``index`` int, with ``S = image_size``. Pairing and text are validated when
    the data set is built (:func:`scan_split`); each image is decoded, checked
    and resized the first time it is read and then kept in memory as uint8, so
    later epochs never touch the disk (``preload=True`` decodes all at once,
    which is also how ``data check`` finds every bad file). DataLoader workers
    each fill their own copy of the cache: use ``preload=True`` before building
    the loader, or ``persistent_workers=True``. ``augment`` is a
    :class:`dusss.data.augment.JointAugment`; the report is transformed with the
    image according to ``text_mode`` (``qata``, ``monuseg``, ``bmseg`` or
    ``none``; see :mod:`dusss.data.text`).
    """

    def __init__(self, root: str | os.PathLike, split: str, image_size: int, *, augment: Callable | None = None,
                 text_mode: str = "qata", preload: bool = False, names: Sequence[str] | None = None):
        if text_mode not in GRAMMARS:
            raise DataError(f"text_mode {text_mode!r} is not one of {tuple(GRAMMARS)}")
        if int(image_size) < 8:
            raise DataError(f"image_size {image_size!r} is too small; use e.g. 128 or 224")
        if augment is not None and hasattr(augment, "check_grammar"):
            augment.check_grammar(text_mode)
        self.root, self.split, self.image_size = Path(root), split, int(image_size)
        self.augment, self.text_mode = augment, text_mode
        samples = scan_split(self.root, split)
        if names is not None:
            by_name = {s.name: s for s in samples}
            unknown = [n for n in names if n not in by_name]
            if unknown:
                raise DataError(f"{len(unknown)} name(s) not in {split_dir(self.root, split)}, e.g. {unknown[0]!r}; "
                                f"the split file does not belong to this data set")
            samples = [by_name[n] for n in names]
        self.samples: list[Sample] = samples
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if preload:
            from tqdm.auto import tqdm

            for i in tqdm(range(len(self)), desc=f"decode {split}", leave=False):
                self._load(i)

    @property
    def names(self) -> list[str]:
        """Item names (image stems) in index order."""
        return [s.name for s in self.samples]

    @property
    def texts(self) -> list[str]:
        """Reports in index order (un-augmented)."""
        return [s.text for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._cache.get(index)
        if cached is None:
            image, mask = load_pair(self.samples[index])
            cached = self._cache[index] = _resize(image, mask, self.image_size)
        return cached

    def __getitem__(self, index: int) -> dict:
        img8, msk = self._load(index)
        image = img8.float() / 255.0  # (3, S, S)
        mask = msk.float()  # (1, S, S)
        text = self.samples[index].text
        if self.augment is not None:
            image, mask, params = self.augment(image, mask)
            text = self.augment.transform_text(text, params, self.text_mode)
        return {"image": image, "mask": mask, "text": text, "name": self.samples[index].name, "index": index}

    def subset(self, names: Sequence[str]) -> Subset:
        """A ``torch.utils.data.Subset`` of the items called ``names`` (in that order; shares the cache)."""
        pos = {n: i for i, n in enumerate(self.names)}
        missing = [n for n in names if n not in pos]
        if missing:
            raise DataError(f"{len(missing)} name(s) are not in {split_dir(self.root, self.split)}, e.g. {missing[0]!r}; "
                            f"was the split file made for another data set?")
        return Subset(self, [pos[n] for n in names])
