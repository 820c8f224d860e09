"""Step 2 of DuSSS: the semi-supervised segmentation loop every Step-2 method shares.

A method (:mod:`dusss.methods`: ``dusss``, ``mt``, ``supervised``, ``bcp``,
``ucmt``, or one registered from outside) owns only its loss; this loop owns
the rest and never branches on a method's name:

- **Data.** Every image is decoded once and held as uint8 tensors
  (:class:`TensorSplit`); labelled and unlabelled images come as two endless
  shuffled index streams (:class:`_Stream`), so every unlabelled image is used
  once per pass of its stream; a batch is augmented as a whole
  (:func:`dusss.data.augment.apply_params_batch`), with each unlabelled
  image's cached text-guided map under the same transform.
- **Budget.** An epoch is ``steps_per_epoch`` optimiser steps followed by one
  validation; the run has ``epochs`` of them (every method and label share the
  same step budget), the learning rate follows ``lr_schedule`` (cosine decay to
  0 over the budget by default), and early stopping (``patience``) can end a
  run only after ``min_epochs``.
- **Teacher.** Methods that declare ``uses_teacher`` get an EMA copy of the
  student (Eq. 12), updated after every step. The teacher always runs with
  batch statistics (train-mode BatchNorm, no gradient), as in Tarvainen &
  Valpola's Mean Teacher and SSL4MIS: the EMA of the student's running
  statistics does not describe the activations of the EMA weights (measured on
  qata-synth after 6 demo epochs: teacher Dice 0.02 in eval mode against 0.78
  with batch statistics), so an eval-mode teacher hands out all-background
  pseudo labels.
- **Text.** Methods that declare ``uses_text`` get ``z_text`` (Eq. 10) of each
  unlabelled image for its own report from the frozen Step-1 VLM. Because the
  VLM is frozen, each image's map is computed once from the un-augmented image
  (``text_cache=True``); the on-the-fly path (VLM on the augmented image and
  its rewritten report) stays behind the switch for the benchmark.

Every epoch the student is validated (Dice, mIoU; :mod:`dusss.metrics`) and,
for methods with a teacher, the pseudo labels are diagnosed on unlabelled
images against the masks training never sees: Dice of the teacher label, of the
text-guided mask and of the merged label, and, where the text map is flat
(``|z_text| < FLAT_TEXT_LOGIT``), how often the merged label equals the
teacher's. A run whose teacher pseudo-label Dice falls ``guard_epochs`` epochs
in a row is flagged in the log, ``history.csv`` and ``metrics.json``
(``pseudo_label_decline``). The best validation Dice picks ``best.pt`` and the
test split is scored with it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .config import Config, ConfigError, resume_differences
from .data import JointAugment, LViTDataset, default_augment, ensure_dataset, split_for, text_mode_for
from .data.augment import apply_params_batch
from .data.prepare import resolve_dataset
from .distributed import DistInfo, ddp_wrap, init_distributed, is_main_process, quiet_non_main, save_on_main, sync_buffers
from .errors import MissingCheckpointError
from .evaluate import evaluate_model, load_student
from .losses import ema_update
from .methods import METHODS, Method, Models, StepBatch, get_method, method_revision, optimizer_groups
from .metrics import binarize, dice_of_masks
from .paths import runs_dir
from .runs import default_vlm_checkpoint, ssmis_dir
from .textseg import build_student, needs_text, segment
from .unet import build_unet, count_parameters
from .utils import atomic_write_json, autocast, get_logger, load_checkpoint, repo_root, resolve_device, seed_everything
from .vlm import load_vlm

__all__ = [
    "FLAT_TEXT_LOGIT", "SsmisData", "TensorSplit", "prepare_data", "TextGuidance", "train_ssmis", "load_student",
    "decline_streak", "pseudo_label_examples", "plot_training_curves", "plot_diagnostics", "plot_pseudo_label_grid",
]

log = get_logger(__name__)

FLAT_TEXT_LOGIT = 0.5  # |z_text| below this = "the text map says nothing here" (sigmoid within 0.38..0.62)

# Keys that may differ when a run is resumed from its last.pt (they change how, not what, is computed).

# ---------------------------------------------------------------------------- data
@dataclass
class SsmisData:
    """The three splits and the labelled / unlabelled partition of the training split (names)."""

    root: Path
    train: Dataset
    val: Dataset
    test: Dataset
    labelled: list[str]
    unlabelled: list[str]
    text_mode: str


def prepare_data(cfg: Config) -> SsmisData:
    """Make sure the data set exists (the embedded ones are generated), open its splits and split the labels.

    The labelled share ``cfg.ratio`` of the training split comes from
    :func:`dusss.data.split_for`: the committed ``splits/`` file when there is
    one, else the same deterministic draw from the names, ratio and seed, so
    every method of the same ratio and seed sees the same labelled images.
    """
    cfg = resolve_dataset(cfg)  # a data_root in the LViT layout is own data, whatever embedded set cfg names
    root = Path(ensure_dataset(cfg))
    mode = text_mode_for(cfg.dataset)
    train = LViTDataset(root, "train", cfg.image_size, text_mode=mode)
    val = LViTDataset(root, "val", cfg.image_size, text_mode=mode)
    test = LViTDataset(root, "test", cfg.image_size, text_mode=mode)
    labelled, unlabelled = split_for(cfg, train.names)
    if not labelled:
        raise ConfigError(f"ratio={cfg.ratio} leaves no labelled image among {len(train)}; raise config key ratio")
    if get_method(cfg.method).uses_unlabelled and not unlabelled:
        raise ConfigError(f"ratio={cfg.ratio} leaves no unlabelled image for method={cfg.method}; use "
                          "method=supervised or a ratio below 1")
    return SsmisData(root, train, val, test, list(labelled), list(unlabelled), mode)


class TensorSplit(Dataset):
    """Items of an :class:`LViTDataset` held in memory as two tensors: images uint8 (N, 3, S, S), masks bool (N, 1, S, S).

    Training draws whole batches from it by index (:meth:`batch`), so no
    per-image Python work is left on the training path; it is also a Dataset
    of the same dicts as ``LViTDataset`` (``image``, ``mask``, ``text``,
    ``name``) for :func:`dusss.evaluate.evaluate_model`. ``positions`` selects
    and orders the items (default: all).
    """

    def __init__(self, dataset: LViTDataset, positions: list[int] | None = None) -> None:
        positions = list(range(len(dataset))) if positions is None else list(positions)
        pairs = [dataset._load(p) for p in positions]  # decoded once, cached by the dataset
        self.images = torch.stack([img for img, _ in pairs]) if pairs else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
        self.masks = torch.stack([msk for _, msk in pairs]) if pairs else torch.zeros(0, 1, 1, 1, dtype=torch.bool)
        self.names = [dataset.samples[p].name for p in positions]
        self.texts = [dataset.samples[p].text for p in positions]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i].float() / 255.0, "mask": self.masks[i].float(), "text": self.texts[i],
                "name": self.names[i]}

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images float (b, 3, S, S) in [0, 1] and masks float (b, 1, S, S) of the items at ``idx``."""
        return self.images[idx].float() / 255.0, self.masks[idx].float()


