"""Step 1: pre-train the DuSSS VLM (``python -m dusss pretrain``), with retrieval and grounding metrics.

:func:`pretrain` trains :class:`dusss.vlm.DuSSSVLM` with the switchable terms
of Step 1 -- CMC and IMC (Eqs. 8-9, together DCL), SSS inside them (Eq. 5),
the text-guided loss ``L_tg`` (Eq. 11) -- plus one documented extension,
``ground_sup``: the text-guided mask (Eq. 10) is also fitted to the ground
truth of the *labelled* training images only (exactly
``dusss.data.split_labelled(train_names, cfg.ratio, cfg.resolved_data_seed())[0]``, the images
Step 2 treats as labelled), so Step 2's unlabelled images stay unlabelled.
``step1_objective="mgca"`` replaces SSS/CMC/IMC by MGCA's instance-, token- and
prototype-level alignment (:class:`dusss.losses.MGCALoss`, Table 1's MGCA row);
``L_tg`` and ``ground_sup`` keep training the grounding decoder Step 2 reads.
``"cmitm"`` (:class:`dusss.losses.CMITMLoss`, contrastive + cross-modal masked image and
language modelling) and ``"asg"`` (:class:`dusss.losses.ASGLoss`, instance + anatomical
region-phrase + image-tag terms, anatomy from :mod:`dusss.anatomy`) do the same for
Table 1's CMITM and ASG rows.

Second views for IMC: the image gets a photometric jitter (brightness,
contrast, gamma, noise: no geometry, so the report stays true and the mask
stays aligned) and the report a paraphrase from :func:`dusss.data.paraphrase`.

Every epoch is scored on the validation split (:func:`evaluate_vlm`):
image->text and text->image R@1/R@5 where an identical report counts as a
hit (next to the chance level), and the Dice and pointing game of the
thresholded text-guided mask next to two references that need no image:
the mean training mask, and the mean training mask of the images whose report
names the same lung zones.
"""
from __future__ import annotations

import csv
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .config import Config, ConfigError, resume_differences
from .data import default_augment, open_split, paraphrase, parse_qata, split_for
from .data.prepare import ensure_dataset, resolve_dataset
from .losses import ASGLoss, CMITMLoss, DualContrastiveLoss, MGCALoss, SupervisedSegLoss, TextGuidedLoss, mask_pool
from .metrics import dice_iou_per_image, dice_of_masks
from .runs import pretrain_dir
from .utils import (atomic_torch_save, atomic_write_json, atomic_write_text, autocast, get_logger, load_checkpoint,
                    seed_everything, to_float32)
from .distributed import (DistInfo, all_gather_objects, ddp_wrap, init_distributed, is_main_process, make_sampler,
                          quiet_non_main, save_on_main, set_sampler_epoch, sync_buffers)
from .vlm import DuSSSVLM, VLMOutput

__all__ = ["pretrain", "evaluate_vlm", "MaskReferences", "photometric_view", "same_text_mask",
           "zones_named", "retrieval_metrics", "pointing_game"]

log = get_logger(__name__)

# keys that may differ between an interrupted run and the call that resumes it
N_PARAPHRASES = 4  # second-view reports drawn per distinct training report


