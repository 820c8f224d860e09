"""Where a configured data set comes from: generate the embedded ones, check the real ones.

:func:`ensure_dataset` is what every run calls first. For the embedded sets
(``qata-synth``, ``nuclei-real``) it generates the folder when it is missing or
was made with other settings; generation happens in a temporary sibling folder
under a file lock and the finished folder (its completion marker written last)
is moved into place, so an interrupted or concurrent generation never leaves a
half-written set behind. For real data sets it only checks that the folder is
there and says which ``prepare`` command makes it.

:func:`resolve_dataset` reads ``data_root`` for what it holds before any of
that: a folder in the LViT layout that dusss did not generate is the user's own
data (``dataset="lvit"``), whatever embedded set the config names, and a raw
QaTa-COV19 / BM-Seg / MoNuSeg download is answered with the command that
converts it. Nothing here ever deletes, or advises deleting, a folder dusss did
not write.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..config import Config
from ..utils import atomic_write_json, get_logger

from .augment import JointAugment
from .layout import (SPLITS, DataError, LViTDataset, load_pair, read_mask, read_text_table, scan_split, split_dir,
                     text_file, write_text_table)
from .registry import DATASETS, GRAMMARS, OWN_DATA, LiveMapping, LiveTuple, get_dataset
from .text import describe_bmseg, describe_qata

__all__ = ["EMBEDDED", "REAL", "MARKER", "TEXT_MODES", "resolve_dataset", "ensure_dataset", "text_mode_for",
           "open_split", "default_augment", "prepare_qata", "prepare_bmseg", "check_dataset"]

log = get_logger("dusss.data")
MARKER = ".dusss_complete.json"  # written last into a generated folder
# views of the data-set registry (dusss.data.registry), kept under their old names
EMBEDDED = LiveTuple(lambda: tuple(n for n, s in DATASETS.items() if s.generated), "the generated (embedded) sets")
REAL = LiveTuple(lambda: tuple(n for n, s in DATASETS.items() if not s.generated), "the sets read from data_root")
TEXT_MODES = LiveMapping(lambda: {n: s.grammar for n, s in DATASETS.items()}, "data set -> its report grammar")


def text_mode_for(dataset: str) -> str:
    """The report grammar of a data set name (``qata``, ``monuseg``, ``bmseg`` or ``none`` for own data).

    Read from the set's :class:`dusss.data.registry.DatasetSpec`; an unknown
    name raises ``ConfigError`` listing the registered sets.
    """
    return get_dataset(dataset).grammar


def _generation_params(cfg: Config) -> dict:
    """What the completion marker of a generated set records: a folder with other values is regenerated."""
    gen = get_dataset(cfg.dataset).generator
    _, version = gen.load()
    return {"dataset": cfg.dataset, "version": version, "seed": cfg.resolved_data_seed(),
            **{key: getattr(cfg, field) for key, field in gen.settings}}


def _generate(cfg: Config, folder: Path) -> dict:
    gen = get_dataset(cfg.dataset).generator
    function, _ = gen.load()
    return function(folder, *(getattr(cfg, field) for _, field in gen.settings), cfg.resolved_data_seed())


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER).read_text()).get("params")
    except (OSError, ValueError, AttributeError):
        return None


def _looks_generated(root: Path, dataset: str) -> bool:
    """True when ``root`` holds only split folders whose images carry the generator's file prefix."""
    entries = [p for p in root.iterdir() if p.name != MARKER]
    if any(p.name not in SPLITS.values() for p in entries):
        return False
    files = [f for p in entries for f in p.rglob("*") if f.is_file() and f.parent.name == "img"]
    prefix = get_dataset(dataset).generator.file_prefix  # the generator's own file names
    return all(f.name.startswith(prefix) for f in files)


def _has_lvit_layout(root: Path) -> bool:
    """True when ``root`` holds at least one ``<Split>_Folder`` (its contents are checked when it is read)."""
    return any((root / name).is_dir() for name in SPLITS.values())