class _Stream:
    """An endless shuffled stream of batch indices into ``n`` items, reshuffled every pass, resumable exactly.

    Under torchrun every rank holds the same permutation (same seed) and takes
    its own slice of each global batch, so the ranks' shards are disjoint.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.bs, self.rank, self.world = n, batch_size, rank, world
        self.generator = torch.Generator().manual_seed(seed)
        self.perm, self.cursor, self.passes = torch.randperm(n, generator=self.generator), 0, 0

    def next(self) -> torch.Tensor:
        """This rank's ``batch_size`` indices of the next global batch (wrapping into a fresh pass)."""
        need = self.bs * self.world
        out = []
        while need > 0:
            if self.cursor >= self.n:
                self.perm, self.cursor, self.passes = torch.randperm(self.n, generator=self.generator), 0, self.passes + 1
            take = self.perm[self.cursor:self.cursor + need]
            out.append(take)
            self.cursor += len(take)
            need -= len(take)
        idx = torch.cat(out)  # (bs * world,)
        return idx[self.rank * self.bs:(self.rank + 1) * self.bs]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "perm": self.perm, "cursor": self.cursor,
                "passes": self.passes}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.perm, self.cursor, self.passes = state["perm"], int(state["cursor"]), int(state["passes"])


class _Augmenter:
    """The data set's training augmentation (:func:`dusss.data.default_augment`) applied to whole batches.

    One parameter draw per image from a private, checkpointed generator; the
    image, its mask and its cached text-guided map get the same transform
    (:func:`dusss.data.augment.apply_params_batch`; masks nearest, maps
    bilinear with zero fill, so a rotated-in corner is a flat logit 0), and the
    reports are rewritten for it when the VLM reads them on the fly.
    """

    def __init__(self, aug: JointAugment, text_mode: str) -> None:
        self.aug, self.text_mode = aug, text_mode
        self.last_params: list[dict] = []  # the parameter dicts of the latest call, one per image
        if self.aug.generator is None:
            self.aug.generator = torch.Generator().manual_seed(0)

    @classmethod
    def from_config(cls, cfg: Config, seed: int, text_mode: str) -> "_Augmenter":
        """The config's augmentation (none when ``augment`` is off) drawing from a generator seeded with ``seed``."""
        aug = default_augment(cfg) or JointAugment("none")
        aug.generator = torch.Generator().manual_seed(seed)
        return cls(aug, text_mode)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, maps: torch.Tensor | None = None,
                 texts: list[str] | None = None):
        """``(x, y, maps, texts)`` transformed; ``maps`` and ``texts`` pass through as None when not given."""
        params = [self.aug.sample() for _ in range(len(x))]
        self.last_params = params  # what a method that keeps per-image state in the un-augmented frame reads
        x, y = apply_params_batch(x, params), apply_params_batch(y, params, nearest=True)
        if maps is not None:
            maps = apply_params_batch(maps, params)
        if texts is not None:
            texts = [self.aug.transform_text(t, p, self.text_mode) for t, p in zip(texts, params)]
        return x, y, maps, texts

    @property
    def generator(self) -> torch.Generator:
        return self.aug.generator