# ---------------------------------------------------------------- helpers
def same_text_mask(texts: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """``(B, B)`` bool matrix, True where reports ``i`` and ``j`` are the same string (diagonal included)."""
    ids = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    code = torch.tensor([ids[t] for t in texts], device=device)  # (B,)
    return code[:, None] == code[None, :]  # (B, B)


def photometric_view(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A second view of ``(B, 3, H, W)`` images in [0, 1] by per-image brightness, contrast, gamma and noise.

    No geometric change, so the report stays true and the ground-truth mask
    stays aligned (a flip would swap "left" and "right").
    """
    b = images.shape[0]

    def draw(lo: float, hi: float) -> torch.Tensor:
        u = torch.rand(b, 1, 1, 1, generator=generator).to(images.device)
        return lo + (hi - lo) * u  # (B, 1, 1, 1)

    mean = images.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    x = (images - mean) * draw(0.75, 1.25) + mean + draw(-0.08, 0.08)
    x = x.clamp(0.0, 1.0) ** draw(0.8, 1.25)
    noise = torch.randn(images.shape, generator=generator).to(images.device)
    return (x + 0.02 * noise).clamp(0.0, 1.0)


def zones_named(text: str) -> tuple[str, ...]:
    """What a report says about *where*: ``(("left", "upper"), ("right", "all"))`` for a QaTa report.

    Reports outside the QaTa grammar (MoNuSeg, BM-Seg, own text) are their own
    key, so the zone reference becomes "the mean mask of training images with
    the same report".
    """
    parsed = parse_qata(text)
    return tuple(sorted(parsed[1].items())) if parsed is not None else (text,)


def retrieval_metrics(img_s: torch.Tensor, txt_s: torch.Tensor, texts: Sequence[str]) -> dict[str, float]:
    """Image->text and text->image R@1/R@5 over one split, an identical report counting as a hit.

    ``img_s``/``txt_s`` are the unit embeddings ``(N, E)`` of image ``i`` and
    its report ``texts[i]``. Also returns ``chance_r1``: the R@1 of a random
    ranking, i.e. the mean share of the split carrying the same report.
    """
    same = same_text_mask(texts, img_s.device)  # (N, N)
    sim = img_s @ txt_s.T  # (N, N)
    out: dict[str, float] = {}
    for k in (1, 5):
        kk = min(k, sim.shape[1])
        top_t = sim.topk(kk, dim=1).indices  # (N, k) texts per image
        top_i = sim.T.topk(kk, dim=1).indices  # (N, k) images per text
        out[f"i2t_r{k}"] = float(same.gather(1, top_t).any(1).float().mean())
        out[f"t2i_r{k}"] = float(same.gather(1, top_i).any(1).float().mean())
    out["chance_r1"] = float(same.float().mean(1).mean())
    return out


def pointing_game(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-image hit (1.0) when the arg-max of ``maps`` ``(B, 1, H, W)`` lies inside the mask; NaN for empty masks."""
    flat_idx = maps.flatten(1).argmax(1, keepdim=True)  # (B, 1)
    target = masks.flatten(1) > 0.5  # (B, HW)
    hit = target.gather(1, flat_idx).squeeze(1).float()  # (B,)
    return torch.where(target.any(1), hit, torch.full_like(hit, float("nan")))


def _best_threshold(prior: torch.Tensor, masks: torch.Tensor) -> float:
    """Threshold of a prior map that maximises the mean Dice on the masks it was built from."""
    best, best_t = -1.0, 0.5
    for t in torch.quantile(prior.flatten().float(), torch.linspace(0.5, 0.995, 40)).tolist():
        dice, _ = dice_of_masks((prior > t).expand_as(masks), masks > 0.5)
        if float(dice.mean()) > best:
            best, best_t = float(dice.mean()), t
    return best_t


class MaskReferences:
    """The two image-free references a text-guided mask has to beat.

    ``mean``: the mean of all training masks, thresholded where it scores best
    on the training masks. ``zones``: for each set of lung zones a report names
    (:func:`zones_named`), the mean training mask of the images whose report
    names the same set (the global mean where a set was never seen), with one
    threshold fitted the same way: the best a mask drawn from the report alone
    can do on average.
    """

    def __init__(self, masks: torch.Tensor, texts: Sequence[str]) -> None:
        masks = masks.float()  # (N, 1, H, W)
        self.mean_map = masks.mean(0, keepdim=True)  # (1, 1, H, W)
        self.mean_t = _best_threshold(self.mean_map, masks)
        groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for i, t in enumerate(texts):
            groups[zones_named(t)].append(i)
        self.zone_maps = {z: masks[idx].mean(0, keepdim=True) for z, idx in groups.items()}
        train_prior = torch.cat([self.zone_map(t) for t in texts])  # (N, 1, H, W)
        self.zone_t = _best_threshold(train_prior, masks)

    def zone_map(self, text: str) -> torch.Tensor:
        """``(1, 1, H, W)`` prior of the report's zone set (the mean map if the set is unseen)."""
        return self.zone_maps.get(zones_named(text), self.mean_map)

    def score(self, masks: torch.Tensor, texts: Sequence[str]) -> dict[str, list[float]]:
        """Per-image Dice and pointing hits of both references on ``masks`` ``(B, 1, H, W)``."""
        mean_map = self.mean_map.to(masks.device).expand_as(masks)
        zone_map = torch.cat([self.zone_map(t) for t in texts]).to(masks.device)
        out = {}
        for name, prior, t in (("ref_mean", mean_map, self.mean_t), ("ref_zones", zone_map, self.zone_t)):
            out[f"{name}_dice"] = dice_of_masks(prior > t, masks > 0.5)[0].tolist()
            out[f"{name}_pointing"] = pointing_game(prior, masks).tolist()
        return out


@torch.no_grad()
def evaluate_vlm(model: DuSSSVLM, loader: DataLoader, refs: MaskReferences, cfg: Config,
                 *, progress: bool = False) -> dict[str, float]:
    """Retrieval and grounding metrics of ``model`` on one split (see the module docstring).

    Returns R@1/R@5 both ways with ``chance_r1``; ``dice``/``pointing`` of the
    text-guided mask (``sigmoid > cfg.threshold`` against the ground truth,
    per image then averaged; pointing over images with a lesion); and the
    same two scores for the references ``ref_mean_*`` and ``ref_zones_*``.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    img_s, txt_s, texts = [], [], []
    scores: dict[str, list[float]] = defaultdict(list)
    for batch in tqdm(loader, desc="evaluate", leave=False, disable=not progress):
        images, masks = batch["image"].to(device), batch["mask"].to(device)
        out = model(images, batch["text"], ground=True)
        img_s.append(out.image.s)
        txt_s.append(out.text.s)
        texts += list(batch["text"])
        scores["dice"] += dice_iou_per_image(out.mask_logits, masks, cfg.threshold)[0].tolist()
        scores["pointing"] += pointing_game(out.mask_logits, masks).tolist()
        for key, values in refs.score(masks, batch["text"]).items():
            scores[key] += values
    model.train(was_training)
    metrics = retrieval_metrics(torch.cat(img_s), torch.cat(txt_s), texts)
    for key, values in scores.items():
        metrics[key] = float(np.nanmean(values))
    return metrics


# ---------------------------------------------------------------- data
def _datasets(cfg: Config):
    """Datasets of ``cfg.dataset`` (generated on first use, decoded once) and the labelled training names.

    Returns ``(train, train_plain, val, test, labelled)``: ``train`` carries
    the data issue's report-safe joint augmentation when ``cfg.augment`` is on
    (a flip rewrites "left"/"right" in the report, so image, mask and text stay
    true together); ``train_plain`` is the same split unaugmented, for the
    references. The labelled names are :func:`dusss.data.split_for` -- the
    split Step 2 uses, i.e. ``split_labelled(train_names, cfg.ratio,
    cfg.resolved_data_seed())[0]`` -- and are empty when ``ground_sup`` is off.
    """
    train = open_split(cfg, "train", augment=default_augment(cfg), preload=True)
    train_plain, val, test = (open_split(cfg, split, preload=True) for split in ("train", "val", "test"))
    labelled = set(split_for(cfg, train.names)[0]) if cfg.ground_sup else set()
    return train, train_plain, val, test, labelled


class _Paraphrases(dict):
    """Report -> its paraphrases (:func:`dusss.data.paraphrase`), filled on first use (augmented reports too)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed

    def __missing__(self, text: str) -> list[str]:
        value = self[text] = list(paraphrase(text, N_PARAPHRASES, self.seed))
        return value


def _all_masks_texts(dataset) -> tuple[torch.Tensor, list[str]]:
    masks, texts = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        masks.append(item["mask"])
        texts.append(item["text"])
    return torch.stack(masks), texts  # (N, 1, H, W)


# ---------------------------------------------------------------- training
class _Objective(nn.Module):
    """The Step-1 loss terms under their switches, holding the learnable temperatures.

    ``cfg.step1_objective`` picks the alignment terms: ``"dusss"`` = DCL with SSS under the ``use_*`` switches,
    ``"mgca"`` = :class:`dusss.losses.MGCALoss`, ``"cmitm"`` = :class:`~dusss.losses.CMITMLoss`, ``"asg"`` =
    :class:`~dusss.losses.ASGLoss` (the config refuses these beside SSS/CMC/IMC); ``L_tg`` and the
    ``ground_sup`` extension follow their switches under any of them.
    """

    def __init__(self, cfg: Config, *, gather: bool = False) -> None:
        super().__init__()
        self.cfg, self.gather = cfg, gather
        # gather: under torchrun the contrastive terms score the global batch (negatives from every rank)
        self.dcl = DualContrastiveLoss.from_config(cfg, gather=gather) if (cfg.use_cmc or cfg.use_imc) else None
        self.mgca = MGCALoss.from_config(cfg, gather=gather) if cfg.step1_objective == "mgca" else None
        self.other = {"cmitm": CMITMLoss, "asg": ASGLoss}.get(cfg.step1_objective)  # the CMITM / ASG loss, if any
        self.other = self.other.from_config(cfg, gather=gather) if self.other is not None else None
        self.tg = TextGuidedLoss(tau_init=cfg.tau_init, gather=gather) if cfg.use_tg else None
        self.sup = SupervisedSegLoss()

    def after_backward(self, model: DuSSSVLM, epoch: int) -> None:
        """MGCA keeps its prototypes fixed for the first ``mgca_freeze_proto_epochs`` epochs (their gradient dropped)."""
        if self.mgca is not None and epoch < self.cfg.mgca_freeze_proto_epochs:
            model.prototypes.weight.grad = None

    def forward(self, model: DuSSSVLM, images: torch.Tensor, texts: list[str], texts2: list[str],
                masks: torch.Tensor, labelled: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Every loss term of one batch and their weighted sum ``loss``."""
        cfg = self.cfg
        ground = cfg.use_tg or (cfg.ground_sup and bool(labelled.any()))
        img2 = txt2 = None
        local = self.mgca is not None or self.other is not None
        if self.mgca is not None:
            model.normalize_prototypes()
        with autocast(cfg.amp, images.device):  # the encoders under bf16 autocast where cfg.amp enables it
            # generator: CMITM's image and word-piece masks, reproducible per epoch like the IMC views
            out = model(images, texts, ground=ground, local=local, generator=generator)
            if self.dcl is not None and cfg.use_imc:
                img2, _ = model.encode_image(photometric_view(images, generator), ground=False)
                txt2, _ = model.encode_text(texts2)
        # the losses (Wasserstein distances, InfoNCE, temperatures) always in float32
        out, img2, txt2 = to_float32((out, img2, txt2))
        with torch.autocast(images.device.type, enabled=False):
            return self._terms(out, img2, txt2, texts, masks, labelled)

    def _terms(self, out: VLMOutput, img2: Any, txt2: Any, texts: list[str], masks: torch.Tensor,
               labelled: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        device = out.image.s.device
        # with gather, the same-report positives are marked over the reports of the global batch
        pos = (same_text_mask(all_gather_objects(texts) if self.gather else texts, device)
               if cfg.same_text_positive else None)
        zero = torch.zeros((), device=device)
        terms = {"cmc": zero, "imc": zero, "imc_image": zero, "imc_text": zero, "tg": zero, "ground_sup": zero}
        loss = zero
        if self.dcl is not None:
            dcl = self.dcl(out.image, out.text, img2, txt2, positive_mask=pos)
            loss = loss + dcl["loss"]
            terms.update({k: dcl[k] for k in ("cmc", "imc", "imc_image", "imc_text")})
            terms["tau"] = dcl["tau"]
        if self.mgca is not None:
            mgca = self.mgca(out.image, out.text, out.local, positive_mask=pos)
            loss = loss + mgca["loss"]
            terms.update({f"mgca_{k}": v for k, v in mgca.items() if k != "loss"})
        if self.other is not None:
            other = self.other(out.image, out.text, out.local, positive_mask=pos)
            loss = loss + other["loss"]
            terms.update({f"{cfg.step1_objective}_{k}": v for k, v in other.items() if k != "loss"})
        if self.tg is not None:
            weights = torch.sigmoid(F.interpolate(out.mask_logits, size=out.pixel.shape[-2:], mode="bilinear",
                                                  align_corners=False))  # (B, 1, h', w')
            terms["tg"] = self.tg(mask_pool(out.pixel, weights), out.text_g, positive_mask=pos)
            loss = loss + cfg.w_tg * terms["tg"]
        if cfg.ground_sup and bool(labelled.any()):
            logits, target = out.mask_logits[labelled], masks[labelled]
            terms["ground_sup"] = self.sup(logits, target) + _soft_dice_loss(logits, target)
            loss = loss + cfg.w_ground_sup * terms["ground_sup"]
        terms["loss"] = loss
        return terms


def _soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - soft Dice`` per image, averaged: balances BCE, which a 5 %-foreground mask pulls to background."""
    p = torch.sigmoid(logits).flatten(1)  # (B, HW)
    y = target.flatten(1).to(p.dtype)  # (B, HW)
    return (1.0 - (2.0 * (p * y).sum(1) + 1.0) / (p.sum(1) + y.sum(1) + 1.0)).mean()


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    lines = [",".join(keys)] + [",".join(_fmt(row.get(k, "")) for k in keys) for row in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _read_history(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with path.open() as fh:
        return [{k: (float(v) if k != "epoch" else int(v)) for k, v in row.items() if v != ""}
                for row in csv.DictReader(fh)]


def _check_resumable(saved: dict[str, Any], cfg: Config, folder: Path) -> None:
    # Step-2 keys never invalidate a Step-1 run; keys added to the config later count as unchanged
    diff = resume_differences(saved, cfg, 1)
    if diff:
        raise ConfigError(f"{folder} holds a pre-training run with other settings ({', '.join(diff)} differ); "
                          "choose another --out folder, or delete that run folder (written by dusss) to start afresh")


class _TrainStep(nn.Module):
    """Model and objective as one module, so that DistributedDataParallel sees every trainable parameter in one forward."""

    def __init__(self, model: DuSSSVLM, objective: _Objective) -> None:
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, *args: Any) -> dict[str, torch.Tensor]:
        """``objective(model, *args)``: every loss term of one batch."""
        return self.objective(self.model, *args)


def pretrain(cfg: Config, *, progress: bool = True) -> dict[str, float]:
    """Pre-train the VLM of ``cfg`` and return its final validation and test metrics (flat dict).

    Writes into :func:`dusss.runs.pretrain_dir` ``(cfg)``: ``vlm.pt`` (model
    weights + config, atomic, every epoch), ``last.pt`` (the same plus the
    optimiser, for resuming), ``history.csv`` (every loss term and validation
    metric per epoch), ``config.json`` and, when the run is complete,
    ``metrics.json``. Calling it again with the same folder returns the
    stored metrics at once if the run completed, and otherwise resumes after
    the last finished epoch (``vlm_epochs`` may be raised to train longer).
    Under ``torchrun`` each rank trains on its shard of every epoch inside
    DistributedDataParallel, the contrastive losses gather the embeddings of
    all ranks, and only rank 0 logs and writes files (:mod:`dusss.distributed`).
    A ``data_root`` holding the user's own data in the LViT layout is read as
    ``dataset="lvit"`` (:func:`dusss.data.prepare.resolve_dataset`).
    """
    info = init_distributed(cfg.device)
    with quiet_non_main():
        return _pretrain(resolve_dataset(cfg), info, progress=progress and info.is_main)


def _pretrain(cfg: Config, info: DistInfo, *, progress: bool) -> dict[str, float]:
    """The body of :func:`pretrain` in this process (``info``: its rank, world size and device)."""
    out = pretrain_dir(cfg)
    metrics_path, last_path = out / "metrics.json", out / "last.pt"
    if metrics_path.is_file() and (out / "config.json").is_file():
        import json

        saved = json.loads((out / "config.json").read_text())
        _check_resumable(saved, cfg, out)
        done = json.loads(metrics_path.read_text())
        if saved.get("vlm_epochs") == cfg.vlm_epochs:
            log.info("pre-training in %s is complete; reading %s", out, metrics_path)
            return done
    ensure_dataset(cfg)  # a data problem stops the run before it writes or prints anything
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = info.device
    log.info("pre-training the DuSSS VLM (%s) into %s on %s\n%s", cfg.profile, out, device, cfg.describe())
    t_start = time.perf_counter()

    train, train_plain, val, test, labelled_names = _datasets(cfg)
    model = DuSSSVLM.from_config(cfg).to(device)
    objective = _Objective(cfg, gather=info.distributed).to(device)
    train_masks, train_texts = _all_masks_texts(train_plain)
    paraphrased = _Paraphrases(cfg.seed)
    refs = MaskReferences(train_masks, train_texts)
    model.text_encoder.precompute([p for t in sorted(set(train_texts)) for p in paraphrased[t]] + train_texts)
    model.text_encoder.precompute(_all_masks_texts(val)[1] + _all_masks_texts(test)[1])

    params = [p for p in list(model.parameters()) + list(objective.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.vlm_lr, weight_decay=cfg.vlm_weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    # torchrun: each rank reads its own shard (equal sizes, so the gathered batches line up)
    sampler = make_sampler(train, info, shuffle=True, seed=cfg.seed) if info.distributed else None
    n_local = len(sampler) if sampler is not None else len(train)
    loader = DataLoader(train, batch_size=cfg.vlm_batch_size, shuffle=sampler is None, sampler=sampler,
                        drop_last=n_local > cfg.vlm_batch_size, num_workers=cfg.num_workers,
                        generator=g if sampler is None else None)
    train_step = ddp_wrap(_TrainStep(model, objective), info, find_unused_parameters=True)
    val_loader = DataLoader(val, batch_size=64, shuffle=False, num_workers=cfg.num_workers)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * cfg.vlm_epochs
    warmup = max(1, int(cfg.vlm_warmup * steps_per_epoch))

    history = _read_history(out / "history.csv")
    start_epoch = 0
    if last_path.is_file():
        state = load_checkpoint(last_path, map_location=device)
        _check_resumable(state["config"], cfg, out)
        model.load_state_dict(state["model"], strict=False)
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
        history = [row for row in history if row["epoch"] <= start_epoch]
        log.info("resuming %s after epoch %d of %d", out, start_epoch, cfg.vlm_epochs)
    if is_main_process():
        cfg.save(out / "config.json")

    for epoch in range(start_epoch, cfg.vlm_epochs):
        # reseeding per epoch makes a resumed run draw the same batches as an uninterrupted one
        seed_everything(cfg.seed + epoch)
        g.manual_seed(cfg.seed + epoch)
        if sampler is not None:
            set_sampler_epoch(sampler, epoch)
        aug_g = torch.Generator().manual_seed(cfg.seed + 10_000 + epoch)
        rng = np.random.default_rng(cfg.seed + epoch)
        model.train()
        sums: dict[str, float] = defaultdict(float)
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.vlm_epochs}", leave=False, disable=not progress)
        for i, batch in enumerate(bar):
            step = epoch * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, total_steps, warmup, cfg.vlm_lr)
            texts = list(batch["text"])
            texts2 = [paraphrased[t][rng.integers(len(paraphrased[t]))] for t in texts]
            labelled = torch.tensor([n in labelled_names for n in batch["name"]], device=device)
            terms = train_step(batch["image"].to(device), texts, texts2, batch["mask"].to(device), labelled, aug_g)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            objective.after_backward(model, epoch)
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            optimizer.step()
            for key, value in terms.items():
                sums[key] += float(value.detach())
            bar.set_postfix(loss=f"{sums['loss'] / (i + 1):.3f}")
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
        row.update({k: v / steps_per_epoch for k, v in sums.items()})
        row.update({f"val_{k}": v for k, v in evaluate_vlm(model, val_loader, refs, cfg).items()})
        history.append(row)
        log.info("epoch %d/%d: loss %.4f, val i2t R@1 %.3f (chance %.3f), val Dice %.3f (refs %.3f / %.3f)",
                 epoch + 1, cfg.vlm_epochs, row["loss"], row["val_i2t_r1"], row["val_chance_r1"],
                 row["val_dice"], row["val_ref_mean_dice"], row["val_ref_zones_dice"])
        weights = {"config": cfg.to_dict(), "model": model.trainable_state_dict()}
        sync_buffers(model)  # torchrun: BatchNorm statistics averaged over ranks (no-op in one process)
        if is_main_process():
            atomic_torch_save(weights, out / "vlm.pt")
            _write_history(out / "history.csv", history)
        save_on_main({**weights, "objective": objective.state_dict(), "optimizer": optimizer.state_dict(),
                      "epoch": epoch + 1}, last_path)

    test_loader = DataLoader(test, batch_size=64, shuffle=False, num_workers=cfg.num_workers)
    metrics: dict[str, float] = {"epochs": cfg.vlm_epochs, "n_labelled_masks": len(labelled_names),
                                 "n_train": len(train), "seconds_this_call": time.perf_counter() - t_start}
    metrics.update({f"val_{k}": v for k, v in evaluate_vlm(model, val_loader, refs, cfg).items()})
    metrics.update({f"test_{k}": v for k, v in evaluate_vlm(model, test_loader, refs, cfg).items()})
    for key in ("loss", "cmc", "imc", "tg", "ground_sup", "mgca_instance", "mgca_token", "mgca_proto", "cmitm_contrast",
                "cmitm_mim", "cmitm_mlm", "asg_instance", "asg_region", "asg_tag", "asg_soft"):
        if history and key in history[0]:
            metrics[f"first_{key}"], metrics[f"last_{key}"] = history[0][key], history[-1][key]
    if is_main_process():
        atomic_write_json(metrics_path, metrics)
    log.info("pre-training done: test Dice %.3f, pointing %.3f (refs mean %.3f / zones %.3f), i2t R@1 %.3f",
             metrics["test_dice"], metrics["test_pointing"], metrics["test_ref_mean_dice"],
             metrics["test_ref_zones_dice"], metrics["test_i2t_r1"])
    return metrics