def _raw_download_error(root: Path) -> DataError | None:
    """The ``DataError`` for a raw download of a registered set at ``root`` (``DatasetSpec.raw``), else ``None``."""
    for spec in DATASETS.values():
        raw = spec.raw
        if raw is not None and all(_find_dir(root, name) is not None for name in raw.folders):
            command = spec.prepare_command(str(root), "<new folder>")
            todo = f"convert it with `{command}` and use the new folder as data_root" if command else raw.advice
            return DataError(f"{root} is {raw.what} ({', '.join(raw.folders)}), not a data set in the LViT layout; "
                             f"{todo}")
    return None


def _either(words: list[str]) -> str:
    """``"a, b or c"``."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


_announced: set[tuple[Path, str]] = set()  # (root, dataset) pairs already logged in this process


def resolve_dataset(cfg: Config) -> Config:
    """``cfg`` with ``dataset`` set to what its data folder holds, when it names an embedded set the folder is not.

    Applies only to generated sets (``qata-synth``, ``nuclei-real``): a folder
    that does not exist yet, is empty, or was generated for that set is left to
    :func:`ensure_dataset`. A folder in the LViT layout that dusss did not
    generate is read as the own-data set ``lvit`` (reports used as written);
    a folder dusss generated for the other embedded set is read as that set.
    Either switch is logged once, with ``data_root`` pinned to the folder (the
    default folder of the new name would be another one). Every entry point
    resolves its config through here: the CLI when it builds the config,
    :func:`open_split`, :func:`ensure_dataset` and ``dusss.pretrain.pretrain``.
    """
    if cfg.dataset not in EMBEDDED:
        return cfg
    root = cfg.resolved_data_root()
    if not root.is_dir():
        return cfg
    marker = _read_marker(root)
    if marker is not None:
        found = marker.get("dataset") if isinstance(marker, dict) else None
        if found not in EMBEDDED or found == cfg.dataset:
            return cfg
        why = f"was generated by dusss as {found}"
    elif _has_lvit_layout(root) and not _looks_generated(root, cfg.dataset):
        found, why = OWN_DATA, "holds a data set in the LViT layout that dusss did not generate"
    else:
        return cfg
    if (root, found) not in _announced:
        _announced.add((root, found))
        named = [s for s in DATASETS.values() if not s.generated and s.paper and s.grammar != "none"]
        hint = (f"; if its reports follow the {_either(list(dict.fromkeys(s.paper for s in named)))} grammar, say "
                f"so with --set dataset={'|'.join(s.name for s in named)} (papermill: -p dataset ...)"
                if found == OWN_DATA and named else "")
        log.info("data_root %s %s: reading it as dataset=%s instead of %s%s", root, why, found, cfg.dataset, hint)
    return cfg.replace(dataset=found, data_root=str(root))


@contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _refuse_foreign(root: Path, dataset: str) -> None:
    """``DataError`` when ``root`` holds something dusss did not generate (it is then never replaced)."""
    if root.exists() and _read_marker(root) is None and not _looks_generated(root, dataset):
        raise _raw_download_error(root) or DataError(
            f"{root} is not a data set generated by dusss (no {MARKER}) nor one in the LViT layout "
            f"({'/'.join(SPLITS.values())}); point data_root at a folder in the LViT layout (README 'Your own "
            f"data') or at a new or empty folder to generate {dataset} there")


def ensure_dataset(cfg: Config) -> Path:
    """The data folder of ``resolve_dataset(cfg)``, generated first for an embedded set that is missing or stale.

    Embedded sets are (re)generated when the folder lacks the completion marker
    or was generated with other sizes, seed or generator version (a folder
    without a marker is redone only when it holds nothing but the generator's
    own files; a user's folder in the LViT layout is read instead, see
    :func:`resolve_dataset`; anything else is never touched: ``DataError``).
    Real sets raise ``DataError`` naming the folder and the command that
    prepares it when a split folder is missing. Callers that also pick the
    report grammar (``text_mode_for(cfg.dataset)``) resolve the config first.
    """
    cfg = resolve_dataset(cfg)
    root = cfg.resolved_data_root()
    spec = get_dataset(cfg.dataset)
    if not spec.generated:
        how = spec.prepare_command(spec.raw.placeholder if spec.raw else "<raw download folder>", str(root))
        how = how or spec.missing.format(root=root)
        missing = [name for name in SPLITS.values() if not (root / name).is_dir()]
        if missing and root.is_dir():
            raise _raw_download_error(root) or DataError(
                f"data folder {root} has no {', '.join(missing)}; {how}")
        if missing:
            raise DataError(f"data folder {root} has no {', '.join(missing)} (the folder does not exist); {how}")
        return root
    params = _generation_params(cfg)
    if _read_marker(root) == params:
        return root
    _refuse_foreign(root, cfg.dataset)  # before the lock, so nothing is written beside a folder that is not ours
    with _lock(root.parent / f".{root.name}.lock"):
        if _read_marker(root) == params:  # another process finished it while we waited
            return root
        _refuse_foreign(root, cfg.dataset)
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("generating %s in %s (%s)", cfg.dataset, root, ", ".join(f"{k}={v}" for k, v in params.items()))
        stats = _generate(cfg, tmp)
        atomic_write_json(tmp / MARKER, {"params": params, "stats": stats})
        if root.exists():
            old = root.parent / f".{root.name}.old-{os.getpid()}"
            root.rename(old)
            tmp.rename(root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(root)
    return root


def default_augment(cfg: Config):
    """The training augmentation of a config: report-safe joint flips/rotations, or ``None`` when ``augment`` is off.

    Flips are drawn only for a set whose report grammar survives them
    (:attr:`dusss.data.registry.GrammarSpec.flips`); otherwise small rotations only.
    """
    if not cfg.augment:
        return None
    grammar = GRAMMARS[text_mode_for(resolve_dataset(cfg).dataset)]
    return JointAugment("report-safe", p_flip=0.5 if grammar.flips else 0.0)


def open_split(cfg: Config, split: str, *, augment=None, preload: bool = False) -> LViTDataset:
    """``LViTDataset`` of ``split`` for a config: ensures the data, uses ``cfg.image_size`` and the set's grammar."""
    cfg = resolve_dataset(cfg)
    root = ensure_dataset(cfg)
    return LViTDataset(root, split, cfg.image_size, augment=augment, text_mode=text_mode_for(cfg.dataset), preload=preload)