# ---------------------------------------------------------------------------- text guidance
class TextGuidance:
    """The frozen VLM's text-guided logits ``z_text`` (Eq. 10) for unlabelled images, cached or on the fly.

    ``vlm`` is a model from :func:`dusss.vlm.load_vlm`. :meth:`logits` runs it on
    ``(B, 3, H, W)`` images with one report each; when the VLM was pre-trained at
    another image size the images are resized to it and the logits back.
    :meth:`cache` computes the logits of a :class:`TensorSplit` once, without
    augmentation, and returns them as a float16 ``(N, 1, H, W)`` CPU tensor
    (half the memory; logits need no more precision).
    """

    def __init__(self, vlm: nn.Module, device: torch.device, batch_size: int = 32) -> None:
        self.vlm, self.device, self.batch_size = vlm, device, batch_size
        self.size = int(vlm.cfg.image_size)

    @torch.no_grad()
    def logits(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """``z_text`` of each image for its own report: ``(B, 1, H, W)`` on the images' device."""
        h, w = images.shape[-2:]
        x = images.to(self.device)
        if (h, w) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        z = self.vlm.text_guided_logits(x, list(texts))  # (B, 1, s, s)
        if z.shape[-2:] != (h, w):
            z = F.interpolate(z, size=(h, w), mode="bilinear", align_corners=False)
        return z.to(images.device)

    @torch.no_grad()
    def cache(self, split: TensorSplit, *, progress: bool = False) -> torch.Tensor:
        """Un-augmented ``z_text`` of every item of ``split``: float16 ``(N, 1, H, W)`` on the CPU."""
        out = []
        for start in tqdm(range(0, len(split), self.batch_size), desc="text-guided masks", disable=not progress,
                          leave=False):
            idx = torch.arange(start, min(start + self.batch_size, len(split)))
            images, _ = split.batch(idx)  # (b, 3, H, W)
            out.append(self.logits(images, [split.texts[i] for i in idx.tolist()]).cpu().half())
        return torch.cat(out) if out else torch.zeros(0, 1, 1, 1, dtype=torch.half)


def _load_guidance(cfg: Config, device: torch.device) -> TextGuidance:
    path = default_vlm_checkpoint(cfg)
    if not Path(path).is_file():
        raise MissingCheckpointError(
            f"method={cfg.method} needs the Step-1 VLM checkpoint {path}, which does not exist; pre-train it with "
            f"`python -m dusss pretrain --profile {cfg.profile}` (or notebook 02), or pass --vlm PATH")
    vlm = load_vlm(path, device)
    if vlm.cfg.dataset != cfg.dataset:
        log.warning("the VLM %s was pre-trained on %s, not %s", path, vlm.cfg.dataset, cfg.dataset)
    # A VLM whose grounding saw the masks of a larger labelled share (or another data seed's split) has seen
    # masks of images that are unlabelled here: its text-guided masks would leak ground truth.
    vlm_seed, seed = vlm.cfg.resolved_data_seed(), cfg.resolved_data_seed()
    leaks = getattr(vlm.cfg, "ground_sup", False) and (vlm.cfg.ratio > cfg.ratio or vlm_seed != seed)
    if leaks:
        raise ConfigError(f"the VLM {path} was pre-trained with mask supervision on the ratio={vlm.cfg.ratio:g}, "
                          f"data seed {vlm_seed} labelled split, which includes images that are unlabelled at "
                          f"ratio={cfg.ratio:g}, data seed {seed}; pre-train it at this ratio and data seed (or "
                          "smaller ratio) or with ground_sup=false")
    return TextGuidance(vlm, device, batch_size=max(cfg.labelled_bs + cfg.unlabelled_bs, 8))


# ---------------------------------------------------------------------------- evaluation pieces
_DIAG_KEYS = ("diag_teacher_dice", "diag_text_dice", "diag_merged_dice", "diag_flat_frac", "diag_flat_agree",
              "diag_flat_shift")


@torch.no_grad()
def _pseudo_label_diagnostics(teacher: nn.Module | None, split: TensorSplit, text_maps: torch.Tensor | None,
                              cfg: Config, device: torch.device) -> dict[str, float]:
    """Dice of the teacher label, the text-guided mask and the merged label vs the hidden masks; flat-text agreement.

    ``split`` holds the diagnosed unlabelled images (un-augmented) and their
    hidden masks, ``text_maps`` their cached ``z_text``; NaN for what a method
    does not have.
    """
    nan = float("nan")
    if teacher is None or not len(split):
        return {k: nan for k in _DIAG_KEYS}
    teacher.train()  # batch statistics: see the module docstring
    sums = {"teacher": 0.0, "text": 0.0, "merged": 0.0}
    flat_pixels, flat_agree, flat_shift = 0, 0, 0.0
    bs = cfg.labelled_bs + cfg.unlabelled_bs
    for start in range(0, len(split), bs):
        idx = torch.arange(start, min(start + bs, len(split)))
        x, y = split.batch(idx)
        x, y = x.to(device), y.to(device) > 0.5  # (b, 3, H, W), (b, 1, H, W)
        z_t = teacher(x).float()  # (b, 1, H, W)
        sums["teacher"] += dice_of_masks(binarize(z_t, cfg.threshold), y)[0].sum().item()
        if text_maps is not None:
            z_x = text_maps[idx].to(device).float()  # (b, 1, H, W)
            z_m = z_t + z_x  # Eq. 15 before the sigmoid
            sums["text"] += dice_of_masks(binarize(z_x, cfg.threshold), y)[0].sum().item()
            sums["merged"] += dice_of_masks(binarize(z_m, cfg.threshold), y)[0].sum().item()
            flat = z_x.abs() < FLAT_TEXT_LOGIT
            flat_pixels += int(flat.sum())
            flat_agree += int((binarize(z_m, cfg.threshold) == binarize(z_t, cfg.threshold))[flat].sum())
            flat_shift += float((torch.sigmoid(z_m) - torch.sigmoid(z_t)).abs()[flat].sum())
    n = len(split)
    has_text = text_maps is not None
    return {
        "diag_teacher_dice": sums["teacher"] / n,
        "diag_text_dice": sums["text"] / n if has_text else nan,
        "diag_merged_dice": sums["merged"] / n if has_text else nan,
        "diag_flat_frac": flat_pixels / split.images[0, 0].numel() / n if has_text else nan,
        "diag_flat_agree": flat_agree / flat_pixels if has_text and flat_pixels else nan,
        "diag_flat_shift": flat_shift / flat_pixels if has_text and flat_pixels else nan,
    }


def decline_streak(values: list[float]) -> int:
    """How many epochs in a row, ending at the last, ``values`` (teacher pseudo-label Dice per epoch) fell."""
    streak = 0
    for prev, cur in zip(values[-2::-1], values[::-1]):
        if not cur < prev:
            break
        streak += 1
    return streak


# ---------------------------------------------------------------------------- checkpoints
def _vlm_digest(cfg: Config) -> str:
    """Short SHA-256 of the VLM file a text-reading run uses ("" otherwise), so a re-trained VLM is never reused silently."""
    path = Path(default_vlm_checkpoint(cfg))
    if not get_method(cfg.method).uses_text or not path.is_file():
        return ""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _check_resumable(saved: dict, cfg: Config, path: Path) -> None:
    now = cfg.to_dict()
    diff = resume_differences(saved, cfg, 2)  # Step-1 keys: the VLM is identified by its file digest instead
    if diff:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diff[:4])
        raise ConfigError(f"{path} belongs to a run with other settings ({details}); choose another out_dir "
                          f"(--out) or set resume=false to start afresh there")


