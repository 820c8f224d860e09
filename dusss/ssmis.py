"""Step 2 of DuSSS: text-guided Mean-Teacher segmentation (and its ``mt`` / ``supervised`` baselines).

One training loop serves the three methods (``cfg.method``):

- ``dusss``: a student U-Net learns from the labelled images with ``L_sup``
  (Eq. 14) and from the unlabelled images with ``L_semi`` (Eqs. 15-17), whose
  targets are the merged pseudo label ``sigmoid(z_teacher + z_text)`` and the
  text-guided mask ``sigmoid(z_text)`` drawn by the frozen Step-1 VLM from each
  image's **own** report (Eq. 10). The teacher starts as a copy of the student
  and follows it by EMA (Eq. 12); its predictions are the pseudo labels (Eq. 13).
- ``mt``: the same loop without text: ``L_semi = CE(student, sigmoid(z_teacher))``.
- ``supervised``: labelled images only (the same number of steps per epoch).

Labelled and unlabelled images come as two shuffled streams; an epoch is at
least one pass over the longer stream, so **every** unlabelled image is used
every epoch (the authors' loader only ever used the first ``N_labelled`` of
them); ``steps_per_epoch`` can ask for more steps so that runs at different
label ratios get the same step budget, and ``supervised`` takes the same number
of steps as the semi-supervised methods at its ratio. Because
the VLM is frozen, each unlabelled image's text-guided logits are computed once,
from the un-augmented image and its report, and the image's geometric
augmentation is applied to the cached map (``text_cache=True``; the on-the-fly
path, VLM on the augmented image and its rewritten report, is kept behind the
switch for the speed benchmark). The teacher always runs with batch statistics
(train-mode BatchNorm, no gradient), as in Tarvainen & Valpola's Mean Teacher
and SSL4MIS: the EMA of the student's running statistics does not describe the
activations of the EMA weights (measured on qata-synth after 6 demo epochs:
teacher Dice 0.02 in eval mode against 0.78 with batch statistics), so an
eval-mode teacher hands out all-background pseudo labels.

Every epoch the student is validated (Dice, mIoU; :mod:`dusss.metrics`) and the
pseudo labels are diagnosed on unlabelled images against the masks training
never sees: Dice of the teacher label, of the text-guided mask and of the merged
label, and, where the text map is flat (``|z_text| < FLAT_TEXT_LOGIT``), how
often the merged label equals the teacher's (the merge adds logits, so a flat
text map leaves the teacher's label unchanged). The best validation Dice picks
``best.pt``, early stopping ends the run after ``patience`` epochs without a
gain, and the test split is scored with the best checkpoint.
"""
from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import Config
from .baselines import make_baseline
from .distributed import (DistInfo, ddp_wrap, init_distributed, is_main_process, make_sampler, quiet_non_main,
                          save_on_main, set_sampler_epoch, sync_buffers)
from .losses import SupervisedSegLoss, TextGuidedSemiLoss, ema_update, sigmoid_rampup
from .metrics import binarize, dice_of_masks
from .paths import default_vlm_checkpoint, ssmis_dir
from .unet import build_unet, count_parameters
from .utils import atomic_write_json, autocast, get_logger, load_checkpoint, resolve_device, seed_everything

__all__ = [
    "FLAT_TEXT_LOGIT", "SsmisData", "prepare_data", "TextGuidance", "train_ssmis", "load_student",
    "pseudo_label_examples", "plot_training_curves", "plot_diagnostics", "plot_pseudo_label_grid", "run",
]

log = get_logger(__name__)

FLAT_TEXT_LOGIT = 0.5  # |z_text| below this = "the text map says nothing here" (sigmoid within 0.38..0.62)

# Keys that may differ when a run is resumed from its last.pt (they change how, not what, is computed).
_RESUME_FREE_KEYS = {"epochs", "patience", "resume", "device", "amp", "num_threads", "num_workers", "out_dir",
                     "data_root", "vlm_checkpoint"}


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
    from .data import LViTDataset, ensure_dataset, split_for, text_mode_for

    root = Path(ensure_dataset(cfg))
    mode = text_mode_for(cfg.dataset)
    train = LViTDataset(root, "train", cfg.image_size, text_mode=mode)
    val = LViTDataset(root, "val", cfg.image_size, text_mode=mode)
    test = LViTDataset(root, "test", cfg.image_size, text_mode=mode)
    labelled, unlabelled = split_for(cfg, train.names)
    if not labelled:
        raise ValueError(f"ratio={cfg.ratio} leaves no labelled image among {len(train)}; raise config key ratio")
    if cfg.method != "supervised" and not unlabelled:
        raise ValueError(f"ratio={cfg.ratio} leaves no unlabelled image; use method=supervised or a ratio below 1")
    return SsmisData(root, train, val, test, list(labelled), list(unlabelled), mode)