# ---------------------------------------------------------------- raw downloads -> LViT layout
def _find_dir(base: Path, name: str, depth: int = 3) -> Path | None:
    """The first folder called ``name`` (case-insensitive) at most ``depth`` levels below ``base``."""
    frontier = [base]
    for _ in range(depth + 1):
        nxt = []
        for folder in frontier:
            if folder.name.lower() == name.lower() and folder.is_dir():
                return folder
            nxt += sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        frontier = nxt
    return None


def _copy_split(out: Path, split: str, items: list[tuple[Path, Path, str, str]]) -> int:
    """Copy ``(image, mask, mask name, report)`` items into ``out``'s split folder and write its workbook."""
    folder = split_dir(out, split)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    (folder / "labelcol").mkdir(parents=True, exist_ok=True)
    for image, mask, mask_name, _ in items:
        shutil.copyfile(image, folder / "img" / image.name)
        shutil.copyfile(mask, folder / "labelcol" / mask_name)
    write_text_table(text_file(out, split), [(m, t) for _, _, m, t in items])
    return len(items)


def _empty_output(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise DataError(f"output folder {out} is not empty; choose a new or empty --data-root to prepare into")


def prepare_qata(raw: str | os.PathLike, out: str | os.PathLike, text_dir: str | os.PathLike | None = None, *,
                 seed: int = 666, val_fraction: float = 0.2) -> dict[str, int]:
    """Turn the Kaggle ``QaTa-COV19-v2`` folders (+ LViT's text workbooks) into the LViT layout at ``out``.

    ``raw`` holds ``Train Set`` and ``Test Set`` (each ``Images/`` and
    ``Ground-truths/mask_<image>``), at any depth up to three. With
    ``text_dir`` the reports come from LViT's ``Train_text.xlsx``,
    ``Val_text.xlsx`` and ``Test_text.xlsx``, and LViT's own validation images
    (the rows of ``Val_text.xlsx``) form ``Val_Folder``; without a
    ``Val_text.xlsx`` a seeded ``val_fraction`` of the training images is held
    out, as LViT did (80/20). Without ``text_dir`` the reports are written by
    :func:`describe_qata` from the masks (logged, since they are not LViT's).
    Returns the number of images per split.
    """
    raw, out = Path(raw), Path(out)
    sets = {key: _find_dir(raw, name) for key, name in (("train", "Train Set"), ("test", "Test Set"))}
    for key, folder in sets.items():
        if folder is None:
            raise DataError(f"no '{'Train Set' if key == 'train' else 'Test Set'}' folder under {raw}; point the "
                            f"command at the unpacked Kaggle QaTa-COV19-v2 folder")
        for sub in ("Images", "Ground-truths"):
            if not (folder / sub).is_dir():
                raise DataError(f"{folder / sub} is missing; the Kaggle QaTa-COV19-v2 download has Images/ and Ground-truths/")
    texts: dict[str, str] = {}
    val_names: set[str] = set()
    if text_dir is not None:
        text_dir = Path(text_dir)
        for name in ("Train_text.xlsx", "Test_text.xlsx"):
            if not (text_dir / name).is_file():
                raise DataError(f"{text_dir / name} is missing; --text-dir must hold LViT's QaTa workbooks "
                                f"(Train_text.xlsx, Val_text.xlsx, Test_text.xlsx)")
            texts.update(read_text_table(text_dir / name))
        if (text_dir / "Val_text.xlsx").is_file():
            val_rows = read_text_table(text_dir / "Val_text.xlsx")
            texts.update(val_rows)
            val_names = set(val_rows)
    else:
        log.warning("no --text-dir: writing QaTa reports from the masks with describe_qata (not LViT's text)")
    _empty_output(out)

    def items(folder: Path) -> list[tuple[Path, Path, str, str]]:
        found = []
        for image in sorted(p for p in (folder / "Images").iterdir() if p.is_file()):
            mask_name = f"mask_{image.name}"
            mask = folder / "Ground-truths" / mask_name
            if not mask.is_file():
                raise DataError(f"image {image} has no mask {mask}; re-download the Kaggle archive or remove the image")
            if text_dir is not None:
                text = texts.get(mask_name, texts.get(image.name))
                if text is None:
                    raise DataError(f"image {image.name} has no row in the workbooks of {text_dir}; "
                                    f"add a row Image={mask_name} with its Description")
            else:
                text = describe_qata(read_mask(mask))
            found.append((image, mask, mask_name, text))
        return found

    train = items(sets["train"])
    if val_names:
        val = [it for it in train if it[2] in val_names or it[0].name in val_names]
    else:
        rng = np.random.default_rng(seed)
        pick = set(rng.permutation(len(train))[: max(1, int(round(val_fraction * len(train))))].tolist())
        val = [it for i, it in enumerate(train) if i in pick]
    val_set = {it[2] for it in val}
    counts = {"train": _copy_split(out, "train", [it for it in train if it[2] not in val_set]),
              "val": _copy_split(out, "val", val),
              "test": _copy_split(out, "test", items(sets["test"]))}
    log.info("prepared QaTa-COV19 in %s: %s", out, counts)
    return counts


def prepare_bmseg(raw: str | os.PathLike, out: str | os.PathLike, *, seed: int = 666, test_fraction: float = 0.26,
                  val_fraction: float = 0.1) -> dict[str, int]:
    """Turn BM-Seg's ``image/``, ``lesion mask/`` folders into the LViT layout with reports from the masks.

    Slices are grouped by patient (the file-name stem up to its last ``_``) and
    whole patients go to test (``test_fraction``, DuSSS: 70 of 270 slices),
    val (``val_fraction`` of the rest) or train, with the seed, so no patient is
    in two splits. The ``lesion mask`` becomes ``labelcol`` (same file name);
    reports are :func:`describe_bmseg` of it, since BM-Seg publishes no text.
    Returns the number of images per split.
    """
    raw, out = Path(raw), Path(out)
    image_dir, lesion_dir = _find_dir(raw, "image"), _find_dir(raw, "lesion mask")
    if image_dir is None or lesion_dir is None:
        raise DataError(f"no 'image' and 'lesion mask' folders under {raw}; point the command at the unpacked BM-Seg folder")
    images = sorted(p for p in image_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    if not images:
        raise DataError(f"{image_dir} holds no images")
    groups: dict[str, list[Path]] = {}
    for image in images:
        if not (lesion_dir / image.name).is_file():
            raise DataError(f"image {image} has no lesion mask {lesion_dir / image.name}; BM-Seg masks share the image's file name")
        groups.setdefault(image.stem.rsplit("_", 1)[0] if "_" in image.stem else image.stem, []).append(image)
    _empty_output(out)
    keys = sorted(groups)
    order = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
    n_test = max(1, int(round(test_fraction * len(keys))))
    n_val = max(1, int(round(val_fraction * (len(keys) - n_test))))
    if len(keys) - n_test - n_val < 1:
        raise DataError(f"{raw} has only {len(keys)} patient group(s); BM-Seg preparation needs at least 3")
    split_of = {k: ("test" if i < n_test else "val" if i < n_test + n_val else "train") for i, k in enumerate(order)}
    counts = {}
    for split in ("train", "val", "test"):
        chosen = [im for k in keys if split_of[k] == split for im in groups[k]]
        counts[split] = _copy_split(out, split, [(im, lesion_dir / im.name, im.name,
                                                  describe_bmseg(read_mask(lesion_dir / im.name))) for im in chosen])
    log.info("prepared BM-Seg in %s: %s", out, counts)
    return counts


def check_dataset(root: str | os.PathLike, *, decode: bool = True) -> dict[str, dict[str, float]]:
    """Validate a data folder in the LViT layout; return per split the image count, distinct reports, foreground share.

    Every pairing and text rule of :func:`scan_split` is checked, and with
    ``decode`` every image and mask is read (unreadable or empty files,
    non-binary masks, size mismatches), so the first problem raises
    ``DataError`` naming the file -- before any training starts.
    """
    from tqdm.auto import tqdm


    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist; generate it (make-synth, make-nuclei) or prepare it")
    if not _has_lvit_layout(root):
        raise _raw_download_error(root) or DataError(
            f"data folder {root} has none of {', '.join(SPLITS.values())}; a data set in the LViT layout needs all "
            f"three (README 'Your own data')")
    report: dict[str, dict[str, float]] = {}
    for split in SPLITS:
        samples = scan_split(root, split)
        fg = []
        if decode:
            for sample in tqdm(samples, desc=f"check {split}", leave=False):
                _, mask = load_pair(sample)
                fg.append(float(mask.mean()))
        report[split] = {"images": len(samples), "distinct_reports": len({s.text for s in samples}),
                         "foreground": sum(fg) / len(fg) if fg else float("nan"),
                         "empty_masks": sum(f == 0 for f in fg)}
    return report