def _portable(path: Path) -> str:
    """``path`` relative to the checkout when it lies inside it, else relative to the folder holding the runs
    root (``$DUSSS_RUNS`` pointing at another checkout's ``runs/``, as a grid run from a frozen copy does):
    results files must not hold machine paths. Any other path is kept as it is."""
    resolved = Path(path).resolve()
    for base in (repo_root(), runs_dir().parent):
        try:
            return str(resolved.relative_to(base.resolve()))
        except ValueError:
            continue
    return str(path)


def _lr_factor(cfg: Config, total_steps: int):
    """The learning-rate multiplier per step: cosine decay from 1 to 0 over the budget, or constant 1."""
    if cfg.lr_schedule == "constant":
        return lambda step: 1.0
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


# ---------------------------------------------------------------------------- training
def train_ssmis(cfg: Config, *, progress: bool = True) -> dict[str, Any]:
    """Train ``cfg.method`` at ``cfg.ratio`` labels and score it; returns the ``metrics.json`` dict.

    ``cfg.method`` names a class of :data:`dusss.methods.METHODS`; the loop
    gives it what its class attributes ask for (unlabelled batches, an EMA
    teacher, text-guided logits) and never looks at its name. Writes into
    :func:`dusss.runs.ssmis_dir`: ``config.json``, ``history.csv`` (per epoch:
    losses, consistency weight, EMA alpha, learning rate, validation
    Dice/mIoU, pseudo-label diagnostics and their decline streak, seconds),
    ``best.pt`` (best validation Dice) and ``last.pt`` (every epoch; both
    written atomically and loadable with ``weights_only=True``),
    ``metrics.json`` and ``test_per_image.csv``. With ``cfg.resume`` an
    interrupted run continues from ``last.pt`` (the same numbers as an
    uninterrupted one on the CPU) and a finished one returns its metrics at
    once; ``resume=false`` starts afresh. Under ``torchrun`` each rank draws its
    own shard of both streams, the student trains inside
    DistributedDataParallel, the EMA teacher and the BatchNorm statistics are
    kept identical on every rank (:func:`dusss.distributed.sync_buffers`), and
    only rank 0 logs and writes files; every rank validates the same model, so
    all take the same early-stopping decision.
    """
    method_cls = get_method(cfg.method)
    info = init_distributed(cfg.device)
    if info.distributed and not method_cls.distributed:
        ddp = ", ".join(name for name, cls in METHODS.items() if cls.distributed)
        raise ConfigError(f"method={cfg.method!r} does not run under torchrun yet (only {ddp}); start it as a "
                          "single process")
    with quiet_non_main():
        return _train_ssmis(resolve_dataset(cfg), method_cls, info, progress=progress and info.is_main)