def _make_augment(cfg: Config, seed: int):
    """The data set's training augmentation (:func:`dusss.data.default_augment`) drawing from its own seeded generator.

    A private generator per stream makes the draws independent of everything
    else that uses torch's RNG, and its state goes into ``last.pt`` so a
    resumed run draws what the uninterrupted one would have.
    """
    from .data import JointAugment, default_augment

    aug = default_augment(cfg) or JointAugment("none")
    aug.generator = torch.Generator().manual_seed(seed)
    return aug


class _AugmentedView(Dataset):
    """Items of ``base`` (un-augmented) at ``positions``, augmented jointly with an optional cached map.

    Returns the dataset's dict with ``image``, ``mask`` (hidden for unlabelled
    images; never used by the loss), ``text`` (rewritten for the transform) and,
    when ``maps`` is given, ``text_logits``: the cached text-guided logits of
    that image under the **same** geometric transform (bilinear, zero fill,
    so a rotated-in corner is a flat, uninformative logit 0).
    """

    def __init__(self, base: Dataset, positions: list[int], augment, text_mode: str,
                 maps: torch.Tensor | None = None) -> None:
        self.base, self.positions, self.augment, self.text_mode, self.maps = base, positions, augment, text_mode, maps

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> dict:
        from .data import apply_params

        item = dict(self.base[self.positions[i]])
        params = self.augment.sample()
        item["image"], item["mask"], _ = self.augment(item["image"], item["mask"], params)
        item["text"] = self.augment.transform_text(item["text"], params, self.text_mode)
        item["hflip"], item["angle"] = bool(params.get("hflip", False)), float(params.get("angle", 0.0))
        if self.maps is not None:
            item["text_logits"] = apply_params(self.maps[i].float(), params)  # (1, H, W)
        return item


def _loader(ds: Dataset, batch_size: int, cfg: Config, *, shuffle: bool, generator: torch.Generator | None = None,
            sampler: Sampler | None = None) -> DataLoader:
    # a sampler (torchrun: this rank's shard) replaces shuffle and generator
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      generator=generator if sampler is None else None, num_workers=cfg.num_workers, drop_last=False)


def _cycle(loader: DataLoader, first_pass: int = 0) -> Iterator[dict]:
    passes = first_pass
    while True:
        set_sampler_epoch(loader.sampler, passes)  # torchrun: a new shard order every pass (no-op otherwise)
        passes += 1
        yield from loader