def _train_ssmis(cfg: Config, method_cls: type[Method], info: DistInfo, *, progress: bool) -> dict[str, Any]:
    """The body of :func:`train_ssmis` in this process (``info``: its rank, world size and device)."""
    seed_everything(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = info.device
    out = ssmis_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    last_path, best_path, metrics_path = out / "last.pt", out / "best.pt", out / "metrics.json"
    t_start = time.time()

    state = None
    digest = _vlm_digest(cfg)
    revision = method_revision(method_cls)
    if cfg.resume and last_path.is_file():
        state = load_checkpoint(last_path)
        _check_resumable(state["config"], cfg, last_path)
        if state.get("vlm_digest", "") != digest:
            log.warning("the VLM checkpoint changed since %s was written; training afresh", last_path)
            state = None
        elif int(state.get("method_revision", 1)) != revision:
            log.warning("%s was written by revision %s of method %s, this is revision %d (its training changed "
                        "with the same settings); training afresh", last_path, state.get("method_revision", 1),
                        cfg.method, revision)
            state = None
        elif "streams" not in state:
            log.warning("%s was written by an older version of the loop; training afresh", last_path)
            state = None
    if state is not None:
        if state["finished"] and metrics_path.is_file() and (state["stopped_early"] or state["epoch"] >= cfg.epochs):
            log.info("ssmis run in %s is already finished; returning its metrics (resume=false retrains)", out)
            return json.loads(metrics_path.read_text())
    if is_main_process():
        cfg.save(out / "config.json")
    log.info("ssmis %s at ratio %g on %s (%s), output %s\n%s", cfg.method, cfg.ratio, cfg.dataset, device, out,
             cfg.describe())

    # data: every image decoded once and held as uint8 tensors; batches drawn by index, augmented as batches
    t_data = time.time()
    data = prepare_data(cfg)
    pos = {n: i for i, n in enumerate(data.train.names)}
    lab = TensorSplit(data.train, [pos[n] for n in data.labelled])
    unl = TensorSplit(data.train, [pos[n] for n in data.unlabelled]) if method_cls.uses_unlabelled else None
    val, test = TensorSplit(data.val), TensorSplit(data.test)
    if is_main_process():
        atomic_write_json(out / "split.json", {"labelled": data.labelled, "unlabelled": data.unlabelled})
    diag_n = len(data.unlabelled) if cfg.diag_images == 0 else min(cfg.diag_images, len(data.unlabelled))
    diag = TensorSplit(data.train, [pos[n] for n in data.unlabelled[:diag_n]]) if method_cls.uses_teacher else None
    data_seconds = time.time() - t_data

    # models: the teacher starts as an exact copy of the student (Eq. 12 at step 0)
    student = build_student(cfg, getattr(method_cls, "student", "unet")).to(device)
    reads_text = needs_text(student)  # a text-conditioned student: the labelled reports ride with their images
    memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
    student = student.to(memory_format=memory)
    teacher = copy.deepcopy(student).requires_grad_(False).train() if method_cls.uses_teacher else None  # batch-stat BN
    method = method_cls(cfg, device)  # before the optimiser: a method's own modules (parameters()) join it
    optimizer = torch.optim.Adam(optimizer_groups(student, method), lr=cfg.lr)
    n_lab, n_unl = len(lab), len(unl) if unl is not None else 0
    # an epoch = steps_per_epoch steps (0: one pass over the longer stream); torchrun: a step takes world_size batches
    steps = cfg.steps_per_epoch or max(math.ceil(n_lab / cfg.labelled_bs), math.ceil(n_unl / cfg.unlabelled_bs))
    steps = max(1, math.ceil(steps / info.world_size))
    total_steps = steps * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(cfg, total_steps))
    models = Models(student, ddp_wrap(student, info), teacher)  # forward: DDP-wrapped under torchrun

    t0 = time.time()
    guidance = _load_guidance(cfg, device) if method_cls.uses_text else None
    unl_maps = diag_maps = None
    if guidance is not None:
        if cfg.text_cache:
            unl_maps = guidance.cache(unl, progress=progress)  # (N_u, 1, H, W) float16
            diag_maps = unl_maps[:diag_n]
        else:
            diag_maps = guidance.cache(diag, progress=progress)
    cache_seconds = time.time() - t0

    lab_aug = _Augmenter.from_config(cfg, cfg.seed + 1, data.text_mode)
    unl_aug = _Augmenter.from_config(cfg, cfg.seed + 2, data.text_mode)
    lab_stream = _Stream(n_lab, cfg.labelled_bs, cfg.seed + 3, info.rank, info.world_size)
    unl_stream = _Stream(n_unl, cfg.unlabelled_bs, cfg.seed + 4, info.rank, info.world_size) if unl is not None else None
    streams = {"lab": lab_stream, **({"unl": unl_stream} if unl_stream is not None else {})}
    augmenters = {"lab_aug": lab_aug, "unl_aug": unl_aug}

    history: list[dict] = []
    epoch, global_step, best_dice, best_epoch, bad_epochs, stopped_early = 0, 0, -1.0, 0, 0, False
    if state is not None:
        student.load_state_dict(state["student"])
        if teacher is not None:
            teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        method.load_state_dict(state.get("method", {}))
        for key, stream in streams.items():
            stream.load_state_dict(state["streams"][key])
        for key, aug in augmenters.items():
            aug.generator.set_state(state["rng"][key])
        torch.set_rng_state(state["rng"]["torch"])
        history = list(state["history"])
        epoch, global_step, best_dice, best_epoch, bad_epochs = (state["epoch"], state["global_step"],
                                                                 state["best_dice"], state["best_epoch"],
                                                                 state["bad_epochs"])
        stopped_early = bool(state["stopped_early"])
        log.info("resuming %s from epoch %d (best val Dice %.4f at epoch %d)", out, epoch, best_dice, best_epoch)

    def snapshot(finished: bool) -> dict:
        return {
            "config": cfg.to_dict(), "student": student.state_dict(),
            "teacher": teacher.state_dict() if teacher is not None else {}, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "method": method.state_dict(),
            "epoch": epoch, "global_step": global_step, "best_dice": best_dice, "best_epoch": best_epoch,
            "bad_epochs": bad_epochs, "stopped_early": stopped_early, "finished": finished, "history": history,
            "vlm_digest": digest, "method_revision": revision, "streams": {k: s.state_dict() for k, s in streams.items()},
            "rng": {"torch": torch.get_rng_state(), **{k: a.generator.get_state() for k, a in augmenters.items()}},
        }

    def next_batch() -> StepBatch:
        idx = lab_stream.next()
        x_l, y_l = lab.batch(idx)
        texts_l = [lab.texts[i] for i in idx.tolist()] if reads_text else None
        x_l, y_l, _, texts_l = lab_aug(x_l, y_l, None, texts_l)  # reports rewritten for flips and quarter turns
        x_u = z_text = None
        extra: dict[str, Any] = {}
        if unl_stream is not None:
            idx_u = unl_stream.next()
            x_u, y_hidden = unl.batch(idx_u)  # the hidden masks ride along only to be transformed alike; never used
            maps = unl_maps[idx_u].float() if unl_maps is not None else None
            read = reads_text or guidance is not None and unl_maps is None  # the student or the VLM reads the reports
            texts = [unl.texts[i] for i in idx_u.tolist()] if read else None
            x_u, _, maps, texts = unl_aug(x_u, y_hidden, maps, texts)
            if reads_text:  # a text-conditioned student: its reports, identities and augmentations ride along
                extra = {"texts_u": texts, "idx_u": idx_u, "aug_u": unl_aug.last_params}
            if guidance is not None:
                z_text = (maps if maps is not None else guidance.logits(x_u, texts)).to(device)  # (Bu, 1, H, W)
            x_u = x_u.to(device).contiguous(memory_format=memory)
        return StepBatch(x_l.to(device).contiguous(memory_format=memory), y_l.to(device), x_u, z_text, global_step,
                         total_steps, global_step / steps, texts_l, **extra)

    bar = tqdm(total=cfg.epochs, initial=epoch, desc=f"ssmis {cfg.method} r{cfg.ratio:g}", disable=not progress)
    step_seconds = 0.0 if state is None else float(state.get("step_seconds", 0.0))
    while epoch < cfg.epochs and not stopped_early:
        t_epoch = time.time()
        student.train()
        sums: dict[str, float] = {"loss": 0.0, "sup": 0.0}
        weight = alpha = 0.0
        t_steps = time.time()
        for _ in range(steps):
            batch = next_batch()
            with autocast(cfg.amp, device):  # bf16 forward passes where cfg.amp enables it (default: CUDA only)
                result = method.step(models, batch)
            optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            optimizer.step()
            scheduler.step()
            if teacher is not None:
                alpha = ema_update(teacher, student, cfg.ema_alpha, global_step)
                sync_buffers(teacher)  # torchrun: the teacher's BatchNorm statistics equal on every rank
            global_step += 1
            weight = result.weight
            sums["loss"] += result.loss.item()
            sums["sup"] += result.sup.item()
            for key, value in result.terms.items():
                sums[key] = sums.get(key, 0.0) + value.item()
        step_seconds += time.time() - t_steps
        epoch += 1

        sync_buffers(student)  # torchrun: every rank validates the same model, so all stop together
        val_scores, _ = evaluate_model(student, val, device=device, threshold=cfg.threshold, batch_size=64)
        diag_row = _pseudo_label_diagnostics(teacher, diag, diag_maps, cfg, device) if diag is not None else \
            {k: float("nan") for k in _DIAG_KEYS}
        teacher_curve = [r["diag_teacher_dice"] for r in history] + [diag_row["diag_teacher_dice"]]
        streak = decline_streak(teacher_curve)
        row = {"epoch": epoch, "steps": global_step,
               **{("loss" if k == "loss" else f"loss_{k}"): v / steps for k, v in sums.items()},
               "cons_weight": weight, "ema_alpha": alpha, "lr": scheduler.get_last_lr()[0],
               "val_dice": val_scores["dice"], "val_miou": val_scores["miou"], **diag_row,
               "diag_decline_streak": streak, "seconds": time.time() - t_epoch}
        for key in ("loss_semi", "loss_merged", "loss_text"):
            row.setdefault(key, 0.0)
        history.append(row)
        if streak >= cfg.guard_epochs:
            log.warning("epoch %d: the teacher's pseudo-label Dice on unlabelled images fell %d epochs in a row "
                        "(%s); the consistency term may be teaching the student noise (see cons_weight, perturb, "
                        "noise_std)", epoch, streak, " -> ".join(f"{v:.3f}" for v in teacher_curve[-streak - 1:]))
        if val_scores["dice"] > best_dice:
            best_dice, best_epoch, bad_epochs = val_scores["dice"], epoch, 0
            save_on_main({"config": cfg.to_dict(), "student": student.state_dict(),
                          "teacher": teacher.state_dict() if teacher is not None else {}, "epoch": epoch,
                          "val_dice": val_scores["dice"], "val_miou": val_scores["miou"]}, best_path)
        else:
            bad_epochs += 1
            stopped_early = bad_epochs >= cfg.patience and epoch >= cfg.min_epochs and epoch < cfg.epochs
        save_on_main({**snapshot(finished=False), "step_seconds": step_seconds}, last_path)
        if is_main_process():
            pd.DataFrame(history).to_csv(out / "history.csv", index=False)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", val_dice=f"{val_scores['dice']:.3f}", best=f"{best_dice:.3f}")
        log.info("epoch %d: loss %.4f (sup %.4f semi %.4f) val Dice %.4f mIoU %.4f | pseudo labels: teacher %.3f "
                 "text %.3f merged %.3f", epoch, row["loss"], row["loss_sup"], row["loss_semi"], val_scores["dice"],
                 val_scores["miou"], diag_row["diag_teacher_dice"], diag_row["diag_text_dice"],
                 diag_row["diag_merged_dice"])
    bar.close()
    if stopped_early:
        log.info("early stopping after epoch %d: no validation gain for %d epochs", epoch, cfg.patience)

    best_model, _, best_ckpt = load_student(best_path, device)
    test_scores, per_image = evaluate_model(best_model, test, device=device, threshold=cfg.threshold, batch_size=64)
    if is_main_process():
        per_image.to_csv(out / "test_per_image.csv", index=False)
    best_row = next(r for r in history if r["epoch"] == best_epoch)
    declines = [r["epoch"] for r in history if r["diag_decline_streak"] >= cfg.guard_epochs]
    metrics = {
        "method": cfg.method, "ratio": cfg.ratio, "dataset": cfg.dataset, "profile": cfg.profile, "seed": cfg.seed,
        "n_labelled": n_lab, "n_unlabelled": len(data.unlabelled), "n_val": len(val), "n_test": test_scores["n"],
        "unet_params": count_parameters(student), "epochs_run": epoch, "stopped_early": stopped_early,
        "best_epoch": best_epoch, "val_dice": best_ckpt["val_dice"], "val_miou": best_ckpt["val_miou"],
        "test_dice": test_scores["dice"], "test_miou": test_scores["miou"], "test_dice_std": test_scores["dice_std"],
        "diag_best": {k: best_row[k] for k in _DIAG_KEYS},
        "diag_last": {k: history[-1][k] for k in _DIAG_KEYS},
        "pseudo_label_decline": bool(declines), "pseudo_label_decline_epochs": declines,
        "train_seconds": float(sum(r["seconds"] for r in history)), "step_seconds": step_seconds,
        "data_seconds": data_seconds, "text_cache_seconds": cache_seconds,
        "text_cache": cfg.text_cache, "vlm_digest": digest, "method_revision": revision, "steps_per_epoch": steps, "total_steps": total_steps,
        "out_dir": _portable(out),
    }
    metrics["run_seconds"] = time.time() - t_start
    save_on_main({**snapshot(finished=True), "step_seconds": step_seconds}, last_path)
    if is_main_process():
        atomic_write_json(metrics_path, metrics)
    log.info("%s r%g: best epoch %d, val Dice %.4f, test Dice %.4f mIoU %.4f -> %s", cfg.method, cfg.ratio,
             best_epoch, metrics["val_dice"], test_scores["dice"], test_scores["miou"], metrics_path)
    return metrics


# ---------------------------------------------------------------------------- figures
@torch.no_grad()
def pseudo_label_examples(cfg: Config, n: int = 4, *, checkpoint: str = "best.pt") -> dict[str, Any]:
    """Fig. 4-style material for ``n`` unlabelled training images of a finished run.

    Returns ``{"names", "image", "gt", "teacher", "text", "merged", "prediction"}``
    with ``(n, H, W)`` probability maps (``image`` is ``(n, H, W, 3)``): the
    teacher pseudo label, the text-guided mask, the merged label of Eq. 15 and
    the student's prediction, from the run's ``checkpoint``; ``text`` and
    ``merged`` are None for ``mt``/``supervised`` runs, ``teacher`` for
    ``supervised``. The hidden masks are shown for comparison only.
    """
    out = ssmis_dir(cfg)
    student, run_cfg, ckpt = load_student(out / checkpoint, resolve_device(cfg.device))
    device = next(student.parameters()).device
    split = json.loads((out / "split.json").read_text())
    data = prepare_data(run_cfg.replace(data_root=cfg.data_root) if cfg.data_root else run_cfg)
    pos = {name: i for i, name in enumerate(data.train.names)}
    names = split["unlabelled"][:n] if split["unlabelled"] else split["labelled"][:n]
    items = [data.train[pos[name]] for name in names]
    x = torch.stack([it["image"] for it in items]).to(device)  # (n, 3, H, W)
    result: dict[str, Any] = {
        "names": names, "image": x.permute(0, 2, 3, 1).cpu().numpy(),
        "gt": torch.stack([it["mask"] for it in items])[:, 0].numpy(),
        "prediction": torch.sigmoid(segment(student, x, [it["text"] for it in items]))[:, 0].cpu().numpy(),
        "teacher": None, "text": None, "merged": None,
    }
    if ckpt.get("teacher"):
        teacher = build_unet(run_cfg).to(device).train()  # batch statistics, as in training
        teacher.load_state_dict(ckpt["teacher"])
        z_t = teacher(x)  # (n, 1, H, W)
        result["teacher"] = torch.sigmoid(z_t)[:, 0].cpu().numpy()
        if get_method(run_cfg.method).uses_text:
            guidance = _load_guidance(run_cfg.replace(vlm_checkpoint=cfg.vlm_checkpoint) if cfg.vlm_checkpoint
                                      else run_cfg, device)
            z_x = guidance.logits(x, [it["text"] for it in items])  # (n, 1, H, W)
            result["text"] = torch.sigmoid(z_x)[:, 0].cpu().numpy()
            result["merged"] = torch.sigmoid(z_t + z_x)[:, 0].cpu().numpy()
    result["texts"] = [it["text"] for it in items]
    return result