# ---------------------------------------------------------------------------- text guidance
class TextGuidance:
    """The frozen VLM's text-guided logits ``z_text`` (Eq. 10) for unlabelled images, cached or on the fly.

    ``vlm`` is a model from :func:`dusss.vlm.load_vlm`. :meth:`logits` runs it on
    ``(B, 3, H, W)`` images with one report each; when the VLM was pre-trained at
    another image size the images are resized to it and the logits back.
    :meth:`cache` computes the logits of a list of dataset items once, without
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
    def cache(self, dataset: Dataset, positions: list[int], *, progress: bool = False) -> torch.Tensor:
        """Un-augmented ``z_text`` of ``dataset[p]`` for ``p`` in ``positions``: float16 ``(N, 1, H, W)`` on the CPU."""
        from tqdm.auto import tqdm

        out = []
        for start in tqdm(range(0, len(positions), self.batch_size), desc="text-guided masks", disable=not progress,
                          leave=False):
            items = [dataset[p] for p in positions[start:start + self.batch_size]]
            images = torch.stack([it["image"] for it in items])  # (b, 3, H, W)
            out.append(self.logits(images, [it["text"] for it in items]).cpu().half())
        return torch.cat(out) if out else torch.zeros(0, 1, 1, 1, dtype=torch.half)


def _load_guidance(cfg: Config, device: torch.device) -> TextGuidance:
    from .vlm import load_vlm

    path = default_vlm_checkpoint(cfg)
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"method=dusss needs the Step-1 VLM checkpoint {path}, which does not exist; pre-train it with "
            f"`python -m dusss pretrain --profile {cfg.profile}` (or notebook 02), or pass --vlm PATH")
    vlm = load_vlm(path, device)
    if vlm.cfg.dataset != cfg.dataset:
        log.warning("the VLM %s was pre-trained on %s, not %s", path, vlm.cfg.dataset, cfg.dataset)
    # A VLM whose grounding saw the masks of a larger labelled share (or another data seed's split) has seen
    # masks of images that are unlabelled here: its text-guided masks would leak ground truth.
    vlm_seed, seed = vlm.cfg.resolved_data_seed(), cfg.resolved_data_seed()
    leaks = getattr(vlm.cfg, "ground_sup", False) and (vlm.cfg.ratio > cfg.ratio or vlm_seed != seed)
    if leaks:
        raise ValueError(f"the VLM {path} was pre-trained with mask supervision on the ratio={vlm.cfg.ratio:g}, "
                         f"data seed {vlm_seed} labelled split, which includes images that are unlabelled at "
                         f"ratio={cfg.ratio:g}, data seed {seed}; pre-train it at this ratio and data seed (or "
                         "smaller ratio) or with ground_sup=false")
    return TextGuidance(vlm, device, batch_size=max(cfg.labeled_bs + cfg.unlabeled_bs, 8))


# ---------------------------------------------------------------------------- evaluation pieces
@torch.no_grad()
def _pseudo_label_diagnostics(teacher: nn.Module, dataset: Dataset, positions: list[int],
                              text_maps: torch.Tensor | None, cfg: Config, device: torch.device) -> dict[str, float]:
    """Dice of the teacher label, the text-guided mask and the merged label vs the hidden masks; flat-text agreement."""
    teacher.train()  # batch statistics: see the module docstring
    sums = {"teacher": 0.0, "text": 0.0, "merged": 0.0}
    flat_pixels, flat_agree, flat_shift = 0, 0, 0.0
    bs = cfg.labeled_bs + cfg.unlabeled_bs
    for start in range(0, len(positions), bs):
        items = [dataset[p] for p in positions[start:start + bs]]
        x = torch.stack([it["image"] for it in items]).to(device)  # (b, 3, H, W)
        y = torch.stack([it["mask"] for it in items]).to(device) > 0.5  # (b, 1, H, W)
        z_t = teacher(x)  # (b, 1, H, W)
        sums["teacher"] += dice_of_masks(binarize(z_t, cfg.threshold), y)[0].sum().item()
        if text_maps is not None:
            z_x = text_maps[start:start + bs].to(device).float()  # (b, 1, H, W)
            z_m = z_t + z_x  # Eq. 15 before the sigmoid
            sums["text"] += dice_of_masks(binarize(z_x, cfg.threshold), y)[0].sum().item()
            sums["merged"] += dice_of_masks(binarize(z_m, cfg.threshold), y)[0].sum().item()
            flat = z_x.abs() < FLAT_TEXT_LOGIT
            flat_pixels += int(flat.sum())
            flat_agree += int((binarize(z_m, cfg.threshold) == binarize(z_t, cfg.threshold))[flat].sum())
            flat_shift += float((torch.sigmoid(z_m) - torch.sigmoid(z_t)).abs()[flat].sum())
    n = max(len(positions), 1)
    nan = float("nan")
    has_text = text_maps is not None
    return {
        "diag_teacher_dice": sums["teacher"] / n,
        "diag_text_dice": sums["text"] / n if has_text else nan,
        "diag_merged_dice": sums["merged"] / n if has_text else nan,
        "diag_flat_frac": flat_pixels / (n * x.shape[-1] * x.shape[-2]) if has_text and positions else nan,
        "diag_flat_agree": flat_agree / flat_pixels if has_text and flat_pixels else nan,
        "diag_flat_shift": flat_shift / flat_pixels if has_text and flat_pixels else nan,
    }


# ---------------------------------------------------------------------------- checkpoints
def _vlm_digest(cfg: Config) -> str:
    """Short SHA-256 of the VLM file a ``dusss`` run uses ("" otherwise), so a re-trained VLM is never reused silently."""
    path = Path(default_vlm_checkpoint(cfg))
    if cfg.method != "dusss" or not path.is_file():
        return ""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _step1_keys() -> set[str]:
    """The Config fields of the Step-1 block: they shape the VLM, which a run identifies by its file digest instead."""
    import inspect
    import re

    block = inspect.getsource(Config).split("---- step 1")[1].split("---- step 2")[0]
    return set(re.findall(r"^\s+(\w+):", block, flags=re.M))


def _check_resumable(saved: dict, cfg: Config, path: Path) -> None:
    from .config import config_differences

    now = cfg.to_dict()
    diff = config_differences(saved, cfg, set(now) - _RESUME_FREE_KEYS - _step1_keys())
    if diff:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diff[:4])
        raise ValueError(f"{path} belongs to a run with other settings ({details}); choose another out_dir "
                         f"(--out) or set resume=false to start afresh there")


def load_student(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Config, dict]:
    """Rebuild the student U-Net saved in ``best.pt`` / ``last.pt``: ``(model in eval mode, its Config, checkpoint)``."""
    ckpt = load_checkpoint(path, map_location="cpu")
    if not isinstance(ckpt, dict) or "student" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path} is not an ssmis checkpoint (no 'student'/'config'); use the best.pt or last.pt "
                         "that `python -m dusss ssmis` writes")
    cfg = _config_from_dict(ckpt["config"])
    model = build_unet(cfg)
    model.load_state_dict(ckpt["student"])
    return model.to(device).eval(), cfg, ckpt


def _config_from_dict(data: dict) -> Config:
    from .config import make_config

    data = dict(data)
    profile = data.pop("profile", "demo")
    return make_config(profile, data)


# ---------------------------------------------------------------------------- training
_DDP_METHODS = ("dusss", "mt", "supervised")  # methods whose step runs under torchrun / DDP


def train_ssmis(cfg: Config, *, progress: bool = True) -> dict[str, Any]:
    """Train ``cfg.method`` at ``cfg.ratio`` labels and score it; returns the ``metrics.json`` dict.

    Writes into :func:`dusss.paths.ssmis_dir`: ``config.json``, ``history.csv``
    (per epoch: losses, consistency weight, EMA alpha, validation Dice/mIoU,
    pseudo-label diagnostics, seconds), ``best.pt`` (best validation Dice) and
    ``last.pt`` (every epoch; both written atomically and loadable with
    ``weights_only=True``), ``metrics.json`` and ``test_per_image.csv``. With
    ``cfg.resume`` an interrupted run continues from ``last.pt`` (the same
    numbers as an uninterrupted one on the CPU) and a finished one returns its
    metrics at once; ``resume=false`` starts afresh. Under ``torchrun`` each
    rank draws its own shard of both streams, the student trains inside
    DistributedDataParallel, the EMA teacher and the BatchNorm statistics are
    kept identical on every rank (:func:`dusss.distributed.sync_buffers`), and
    only rank 0 logs and writes files; every rank validates the same model, so
    all take the same early-stopping decision.
    """
    info = init_distributed(cfg.device)
    if info.distributed and cfg.method not in _DDP_METHODS:
        raise ValueError(f"method={cfg.method!r} does not run under torchrun yet (only {', '.join(_DDP_METHODS)}); "
                         "start it as a single process")
    with quiet_non_main():
        return _train_ssmis(cfg, info, progress=progress and info.is_main)


def _train_ssmis(cfg: Config, info: DistInfo, *, progress: bool) -> dict[str, Any]:
    """The body of :func:`train_ssmis` in this process (``info``: its rank, world size and device)."""
    import pandas as pd
    from tqdm.auto import tqdm

    from .evaluate import evaluate_model

    seed_everything(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = info.device
    out = ssmis_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    last_path, best_path, metrics_path = out / "last.pt", out / "best.pt", out / "metrics.json"

    state = None
    digest = _vlm_digest(cfg)
    if cfg.resume and last_path.is_file():
        state = load_checkpoint(last_path)
        _check_resumable(state["config"], cfg, last_path)
        if state.get("vlm_digest", "") != digest:
            log.warning("the VLM checkpoint changed since %s was written; training afresh", last_path)
            state = None
    if state is not None:
        if state["finished"] and metrics_path.is_file() and (state["stopped_early"] or state["epoch"] >= cfg.epochs):
            import json

            log.info("ssmis run in %s is already finished; returning its metrics (resume=false retrains)", out)
            return json.loads(metrics_path.read_text())
    if is_main_process():
        cfg.save(out / "config.json")
    log.info("ssmis %s at ratio %g on %s (%s), output %s\n%s", cfg.method, cfg.ratio, cfg.dataset, device, out,
             cfg.describe())

    data = prepare_data(cfg)
    pos = {n: i for i, n in enumerate(data.train.names)}
    lab_pos, unl_pos = [pos[n] for n in data.labelled], [pos[n] for n in data.unlabelled]
    if is_main_process():
        atomic_write_json(out / "split.json", {"labelled": data.labelled, "unlabelled": data.unlabelled})
    semi = cfg.method != "supervised"

    # models: the teacher starts as an exact copy of the student (Eq. 12 at step 0)
    student = build_unet(cfg).to(device)
    teacher = copy.deepcopy(student).requires_grad_(False).train() if semi else None  # train(): batch-stat BN
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    model = ddp_wrap(student, info)  # torchrun: gradients averaged over ranks; the student itself otherwise
    sup_loss, semi_loss = SupervisedSegLoss(), TextGuidedSemiLoss()
    baseline = make_baseline(cfg, device)  # bcp / ucmt: their own step (dusss.baselines); None for dusss / mt / supervised

    guidance = _load_guidance(cfg, device) if cfg.method == "dusss" else None
    diag_pos = unl_pos[: cfg.diag_images] if cfg.diag_images > 0 else list(unl_pos)
    t0 = time.time()
    unl_maps = diag_maps = None
    if guidance is not None:
        if cfg.text_cache:
            unl_maps = guidance.cache(data.train, unl_pos, progress=progress)  # (N_u, 1, H, W) float16
            diag_maps = unl_maps[: len(diag_pos)]
        else:
            diag_maps = guidance.cache(data.train, diag_pos, progress=progress)
    cache_seconds = time.time() - t0

    lab_aug, unl_aug = _make_augment(cfg, cfg.seed + 1), _make_augment(cfg, cfg.seed + 2)
    lab_gen, unl_gen = torch.Generator().manual_seed(cfg.seed + 3), torch.Generator().manual_seed(cfg.seed + 4)
    lab_view = _AugmentedView(data.train, lab_pos, lab_aug, data.text_mode)
    unl_view = _AugmentedView(data.train, unl_pos, unl_aug, data.text_mode, unl_maps)
    # torchrun: each rank reads its own shard of both streams (None: one process shuffles with the generators)
    lab_sampler = make_sampler(lab_view, info, shuffle=True, seed=cfg.seed + 3) if info.distributed else None
    unl_sampler = make_sampler(unl_view, info, shuffle=True, seed=cfg.seed + 4) if info.distributed else None
    lab_loader = _loader(lab_view, cfg.labeled_bs, cfg, shuffle=True, generator=lab_gen, sampler=lab_sampler)
    unl_loader = _loader(unl_view, cfg.unlabeled_bs, cfg, shuffle=True, generator=unl_gen,
                         sampler=unl_sampler) if semi else None
    n_lab, n_unl = (len(lab_sampler), len(unl_sampler)) if info.distributed else (len(lab_pos), len(unl_pos))
    # one pass over the longer stream, or more (cfg.steps_per_epoch) so every ratio gets the same step budget
    # (under torchrun a step takes world_size batches, so the image budget stays the same)
    steps = max(math.ceil(n_lab / cfg.labeled_bs), math.ceil(n_unl / cfg.unlabeled_bs),
                math.ceil(cfg.steps_per_epoch / info.world_size))
    eval_bs = cfg.labeled_bs + cfg.unlabeled_bs

    history: list[dict] = []
    epoch, global_step, best_dice, best_epoch, bad_epochs, stopped_early = 0, 0, -1.0, 0, 0, False
    if state is not None:
        student.load_state_dict(state["student"])
        if semi:
            teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        if baseline is not None:
            baseline.load_state_dict(state.get("baseline", {}))
        for gen, key in ((lab_gen, "lab_gen"), (unl_gen, "unl_gen"), (lab_aug.generator, "lab_aug"),
                         (unl_aug.generator, "unl_aug")):
            gen.set_state(state["rng"][key])
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
            "teacher": teacher.state_dict() if semi else {}, "optimizer": optimizer.state_dict(),
            "epoch": epoch, "global_step": global_step, "best_dice": best_dice, "best_epoch": best_epoch,
            "bad_epochs": bad_epochs, "stopped_early": stopped_early, "finished": finished, "history": history,
            "vlm_digest": digest, "baseline": baseline.state_dict() if baseline is not None else {},
            "rng": {"torch": torch.get_rng_state(), "lab_gen": lab_gen.get_state(), "unl_gen": unl_gen.get_state(),
                    "lab_aug": lab_aug.generator.get_state(), "unl_aug": unl_aug.generator.get_state()},
        }

    bar = tqdm(total=cfg.epochs, initial=epoch, desc=f"ssmis {cfg.method} r{cfg.ratio:g}", disable=not progress)
    while epoch < cfg.epochs and not stopped_early:
        t_epoch = time.time()
        student.train()
        sums = {"loss": 0.0, "sup": 0.0, "semi": 0.0, "merged": 0.0, "text": 0.0}
        lab_iter = _cycle(lab_loader, epoch * (steps + 1))
        unl_iter = _cycle(unl_loader, epoch * (steps + 1)) if semi else None
        weight = alpha = 0.0
        for step in range(steps):
            lb = next(lab_iter)
            x_l, y_l = lb["image"].to(device), lb["mask"].to(device)  # (Bl, 3, H, W), (Bl, 1, H, W)
            with autocast(cfg.amp, device):  # bf16 forward passes where cfg.amp enables it (default: CUDA only)
                if baseline is not None:
                    x_u = next(unl_iter)["image"].to(device)  # (Bu, 3, H, W)
                    loss, l_sup, terms, weight = baseline(student, teacher, x_l, y_l, x_u, epoch, step, steps)
                elif semi:
                    ub = next(unl_iter)
                    x_u = ub["image"].to(device)  # (Bu, 3, H, W)
                    z = model(torch.cat([x_l, x_u])).float()  # (Bl + Bu, 1, H, W): one BatchNorm batch, as in MT
                    z_l, z_u = z[: len(x_l)], z[len(x_l):]  # logits in float32, so the losses are too
                    with torch.no_grad():
                        z_teacher = teacher(x_u).float()  # (Bu, 1, H, W) Eq. 13 pseudo-label logits
                        z_text = None
                        if guidance is not None:
                            z_text = (ub["text_logits"].to(device) if cfg.text_cache
                                      else guidance.logits(x_u, list(ub["text"])))  # (Bu, 1, H, W)
                    terms = semi_loss(z_u, z_teacher, z_text, return_dict=True)
                    l_sup = sup_loss(z_l, y_l)
                    weight = cfg.cons_weight * sigmoid_rampup(epoch + step / steps, cfg.rampup_epochs)
                    loss = l_sup + weight * terms["semi"]
                else:
                    l_sup = sup_loss(model(x_l).float(), y_l)
                    terms, loss = {}, l_sup
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if semi:
                alpha = ema_update(teacher, student, cfg.ema_alpha, global_step)
                sync_buffers(teacher)  # torchrun: the teacher's BatchNorm statistics equal on every rank
            global_step += 1
            sums["loss"] += loss.item()
            sums["sup"] += l_sup.item()
            for key in ("semi", "merged", "text"):
                sums[key] += terms[key].item() if key in terms else 0.0
        epoch += 1

        sync_buffers(student)  # torchrun: every rank validates the same model, so all stop together
        val, _ = evaluate_model(student, data.val, device=device, threshold=cfg.threshold, batch_size=eval_bs)
        diag = (_pseudo_label_diagnostics(teacher, data.train, diag_pos, diag_maps, cfg, device) if semi
                else {k: float("nan") for k in ("diag_teacher_dice", "diag_text_dice", "diag_merged_dice",
                                                "diag_flat_frac", "diag_flat_agree", "diag_flat_shift")})
        row = {"epoch": epoch, "steps": global_step, **{f"loss_{k}" if k != "loss" else k: v / steps
                                                        for k, v in sums.items()},
               "cons_weight": weight, "ema_alpha": alpha, "val_dice": val["dice"], "val_miou": val["miou"], **diag,
               "seconds": time.time() - t_epoch}
        history.append(row)
        if val["dice"] > best_dice:
            best_dice, best_epoch, bad_epochs = val["dice"], epoch, 0
            save_on_main({"config": cfg.to_dict(), "student": student.state_dict(),
                          "teacher": teacher.state_dict() if semi else {}, "epoch": epoch,
                          "val_dice": val["dice"], "val_miou": val["miou"]}, best_path)
        else:
            bad_epochs += 1
            stopped_early = bad_epochs >= cfg.patience
        save_on_main(snapshot(finished=False), last_path)
        if is_main_process():
            pd.DataFrame(history).to_csv(out / "history.csv", index=False)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", val_dice=f"{val['dice']:.3f}", best=f"{best_dice:.3f}")
        log.info("epoch %d: loss %.4f (sup %.4f semi %.4f) val Dice %.4f mIoU %.4f | pseudo labels: teacher %.3f "
                 "text %.3f merged %.3f", epoch, row["loss"], row["loss_sup"], row["loss_semi"], val["dice"],
                 val["miou"], diag["diag_teacher_dice"], diag["diag_text_dice"], diag["diag_merged_dice"])
    bar.close()
    if stopped_early:
        log.info("early stopping after epoch %d: no validation gain for %d epochs", epoch, cfg.patience)

    best_model, _, best_ckpt = load_student(best_path, device)
    test, per_image = evaluate_model(best_model, data.test, device=device, threshold=cfg.threshold, batch_size=eval_bs)
    if is_main_process():
        per_image.to_csv(out / "test_per_image.csv", index=False)
    best_row = next(r for r in history if r["epoch"] == best_epoch)
    metrics = {
        "method": cfg.method, "ratio": cfg.ratio, "dataset": cfg.dataset, "profile": cfg.profile, "seed": cfg.seed,
        "n_labelled": len(lab_pos), "n_unlabelled": len(unl_pos), "n_val": len(data.val), "n_test": test["n"],
        "unet_params": count_parameters(student), "epochs_run": epoch, "stopped_early": stopped_early,
        "best_epoch": best_epoch, "val_dice": best_ckpt["val_dice"], "val_miou": best_ckpt["val_miou"],
        "test_dice": test["dice"], "test_miou": test["miou"], "test_dice_std": test["dice_std"],
        "diag_best": {k: best_row[k] for k in best_row if k.startswith("diag_")},
        "diag_last": {k: history[-1][k] for k in history[-1] if k.startswith("diag_")},
        "train_seconds": float(sum(r["seconds"] for r in history)), "text_cache_seconds": cache_seconds,
        "text_cache": cfg.text_cache, "vlm_digest": digest, "steps_per_epoch": steps, "out_dir": str(out),
    }
    save_on_main(snapshot(finished=True), last_path)
    if is_main_process():
        atomic_write_json(metrics_path, metrics)
    log.info("%s r%g: best epoch %d, val Dice %.4f, test Dice %.4f mIoU %.4f -> %s", cfg.method, cfg.ratio,
             best_epoch, metrics["val_dice"], test["dice"], test["miou"], metrics_path)
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
    import json

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
        "prediction": torch.sigmoid(student(x))[:, 0].cpu().numpy(), "teacher": None, "text": None, "merged": None,
    }
    if ckpt.get("teacher"):
        teacher = build_unet(run_cfg).to(device).train()  # batch statistics, as in training
        teacher.load_state_dict(ckpt["teacher"])
        z_t = teacher(x)  # (n, 1, H, W)
        result["teacher"] = torch.sigmoid(z_t)[:, 0].cpu().numpy()
        if run_cfg.method == "dusss":
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


# ---------------------------------------------------------------------------- command line
def run(args, cfg: Config) -> int:
    """``python -m dusss ssmis``: train and score one method at one label ratio; print the metrics."""
    metrics = train_ssmis(cfg, progress=True)
    print(f"{metrics['method']} ratio {metrics['ratio']:g}: test Dice {metrics['test_dice']:.4f} "
          f"mIoU {metrics['test_miou']:.4f} (best epoch {metrics['best_epoch']}, val Dice {metrics['val_dice']:.4f})"
          f" -> {metrics['out_dir']}")
    return 0