def plot_training_curves(histories: dict[str, "Any"]):
    """Loss (left) and validation Dice (right) per epoch for each run in ``{label: history DataFrame}``."""
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_d) = plt.subplots(1, 2, figsize=(9, 3.2))
    for label, h in histories.items():
        ax_l.plot(h["epoch"], h["loss_sup"], label=f"{label}: L_sup")
        if h["loss_semi"].abs().sum() > 0:
            ax_l.plot(h["epoch"], h["loss_semi"], "--", label=f"{label}: L_semi")
        ax_d.plot(h["epoch"], h["val_dice"], marker="o", ms=3, label=label)
    ax_l.set(xlabel="epoch", ylabel="loss", title="training losses (Eqs. 14, 17)")
    ax_d.set(xlabel="epoch", ylabel="Dice", title="validation Dice (student)")
    ax_l.legend(fontsize=7)
    ax_d.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_diagnostics(history) -> "Any":
    """Dice of teacher pseudo label, text-guided mask and merged label vs the hidden masks, per epoch."""
    import matplotlib.pyplot as plt

    fig, (ax, ax_f) = plt.subplots(1, 2, figsize=(9, 3.2))
    for key, label in (("diag_teacher_dice", "teacher pseudo label"), ("diag_text_dice", "text-guided mask"),
                       ("diag_merged_dice", "merged label (Eq. 15)")):
        if history[key].notna().any():
            ax.plot(history["epoch"], history[key], marker="o", ms=3, label=label)
    ax.set(xlabel="epoch", ylabel="Dice vs hidden mask", title="pseudo-label quality on unlabelled images")
    ax.legend(fontsize=7)
    if history["diag_flat_agree"].notna().any():
        ax_f.plot(history["epoch"], history["diag_flat_agree"], marker="o", ms=3, label="merged = teacher label")
        ax_f.plot(history["epoch"], history["diag_flat_frac"], marker="s", ms=3, label="share of flat pixels")
        ax_f.set_ylim(0, 1.02)
        ax_f.legend(fontsize=7)
    ax_f.set(xlabel="epoch", title=f"where the text map is flat (|z_text| < {FLAT_TEXT_LOGIT})")
    fig.tight_layout()
    return fig


def plot_pseudo_label_grid(examples: dict[str, Any]):
    """Fig. 4-style grid: image, ground truth, teacher label, text-guided mask, merged label, prediction."""
    import matplotlib.pyplot as plt

    cols = [("image", "image"), ("gt", "ground truth (hidden)"), ("teacher", "teacher pseudo label"),
            ("text", "text-guided mask"), ("merged", "merged label"), ("prediction", "student prediction")]
    cols = [(k, t) for k, t in cols if examples.get(k) is not None]
    n = len(examples["names"])
    fig, axes = plt.subplots(n, len(cols), figsize=(1.6 * len(cols), 1.6 * n), squeeze=False)
    for r in range(n):
        for c, (key, title) in enumerate(cols):
            ax = axes[r, c]
            img = examples[key][r]
            ax.imshow(img, vmin=0, vmax=1, cmap=None if key == "image" else "magma")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=7)
        axes[r, 0].set_ylabel(examples["names"][r], fontsize=6)
    fig.tight_layout()
    return fig
