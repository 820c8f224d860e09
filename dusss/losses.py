"""Every DuSSS loss (Eqs. 6-17), the EMA update (Eq. 12) and the consistency ramp-up.

Step 1 (VLM pre-training): :class:`SSSInfoNCE` (Eqs. 5-7),
:class:`DualContrastiveLoss` (Eqs. 8-9, CMC + IMC = DCL), :class:`TextGuidedLoss`
(Eq. 11) with :func:`mask_pool`; the alternative Step-1 objective of Table 1's MGCA row,
:class:`MGCALoss` (instance, token and prototype alignment, Wang et al. 2022), and those of its CMITM and ASG
rows, :class:`CMITMLoss` (Chen et al. 2023) and :class:`ASGLoss` (Li et al. 2024). Step 2 (semi-supervised segmentation):
:class:`SupervisedSegLoss` (Eq. 14), :func:`merged_target` and
:class:`TextGuidedSemiLoss` (Eqs. 15-17), :func:`ema_update` (Eq. 12),
:func:`sigmoid_rampup` (not in the paper).

Conventions (docs/deviations.md): the InfoNCE temperature is one
learnable ``log(1/τ)`` per loss, initialised at ``τ = 0.07`` and clamped so
``1/τ <= 100`` (CLIP); the optional ``positive_mask`` marks several positives
per row (e.g. identical reports) and uses the multi-positive InfoNCE
``−mean_{p ∈ P(i)} log softmax(logits_i)_p``; the segmentation "cross-entropy"
with one foreground class is the binary cross-entropy on logits, with soft
(probability) targets for Eqs. 15-16.

Distributed runs (``torchrun``): the contrastive losses take ``gather=True`` to
gather the embeddings of every rank (:func:`dusss.distributed.gather_with_grad`)
before the similarity, so negatives come from the global batch; each rank then
scores the full global matrix (open_clip's ``local_loss=False``), and a
``positive_mask`` must cover the global batch. Without a process group
``gather=True`` changes nothing.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import gather_with_grad
from .sss import uncertain_similarity

__all__ = [
    "Embedding", "info_nce", "SSSInfoNCE", "DualContrastiveLoss", "LearnableTemperature",
    "TextGuidedLoss", "mask_pool", "SupervisedSegLoss", "merged_target", "TextGuidedSemiLoss",
    "ema_update", "sigmoid_rampup", "consistency_loss", "CONSISTENCY_FORMS", "MAX_LOGIT_SCALE", "gather_embedding",
    "MGCAFeatures", "MGCALoss", "sinkhorn_knopp", "cross_attend", "clipped_token_weights", "token_alignment_nce",
    "prototype_alignment", "CMITMFeatures", "CMITMLoss", "random_patch_mask", "patchify", "masked_patch_loss",
    "ASGFeatures", "ASGLoss", "asymmetric_loss", "tag_soft_labels", "soft_label_nce",
]

MAX_LOGIT_SCALE = 100.0  # 1/τ <= 100, i.e. τ >= 0.01 (CLIP's clamp)


class Embedding(NamedTuple):
    """One side of a contrastive pair: ``s`` (B, D) L2-normalised, ``mu``/``sigma`` (B, K) Gaussian.

    ``sigma`` holds standard deviations (``exp(log_sigma)``), not variances.
    With SSS off only ``s`` is read.
    """

    s: Tensor
    mu: Tensor
    sigma: Tensor


def gather_embedding(e: Embedding) -> Embedding:
    """Every field of ``e`` gathered over ranks with :func:`dusss.distributed.gather_with_grad`: (W·B, ·).

    Rank ``r``'s items become rows ``[r·B, (r+1)·B)``; gradients flow back to
    the local rows. ``None`` fields (``mu``/``sigma`` with SSS off) stay None.
    The identity without a process group.
    """
    return Embedding(*(None if t is None else gather_with_grad(t) for t in e))


def _check_global_mask(mask: Tensor | None, n_global: int, n_local: int) -> None:
    """With ``gather=True``, raise unless ``mask`` is None or covers the gathered (global) batch."""
    if mask is not None and n_global != n_local and tuple(mask.shape) != (n_global, n_global):
        raise ValueError(
            f"positive_mask has shape {tuple(mask.shape)} but gather=True scores the global batch of {n_global} "
            f"items ({n_local} on this rank); build the mask from the reports of every rank, e.g. "
            "same_text_mask(dusss.distributed.all_gather_objects(texts))"
        )


def _check_positive_mask(mask: Tensor, logits: Tensor) -> Tensor:
    """Validate a (B, B) boolean positive mask against square logits and return it as bool."""
    if mask.shape != logits.shape:
        raise ValueError(
            f"positive_mask has shape {tuple(mask.shape)} but the similarity matrix is "
            f"{tuple(logits.shape)}; pass a (B, B) boolean matrix, True where item i and j match"
        )
    mask = mask.to(device=logits.device, dtype=torch.bool)
    if not bool(mask.any(1).all() and mask.any(0).all()):
        raise ValueError(
            "positive_mask has a row or column without any positive; every item must at least be its "
            "own positive (set the diagonal to True)"
        )
    return mask


def _one_way_nce(logits: Tensor, mask: Tensor | None) -> Tensor:
    """Row-wise InfoNCE: CE with the diagonal target, or the mean over the row's positives."""
    if mask is None:
        target = torch.arange(logits.shape[0], device=logits.device)
        return F.cross_entropy(logits, target)
    log_prob = F.log_softmax(logits, dim=1)  # (B, B)
    per_row = -(log_prob * mask).sum(1) / mask.sum(1)  # (B,)
    return per_row.mean()


def info_nce(logits: Tensor, positive_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric InfoNCE on a square logit matrix: returns ``(x2y, y2x)``.

    ``logits[i, j]`` scores item ``i`` of side x against item ``j`` of side y;
    ``x2y`` is the cross-entropy of each row against its positives (the
    diagonal, or ``positive_mask``'s True entries: multi-positive InfoNCE
    ``−mean_{p} log softmax``), ``y2x`` the same over columns (Eqs. 6-7). The
    caller averages them (Eq. 8).
    """
    if logits.dim() != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"InfoNCE needs a square (B, B) logit matrix; got {tuple(logits.shape)}")
    mask = None if positive_mask is None else _check_positive_mask(positive_mask, logits)
    x2y = _one_way_nce(logits, mask)
    y2x = _one_way_nce(logits.T, None if mask is None else mask.T)
    return x2y, y2x


class SSSInfoNCE(nn.Module):
    """Eqs. 5-7: symmetric InfoNCE on the SSS-corrected similarity ``ŝim / τ``.

    ``logits = logit_scale · ŝim(x_i, y_j)`` with ``ŝim`` from
    :func:`dusss.sss.uncertain_similarity` (Eq. 5), or the plain cosine
    ``s_x · s_y`` with ``use_sss=False`` (CLIP's InfoNCE). The loss is
    ``(L^{x→y} + L^{y→x}) / 2`` (Eqs. 6-7 averaged as in Eq. 8). ``ŝim`` is
    symmetric in its two arguments, so the y→x logits are the transpose.
    The temperature is not owned here: ``logit_scale = 1/τ`` is passed in, so
    CMC and IMC can share one (see :class:`DualContrastiveLoss`). With
    ``gather=True`` both sides are gathered over ranks first (module docstring).
    """

    def __init__(self, *, a: float = 0.005, b: float = 4.0, lam: float = 0.2, eps: float = 1e-6,
                 use_sss: bool = True, gather: bool = False):
        super().__init__()
        if not a > 0:
            raise ValueError(f"SSS scale a = {a!r} must be > 0 (Eq. 2)")
        if lam < 0:
            raise ValueError(f"SSS lambda = {lam!r} must be >= 0 (Eq. 4)")
        self.a, self.b, self.lam, self.eps, self.use_sss, self.gather = a, b, lam, eps, use_sss, gather

    def similarity(self, x: Embedding, y: Embedding) -> Tensor:
        """``ŝim`` (Eq. 5) with SSS on, the cosine ``s_x · s_y`` with it off; (B, B)."""
        if self.use_sss:
            return uncertain_similarity(x.s, y.s, x.mu, x.sigma, y.mu, y.sigma,
                                        a=self.a, b=self.b, lam=self.lam, eps=self.eps)
        return x.s @ y.s.T  # (B, B)

    def forward(self, x: Embedding, y: Embedding, logit_scale: Tensor,
                positive_mask: Tensor | None = None, return_dict: bool = False):
        """Loss (scalar), or ``{"loss", "x2y", "y2x"}`` with ``return_dict``."""
        if x.s.shape[0] != y.s.shape[0]:
            raise ValueError(
                f"InfoNCE pairs item i of x with item i of y; got {x.s.shape[0]} and {y.s.shape[0]} items"
            )
        if self.gather:
            n_local = x.s.shape[0]
            x, y = gather_embedding(x), gather_embedding(y)
            _check_global_mask(positive_mask, x.s.shape[0], n_local)
        logits = logit_scale * self.similarity(x, y)  # (B, B)
        x2y, y2x = info_nce(logits, positive_mask)
        loss = 0.5 * (x2y + y2x)
        if return_dict:
            return {"loss": loss, "x2y": x2y, "y2x": y2x}
        return loss


class LearnableTemperature(nn.Module):
    """One learnable InfoNCE temperature, stored as ``log(1/τ)``, with ``1/τ`` clamped to <= 100.

    Calling it returns ``logit_scale = 1/τ``; the clamp (CLIP's) stops the
    temperature collapsing, and the gradient is zero while it is active.
    """

    def __init__(self, tau_init: float = 0.07):
        super().__init__()
        if not tau_init > 0:
            raise ValueError(f"tau_init = {tau_init!r} must be > 0; the paper's value is 0.07")
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / tau_init)))

    def forward(self) -> Tensor:
        """``1/τ`` as a scalar tensor, at most :data:`MAX_LOGIT_SCALE`."""
        return self.log_logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)


class DualContrastiveLoss(nn.Module):
    """Eqs. 8-9: Dual Contrastive Learning, ``w_cmc·L_cmc + w_imc·L_imc``, with SSS in each term.

    ``L_cmc = ½[L^{I→T}(I1, T1) + L^{T→I}(T1, I1)]`` (Eq. 8) and
    ``L_imc = ½[L_nce(I1, I2) + L_nce(T1, T2)]`` (Eq. 9), where each ``L_nce``
    is the symmetric :class:`SSSInfoNCE` (for IMC the paper writes one direction;
    the symmetric form is used for both terms, so ``L_imc`` is the same kind of
    quantity as ``L_cmc``). One learnable temperature is shared by all terms.
    Each term can be switched off for ablations; a term that is off is reported
    as 0 in the returned dict (every key is always present). With
    ``gather=True`` each of the four embeddings is gathered over ranks once, so
    every term uses negatives from the global batch (module docstring).
    """

    def __init__(self, *, a: float = 0.005, b: float = 4.0, lam: float = 0.2, eps: float = 1e-6,
                 use_sss: bool = True, use_cmc: bool = True, use_imc: bool = True,
                 w_cmc: float = 1.0, w_imc: float = 1.0, tau_init: float = 0.07, gather: bool = False):
        super().__init__()
        if not (use_cmc or use_imc):
            raise ValueError(
                "DualContrastiveLoss with use_cmc=False and use_imc=False has no term to optimise; "
                "switch at least one on (config keys use_cmc / use_imc)"
            )
        self.nce = SSSInfoNCE(a=a, b=b, lam=lam, eps=eps, use_sss=use_sss)
        self.temperature = LearnableTemperature(tau_init)
        self.use_cmc, self.use_imc = use_cmc, use_imc
        self.w_cmc, self.w_imc = w_cmc, w_imc
        self.gather = gather

    @classmethod
    def from_config(cls, cfg, *, gather: bool = False) -> "DualContrastiveLoss":
        """Build from a :class:`dusss.config.Config` (``sss_*``, ``use_*``, ``w_*``, ``tau_init``)."""
        return cls(a=cfg.sss_a, b=cfg.sss_b, lam=cfg.sss_lam, eps=cfg.sss_eps, use_sss=cfg.use_sss,
                   use_cmc=cfg.use_cmc, use_imc=cfg.use_imc, w_cmc=cfg.w_cmc, w_imc=cfg.w_imc,
                   tau_init=cfg.tau_init, gather=gather)

    def forward(self, img1: Embedding, txt1: Embedding, img2: Embedding | None = None,
                txt2: Embedding | None = None, positive_mask: Tensor | None = None) -> dict[str, Tensor]:
        """``{"loss", "cmc", "imc", "imc_image", "imc_text", "tau"}``; ``positive_mask`` applies to every term."""
        scale = self.temperature()
        if self.gather:
            n_local = img1.s.shape[0]
            img1, txt1 = gather_embedding(img1), gather_embedding(txt1)
            img2 = None if img2 is None else gather_embedding(img2)
            txt2 = None if txt2 is None else gather_embedding(txt2)
            _check_global_mask(positive_mask, img1.s.shape[0], n_local)
        zero = scale.new_zeros(())
        cmc = imc_image = imc_text = imc = zero
        if self.use_cmc:
            cmc = self.nce(img1, txt1, scale, positive_mask)
        if self.use_imc:
            if img2 is None or txt2 is None:
                raise ValueError(
                    "the intra-modal term (Eq. 9) needs a second view of both images and texts: pass "
                    "img2 and txt2, or set use_imc=False"
                )
            imc_image = self.nce(img1, img2, scale, positive_mask)
            imc_text = self.nce(txt1, txt2, scale, positive_mask)
            imc = 0.5 * (imc_image + imc_text)
        loss = self.w_cmc * cmc + self.w_imc * imc
        return {"loss": loss, "cmc": cmc, "imc": imc, "imc_image": imc_image,
                "imc_text": imc_text, "tau": (1.0 / scale).detach()}


def mask_pool(features: Tensor, weights: Tensor, eps: float = 1e-6) -> Tensor:
    """Weighted spatial average of ``features`` (B, D, H, W) under ``weights`` (B, 1, H, W) -> (B, D).

    ``pooled_b = Σ_hw w_bhw · f_bhw / Σ_hw w_bhw``. Where an image's weights sum
    to (almost) zero, e.g. an empty text-guided mask, the plain spatial mean is
    returned instead, so the result and its gradient stay finite and meaningful.
    Weights must be non-negative and of the features' spatial size.
    """
    if features.dim() != 4 or weights.dim() != 4 or weights.shape[1] != 1:
        raise ValueError(
            f"mask_pool expects features (B, D, H, W) and weights (B, 1, H, W); got "
            f"{tuple(features.shape)} and {tuple(weights.shape)}"
        )
    if weights.shape[0] != features.shape[0] or weights.shape[2:] != features.shape[2:]:
        raise ValueError(
            f"weights {tuple(weights.shape)} do not match features {tuple(features.shape)}; resize the "
            "mask to the feature map first (e.g. F.interpolate(weights, size=features.shape[-2:]))"
        )
    total = weights.sum(dim=(2, 3))  # (B, 1)
    weighted = (features * weights).sum(dim=(2, 3)) / total.clamp_min(eps)  # (B, D)
    return torch.where(total > eps, weighted, features.mean(dim=(2, 3)))  # (B, D)


class TextGuidedLoss(nn.Module):
    """Eq. 11: text-guided loss ``L_tg``, symmetric InfoNCE between pooled visual and text features.

    ``L_tg = ½ L^{v→t} + ½ L^{t→v}`` on ``cos(v_i, t_j) / τ``, where ``v`` is the
    visual feature pooled under the text-guided mask (see :func:`mask_pool`)
    and ``t`` the text feature of the same image's report. Both are
    L2-normalised here. Owns its own learnable temperature (``τ_init = 0.07``,
    ``1/τ <= 100``); the paper uses the plain cosine (no SSS) in Eq. 11. With
    ``gather=True`` both sides are gathered over ranks first (module docstring).
    """

    def __init__(self, *, tau_init: float = 0.07, gather: bool = False):
        super().__init__()
        self.temperature = LearnableTemperature(tau_init)
        self.gather = gather

    def forward(self, visual: Tensor, text: Tensor, positive_mask: Tensor | None = None) -> Tensor:
        """Scalar loss for ``visual`` (B, D) and ``text`` (B, D) (item i of each belong together)."""
        if visual.dim() != 2 or visual.shape != text.shape:
            raise ValueError(
                f"TextGuidedLoss expects visual and text of the same shape (B, D); got "
                f"{tuple(visual.shape)} and {tuple(text.shape)}"
            )
        if self.gather:
            n_local = visual.shape[0]
            visual, text = gather_with_grad(visual), gather_with_grad(text)  # (W·B, D)
            _check_global_mask(positive_mask, visual.shape[0], n_local)
        logits = self.temperature() * F.normalize(visual, dim=-1) @ F.normalize(text, dim=-1).T  # (B, B)
        v2t, t2v = info_nce(logits, positive_mask)
        return 0.5 * (v2t + t2v)


def _check_seg(name: str, x: Tensor, ref: Tensor) -> None:
    """Raise a ValueError unless ``x`` is (B, 1, H, W) like the reference logits."""
    if ref.dim() != 4 or ref.shape[1] != 1:
        raise ValueError(f"segmentation logits must be (B, 1, H, W) (one foreground class); got {tuple(ref.shape)}")
    if x.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but the logits are {tuple(ref.shape)}; they must match")


class SupervisedSegLoss(nn.Module):
    """Eq. 14: ``L_sup``, pixel-wise cross-entropy against the ground truth, averaged over pixels and images.

    With one foreground class the cross-entropy is the binary cross-entropy on
    logits, ``−[y log σ(z) + (1 − y) log(1 − σ(z))]``, computed stably by
    ``F.binary_cross_entropy_with_logits``. (The authors' code uses 0.5·Dice +
    0.5·class-balanced BCE instead; the paper's Eq. 14 is followed here.)
    """

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Mean BCE of ``logits`` (B, 1, H, W) against ``target`` (B, 1, H, W) in {0, 1}."""
        _check_seg("target", target, logits)
        return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))


def merged_target(teacher_logits: Tensor, text_logits: Tensor) -> Tensor:
    """Eq. 15's merged pseudo label ``σ(logit_teacher + logit_text)`` (probabilities, same shape).

    Adding logits multiplies the two odds: the label is foreground where the
    evidence of teacher and text together says so, and background where both
    say background. (The authors' code adds probabilities, ``σ(p_t + p_text)``,
    which is above 0.5 everywhere, i.e. an all-foreground label.)
    """
    return torch.sigmoid(teacher_logits + text_logits)


CONSISTENCY_FORMS = ("bce", "mse")  # config key cons_loss


def consistency_loss(student_logits: Tensor, target: Tensor, form: str = "bce") -> Tensor:
    """Distance of the student's prediction to a soft target ``target`` (probabilities), averaged over pixels.

    ``form="bce"``: the soft-target binary cross-entropy on the student's
    logits (the CE of Eqs. 15-16; not zero at its minimum, which is the
    target's entropy; its gradient is ``σ(z) − target``). ``form="mse"``: the
    squared error ``(σ(z) − target)²`` of Mean Teacher / SSL4MIS, whose gradient
    fades where the student is confident. ``target`` is detached.
    """
    _check_seg("target", target, student_logits)
    target = target.detach().to(student_logits.dtype)
    if form == "bce":
        return F.binary_cross_entropy_with_logits(student_logits, target)
    if form == "mse":
        return F.mse_loss(torch.sigmoid(student_logits), target)
    raise ValueError(f"consistency form {form!r} is not one of {CONSISTENCY_FORMS} (config key cons_loss)")


class TextGuidedSemiLoss(nn.Module):
    """Eqs. 15-17: ``L_semi = (L_semi^merged + L_semi^text) / 2`` on unlabelled images.

    ``L_semi^merged = CE(student, σ(z_teacher + z_text))`` (Eq. 15) and
    ``L_semi^text = CE(student, σ(z_text))`` (Eq. 16), where CE is the
    soft-target binary cross-entropy on the student's logits, averaged over
    pixels and images (``form="bce"``, the paper's; ``form="mse"`` puts the
    squared error of :func:`consistency_loss` in its place). Targets are
    detached: no gradient reaches the teacher or the VLM. Without text logits
    it is the plain Mean-Teacher consistency (method ``mt``):
    ``L_semi = L_semi^merged = CE(student, σ(z_teacher))``.
    """

    def __init__(self, form: str = "bce") -> None:
        super().__init__()
        if form not in CONSISTENCY_FORMS:
            raise ValueError(f"consistency form {form!r} is not one of {CONSISTENCY_FORMS} (config key cons_loss)")
        self.form = form

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, text_logits: Tensor | None = None,
                return_dict: bool = False):
        """``L_semi`` (scalar), or ``{"semi", "merged", "text"}`` (``"text"`` is 0 without text logits)."""
        _check_seg("teacher_logits", teacher_logits, student_logits)
        teacher_logits = teacher_logits.detach()
        if text_logits is None:
            merged = consistency_loss(student_logits, torch.sigmoid(teacher_logits), self.form)
            text = student_logits.new_zeros(())
            semi = merged
        else:
            _check_seg("text_logits", text_logits, student_logits)
            text_logits = text_logits.detach()
            merged = consistency_loss(student_logits, merged_target(teacher_logits, text_logits), self.form)
            text = consistency_loss(student_logits, torch.sigmoid(text_logits), self.form)
            semi = 0.5 * (merged + text)
        if return_dict:
            return {"semi": semi, "merged": merged, "text": text}
        return semi


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float, step: int) -> float:
    """Eq. 12: ``θ_t ← α θ_t + (1 − α) θ_s`` in place, with ``α_eff = min(1 − 1/(step + 1), α)``.

    The ramp (SSL4MIS's) makes the teacher a plain copy at step 0 and an ever
    longer average afterwards. Floating-point buffers (BatchNorm running
    statistics) follow the same average; integer buffers (``num_batches_tracked``)
    are copied. Returns ``α_eff``. Both models must have the same structure.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"EMA alpha = {alpha!r} must be in [0, 1] (Eq. 12)")
    if step < 0:
        raise ValueError(f"EMA step = {step!r} must be >= 0 (the number of optimiser steps taken)")
    alpha_eff = min(1.0 - 1.0 / (step + 1), alpha)
    for kind, t_items, s_items in (
        ("parameters", teacher.named_parameters(), student.named_parameters()),
        ("buffers", teacher.named_buffers(), student.named_buffers()),
    ):
        t_dict, s_dict = dict(t_items), dict(s_items)
        if t_dict.keys() != s_dict.keys():
            missing = sorted(set(t_dict) ^ set(s_dict))[:5]
            raise ValueError(f"teacher and student {kind} differ ({missing}); build the teacher as a copy of the student")
        for name, t in t_dict.items():
            s = s_dict[name]
            if t.dtype.is_floating_point:
                t.mul_(alpha_eff).add_(s.detach(), alpha=1.0 - alpha_eff)
            else:
                t.copy_(s)
    return alpha_eff


def sigmoid_rampup(current: float, length: float) -> float:
    """Consistency-weight ramp-up ``exp(−5 (1 − t)²)``, ``t = clip(current / length, 0, 1)``.

    The paper gives no ramp-up; this is the Mean-Teacher / SSL4MIS schedule
    (Laine & Aila 2017), usually with ``current`` in epochs. Returns 1.0 when
    ``length == 0`` (no ramp-up).
    """
    if length < 0:
        raise ValueError(f"ramp-up length = {length!r} must be >= 0 (config key rampup_epochs)")
    if length == 0:
        return 1.0
    t = min(max(current / length, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


# ---------------------------------------------------------------- MGCA (Wang et al. 2022), a Step-1 alternative
class MGCAFeatures(NamedTuple):
    """What MGCA's token- and prototype-level terms read from one forward pass (:meth:`dusss.vlm.DuSSSVLM.forward`
    with ``local=True``).

    ``patches`` ``(B, P, E)`` and ``words`` ``(B, N, E)``: unit local embeddings of the image's patch tokens and of
    the report's words; ``word_mask`` ``(B, N)`` True for real words (False = padding); ``patch_attn`` ``(B, P)``
    and ``word_attn`` ``(B, N)``: the last layer's head-mean attention of [CLS] on each token (MGCA's token
    weights, before clipping); ``proto_image`` / ``proto_text`` ``(B, K)``: scores of the global embeddings on
    the K unit prototypes.
    """

    patches: Tensor
    patch_attn: Tensor
    words: Tensor
    word_mask: Tensor
    word_attn: Tensor
    proto_image: Tensor
    proto_text: Tensor


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, eps: float = 0.05, iters: int = 3) -> Tensor:
    """MGCA's (SwAV's) equal-partition cluster assignment of ``scores`` ``(B, K)`` -> codes ``(B, K)``, no gradient.

    ``Q = exp(scores / eps)ᵀ`` (K, B) is rescaled ``iters`` times so its rows (prototypes) sum to ``1/K`` and
    its columns (samples) to ``1/B``, i.e. towards uniform marginals over the prototypes; each sample's column
    is then normalised into a distribution over the prototypes (rows of the result sum to 1). Subtracting the
    global maximum first changes nothing after the normalisation and keeps ``exp`` finite.
    """
    q = torch.exp((scores.float() - scores.float().max()) / eps).T  # (K, B)
    q = q / q.sum()
    k, b = q.shape
    tiny = torch.finfo(q.dtype).tiny
    for _ in range(iters):
        q = q / (q.sum(1, keepdim=True).clamp_min(tiny) * k)  # every prototype gets mass 1/K
        q = q / (q.sum(0, keepdim=True).clamp_min(tiny) * b)  # every sample gets mass 1/B
    return (q / q.sum(0, keepdim=True).clamp_min(tiny)).T  # (B, K)


def cross_attend(query: Tensor, keys: Tensor, key_mask: Tensor | None = None, tau: float = 0.1) -> Tensor:
    """MGCA's parameter-free cross-attention: each query token's attended representation from the other modality.

    ``softmax_j(q_i · k_j / tau) k_j`` summed over the keys ``j`` (masked keys, ``key_mask`` False, get no
    weight), L2-normalised: ``query`` ``(B, Nq, E)``, ``keys`` ``(B, Nk, E)`` -> ``(B, Nq, E)``. Words attend
    over patches (the word-to-patch direction) and patches over words.
    """
    sim = query @ keys.transpose(1, 2) / tau  # (B, Nq, Nk)
    if key_mask is not None:
        sim = sim.masked_fill(~key_mask[:, None, :], torch.finfo(sim.dtype).min)
    return F.normalize(torch.softmax(sim, dim=-1) @ keys, dim=-1)  # (B, Nq, E)


@torch.no_grad()
def clipped_token_weights(attn: Tensor, mask: Tensor | None = None, low: float = 0.1, high: float = 0.9) -> Tensor:
    """MGCA's token weights: [CLS] attention ``(B, N)`` clipped per sample to its 10th-90th percentile of the valid
    tokens (``mask`` True), zero on the others, normalised to sum 1 over each sample. No gradient."""
    attn = attn.float()
    valid = torch.ones_like(attn, dtype=torch.bool) if mask is None else mask.bool()
    x = attn.masked_fill(~valid, float("nan"))
    lo, hi = torch.nanquantile(x, low, dim=1, keepdim=True), torch.nanquantile(x, high, dim=1, keepdim=True)
    w = torch.where(valid, torch.minimum(torch.maximum(attn, lo), hi), torch.zeros_like(attn))  # (B, N)
    w = torch.nan_to_num(w)  # a sample without valid tokens
    return w / w.sum(1, keepdim=True).clamp_min(1e-12)


def token_alignment_nce(tokens: Tensor, attended: Tensor, weights: Tensor, tau: float = 0.1,
                        mask: Tensor | None = None) -> Tensor:
    """MGCA's local InfoNCE of each token with its own cross-modal attended representation, within one sample.

    ``sim[b, i, j] = tokens[b, i] · attended[b, j] / tau`` ``(B, N, N)``; the positive of token ``i`` is
    ``attended[b, i]``, the negatives the attended representations of the sample's other (valid) tokens, in
    both directions (rows and columns), each cross-entropy weighted by ``weights`` ``(B, N)`` (summing to 1
    per sample) and summed, over the batch averaged: ``(L_row + L_col) / 2``. Padding (``mask`` False) is
    neither an anchor nor a negative.
    """
    b, n, _ = tokens.shape
    sim = tokens @ attended.transpose(1, 2) / tau  # (B, N, N)
    valid = torch.ones(b, n, dtype=torch.bool, device=tokens.device) if mask is None else mask.bool()
    neg = torch.finfo(sim.dtype).min
    rows = sim.masked_fill(~valid[:, None, :], neg)  # token i against the attended j of valid tokens
    cols = sim.masked_fill(~valid[:, :, None], neg)  # attended j against valid tokens i
    target = torch.arange(n, device=tokens.device).repeat(b)  # (B*N,)
    ce_row = F.cross_entropy(rows.reshape(b * n, n), target, reduction="none").view(b, n)
    ce_col = F.cross_entropy(cols.transpose(1, 2).reshape(b * n, n), target, reduction="none").view(b, n)
    w = torch.where(valid, weights, torch.zeros_like(weights))
    zero = torch.zeros_like(ce_row)
    loss_row = torch.where(valid, ce_row * w, zero).sum() / b
    loss_col = torch.where(valid, ce_col * w, zero).sum() / b
    return 0.5 * (loss_row + loss_col)


def prototype_alignment(proto_image: Tensor, proto_text: Tensor, tau: float = 0.2, eps: float = 0.05,
                        iters: int = 3) -> Tensor:
    """MGCA's cross-modal prototype term: swapped prediction of Sinkhorn codes over K prototypes.

    Codes ``q = sinkhorn_knopp(scores)`` (no gradient) of each modality are the targets of the other
    modality's ``softmax(scores / tau)``: ``½[CE(q_image, p_text) + CE(q_text, p_image)]``, averaged over the
    batch. ``proto_*`` are ``(B, K)`` scores of the unit global embeddings on the unit prototypes.
    """
    q_img, q_txt = sinkhorn_knopp(proto_image, eps, iters), sinkhorn_knopp(proto_text, eps, iters)  # (B, K)
    logp_img = F.log_softmax(proto_image / tau, dim=1)  # (B, K)
    logp_txt = F.log_softmax(proto_text / tau, dim=1)
    return 0.5 * (-(q_img * logp_txt).sum(1).mean() - (q_txt * logp_img).sum(1).mean())


class MGCALoss(nn.Module):
    """MGCA's Step-1 objective (Wang et al. 2022): ``w_instance·L_ita + w_token·(L_word + L_patch) + w_proto·L_proto``.

    - instance level ``L_ita``: image-report InfoNCE on the unit global embeddings ``s`` at a fixed
      temperature, image->text plus text->image (summed, as MGCA), ``positive_mask`` marking identical
      reports as positives (the project's ``same_text_positive``; MGCA has one positive);
    - token level: words attend over the patches and patches over the words (:func:`cross_attend`), and
      each token is contrasted with its attended representation (:func:`token_alignment_nce`), weighted by
      the clipped [CLS] attention (:func:`clipped_token_weights`); ``L_token = L_word + L_patch``;
    - prototype level ``L_proto``: :func:`prototype_alignment`.

    Defaults are those MGCA's released training script runs with (lambda_1..3 = 1 from its command line, which
    overrides the 1 / 0.7 / 0.5 of its module's signature; temperatures 0.07 / 0.1 / 0.2; Sinkhorn epsilon 0.05
    with 3 iterations; 500 prototypes); none is the DuSSS paper's, which names MGCA only as a Table-1 row.
    With ``gather=True`` the instance term scores the global batch; the token term is within each sample and
    the Sinkhorn codes are computed per rank (MGCA all-reduces them: a simplification under ``torchrun``).
    """

    def __init__(self, *, w_instance: float = 1.0, w_token: float = 1.0, w_proto: float = 1.0,
                 tau_instance: float = 0.07, tau_token: float = 0.1, tau_proto: float = 0.2,
                 sinkhorn_eps: float = 0.05, sinkhorn_iters: int = 3, gather: bool = False) -> None:
        super().__init__()
        self.w_instance, self.w_token, self.w_proto = w_instance, w_token, w_proto
        self.tau_instance, self.tau_token, self.tau_proto = tau_instance, tau_token, tau_proto
        self.sinkhorn_eps, self.sinkhorn_iters = sinkhorn_eps, sinkhorn_iters
        self.gather = gather

    @classmethod
    def from_config(cls, cfg, *, gather: bool = False) -> "MGCALoss":
        """Build from a :class:`dusss.config.Config` (its ``mgca_*`` keys)."""
        return cls(w_instance=cfg.mgca_w_instance, w_token=cfg.mgca_w_token, w_proto=cfg.mgca_w_proto,
                   tau_instance=cfg.mgca_tau_instance, tau_token=cfg.mgca_tau_token, tau_proto=cfg.mgca_tau_proto,
                   sinkhorn_eps=cfg.mgca_sinkhorn_eps, sinkhorn_iters=cfg.mgca_sinkhorn_iters, gather=gather)

    def forward(self, image: Embedding, text: Embedding, local: MGCAFeatures,
                positive_mask: Tensor | None = None) -> dict[str, Tensor]:
        """``{"loss", "instance", "token", "token_word", "token_patch", "proto"}`` (unweighted terms, weighted sum)."""
        img_s, txt_s = image.s, text.s  # (B, E)
        if self.gather:
            n_local = img_s.shape[0]
            img_s, txt_s = gather_with_grad(img_s), gather_with_grad(txt_s)
            _check_global_mask(positive_mask, img_s.shape[0], n_local)
        i2t, t2i = info_nce(img_s @ txt_s.T / self.tau_instance, positive_mask)
        instance = i2t + t2i
        word_att = cross_attend(local.words, local.patches, None, self.tau_token)  # (B, N, E)
        patch_att = cross_attend(local.patches, local.words, local.word_mask, self.tau_token)  # (B, P, E)
        word_w = clipped_token_weights(local.word_attn, local.word_mask)  # (B, N)
        patch_w = clipped_token_weights(local.patch_attn)  # (B, P)
        token_word = token_alignment_nce(local.words, word_att, word_w, self.tau_token, local.word_mask)
        token_patch = token_alignment_nce(local.patches, patch_att, patch_w, self.tau_token)
        token = token_word + token_patch
        proto = prototype_alignment(local.proto_image, local.proto_text, self.tau_proto, self.sinkhorn_eps,
                                    self.sinkhorn_iters)
        loss = self.w_instance * instance + self.w_token * token + self.w_proto * proto
        return {"loss": loss, "instance": instance, "token": token, "token_word": token_word,
                "token_patch": token_patch, "proto": proto}


# ---------------------------------------------------------------- CMITM (Chen et al. 2023), a Step-1 alternative
class CMITMFeatures(NamedTuple):
    """What CMITM's masked-modelling terms read from one forward pass (:meth:`dusss.vlm.DuSSSVLM.forward` with
    ``local=True`` on a ``step1_objective="cmitm"`` model).

    ``pred`` / ``target`` ``(B, P, p*p*3)``: the decoder's pixels and the true pixels of every patch (row-major);
    ``patch_mask`` ``(B, P)`` True where the patch was masked (hidden from the image encoder); ``mlm_logits``
    ``(M, V)``: vocabulary scores at the M masked word pieces of the batch only, ``mlm_targets`` ``(M,)`` their
    true token ids; ``mlm_positions`` ``(B, L)`` True at those pieces.
    """

    pred: Tensor
    target: Tensor
    patch_mask: Tensor
    mlm_logits: Tensor
    mlm_targets: Tensor
    mlm_positions: Tensor


def random_patch_mask(batch: int, patches: int, ratio: float, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> Tensor:
    """MAE's random masking: ``(B, P)`` bool, True on ``round(ratio * P)`` patches per image (at least one masked
    and one visible), drawn independently per image by ranking uniform noise."""
    n_mask = min(max(round(ratio * patches), 1), patches - 1)
    noise = torch.rand(batch, patches, generator=generator)  # (B, P)
    rank = noise.argsort(1).argsort(1)
    return (rank < n_mask).to(device)


def patchify(images: Tensor, patch: int) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, h*w, patch*patch*C)``: each patch's pixels, patches row-major (as the ViT's tokens)."""
    b, c, hh, ww = images.shape
    h, w = hh // patch, ww // patch
    x = images.reshape(b, c, h, patch, w, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, patch * patch * c)


def masked_patch_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool = True) -> Tensor:
    """MAE's reconstruction loss: per-patch mean squared error, averaged over the **masked** patches only.

    ``pred``/``target`` ``(B, P, D)``, ``mask`` ``(B, P)`` True = masked. With ``norm_pix`` each target patch
    is standardised by its own mean and variance first (MAE's ``norm_pix_loss``, eps 1e-6).
    """
    if norm_pix:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = ((pred - target) ** 2).mean(-1)  # (B, P)
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum().clamp_min(1.0)


class CMITMLoss(nn.Module):
    """CMITM's Step-1 objective (Chen et al. 2023): ``w_contrast·L_itc + w_mim·L_mim + w_mlm·L_mlm``.

    - ``L_itc``: symmetric image-report InfoNCE on the unit global embeddings at a fixed temperature,
      ``(i2t + t2i) / 2``, identical reports as positives (``positive_mask``);
    - ``L_mim``: cross-modal masked image modelling, :func:`masked_patch_loss` of the pixels the decoder
      rebuilt for the masked patches while attending to the report's token states;
    - ``L_mlm``: masked language modelling conditioned on the image, cross-entropy at the masked word pieces
      only (:attr:`CMITMFeatures.mlm_logits` holds nothing else).
    """

    def __init__(self, *, w_contrast: float = 1.0, w_mim: float = 1.0, w_mlm: float = 1.0, tau: float = 0.07,
                 norm_pix: bool = True, gather: bool = False) -> None:
        super().__init__()
        self.w_contrast, self.w_mim, self.w_mlm, self.tau = w_contrast, w_mim, w_mlm, tau
        self.norm_pix, self.gather = norm_pix, gather

    @classmethod
    def from_config(cls, cfg, *, gather: bool = False) -> "CMITMLoss":
        """Build from a :class:`dusss.config.Config` (its ``cmitm_*`` keys)."""
        return cls(w_contrast=cfg.cmitm_w_contrast, w_mim=cfg.cmitm_w_mim, w_mlm=cfg.cmitm_w_mlm, tau=cfg.cmitm_tau,
                   norm_pix=cfg.cmitm_norm_pix, gather=gather)

    def forward(self, image: Embedding, text: Embedding, local: CMITMFeatures,
                positive_mask: Tensor | None = None) -> dict[str, Tensor]:
        """``{"loss", "contrast", "mim", "mlm"}`` (unweighted terms and the weighted sum)."""
        contrast = 0.5 * sum(_instance_nce(image, text, self.tau, positive_mask, self.gather))
        mim = masked_patch_loss(local.pred, local.target, local.patch_mask, self.norm_pix)
        mlm = (F.cross_entropy(local.mlm_logits, local.mlm_targets) if local.mlm_targets.numel()
               else local.mlm_logits.sum() * 0.0)
        loss = self.w_contrast * contrast + self.w_mim * mim + self.w_mlm * mlm
        return {"loss": loss, "contrast": contrast, "mim": mim, "mlm": mlm}


def _instance_nce(image: Embedding, text: Embedding, tau: float, positive_mask: Tensor | None,
                  gather: bool) -> tuple[Tensor, Tensor]:
    """Image->text and text->image InfoNCE of the unit global embeddings at temperature ``tau`` (global batch
    under ``gather``)."""
    img_s, txt_s = image.s, text.s  # (B, E)
    if gather:
        n_local = img_s.shape[0]
        img_s, txt_s = gather_with_grad(img_s), gather_with_grad(txt_s)
        _check_global_mask(positive_mask, img_s.shape[0], n_local)
    return info_nce(img_s @ txt_s.T / tau, positive_mask)


# ---------------------------------------------------------------- ASG (Li et al. 2024), a Step-1 alternative
class ASGFeatures(NamedTuple):
    """What ASG's anatomy and tag terms read from one forward pass (``local=True`` on an ``"asg"`` model).

    ``region`` / ``phrase`` ``(R, E)``: unit embeddings of the R anatomical regions the batch's reports name
    (image features pooled over the region, :func:`dusss.anatomy.zone_weights`) and of the phrase naming each;
    ``phrase_ids`` ``(R,)``: equal for identical phrases; ``tag_logits`` ``(B, T)``: the image-tag decoder's
    scores, ``tags`` ``(B, T)`` the report's tags, ``tag_valid`` ``(B,)`` False for reports without anatomy.
    """

    region: Tensor
    phrase: Tensor
    phrase_ids: Tensor
    tag_logits: Tensor
    tags: Tensor
    tag_valid: Tensor


def asymmetric_loss(logits: Tensor, targets: Tensor, gamma_neg: float = 4.0, gamma_pos: float = 0.0,
                    clip: float = 0.05, eps: float = 1e-8) -> Tensor:
    """Asymmetric loss (Ridnik et al. 2021; ASG's image-tag recognition, after Query2Label), summed over tags
    ``(..., T)`` -> ``(...)``: ``-y (1-p)^γ+ log p - (1-y) p_m^γ- log(1-p_m)`` with ``p_m = max(p - clip, 0)``
    (the focusing weights carry no gradient, as in the reference code)."""
    p = torch.sigmoid(logits)
    p_neg = (p - clip).clamp_min(0) if clip > 0 else p
    y = targets.to(p.dtype)
    loss_pos = y * torch.log(p.clamp_min(eps))
    loss_neg = (1 - y) * torch.log((1 - p_neg).clamp_min(eps))
    with torch.no_grad():
        pt = p * y + (1 - p_neg) * (1 - y)
        weight = (1 - pt) ** (gamma_pos * y + gamma_neg * (1 - y))
    return -((loss_pos + loss_neg) * weight).sum(-1)


def tag_soft_labels(tags: Tensor, valid: Tensor) -> Tensor:
    """ASG's soft labels between reports: ``(B, B)`` cosine similarity of the tag vectors ``(B, T)`` (two empty
    tag vectors count as identical), rows normalised to sum 1; rows and columns of invalid reports are zero."""
    t = tags.float()
    norm = t.norm(dim=1, keepdim=True)
    sim = (t / norm.clamp_min(1e-12)) @ (t / norm.clamp_min(1e-12)).T  # (B, B)
    empty = norm.squeeze(1) == 0
    sim = torch.where(empty[:, None] & empty[None, :], torch.ones_like(sim), sim)
    pair = valid[:, None] & valid[None, :]
    sim = torch.where(pair, sim, torch.zeros_like(sim))
    return sim / sim.sum(1, keepdim=True).clamp_min(1e-12)


def soft_label_nce(logits: Tensor, soft: Tensor, rows: Tensor) -> Tensor:
    """Cross-entropy of ``softmax(logits)`` against soft targets ``soft`` ``(B, B)``, both directions, averaged
    over the rows where ``rows`` ``(B,)`` is True (0 when none is)."""
    if not bool(rows.any()):
        return logits.sum() * 0.0
    i2t = -(soft * F.log_softmax(logits, dim=1)).sum(1)
    t2i = -(soft.T * F.log_softmax(logits.T, dim=1)).sum(1)
    return 0.5 * (i2t[rows].mean() + t2i[rows].mean())


class ASGLoss(nn.Module):
    """ASG's Step-1 objective (Li et al. 2024): ``w_instance·L_ira + w_region·L_arsa + w_tag·L_tag + w_soft·L_soft``.

    - ``L_ira``: image-report InfoNCE on the unit global embeddings, ``(i2t + t2i) / 2``;
    - ``L_arsa``: anatomical region-phrase alignment, InfoNCE between every region embedding of the batch and
      every phrase embedding, identical phrases as positives (0 with fewer than two regions);
    - ``L_tag``: image-tag recognition, :func:`asymmetric_loss` of the tag decoder's logits, mean over the
      reports with anatomy;
    - ``L_soft``: image-report contrast against the tag soft labels (:func:`tag_soft_labels`, :func:`soft_label_nce`).

    On reports without anatomy (MoNuSeg, BM-Seg grammars) the last three are 0 and ASG is ``L_ira``.
    """

    def __init__(self, *, w_instance: float = 1.0, w_region: float = 1.0, w_tag: float = 1.0, w_soft: float = 1.0,
                 tau: float = 0.07, gather: bool = False) -> None:
        super().__init__()
        self.w_instance, self.w_region, self.w_tag, self.w_soft = w_instance, w_region, w_tag, w_soft
        self.tau, self.gather = tau, gather

    @classmethod
    def from_config(cls, cfg, *, gather: bool = False) -> "ASGLoss":
        """Build from a :class:`dusss.config.Config` (its ``asg_*`` keys)."""
        return cls(w_instance=cfg.asg_w_instance, w_region=cfg.asg_w_region, w_tag=cfg.asg_w_tag,
                   w_soft=cfg.asg_w_soft, tau=cfg.asg_tau, gather=gather)

    def region_term(self, region: Tensor, phrase: Tensor, phrase_ids: Tensor) -> Tensor:
        """``L_arsa`` of ``(R, E)`` region and phrase embeddings (see the class docstring)."""
        if region.shape[0] < 2:
            return region.sum() * 0.0
        same = phrase_ids[:, None] == phrase_ids[None, :]  # (R, R)
        r2p, p2r = info_nce(region @ phrase.T / self.tau, same)
        return 0.5 * (r2p + p2r)

    def forward(self, image: Embedding, text: Embedding, local: ASGFeatures,
                positive_mask: Tensor | None = None) -> dict[str, Tensor]:
        """``{"loss", "instance", "region", "tag", "soft"}`` (unweighted terms and the weighted sum); the
        region, tag and soft terms are computed per rank under ``gather``."""
        instance = 0.5 * sum(_instance_nce(image, text, self.tau, positive_mask, self.gather))
        region = self.region_term(local.region, local.phrase, local.phrase_ids)
        valid = local.tag_valid
        tag = (asymmetric_loss(local.tag_logits[valid], local.tags[valid]).mean() if bool(valid.any())
               else local.tag_logits.sum() * 0.0)
        soft = soft_label_nce(image.s @ text.s.T / self.tau, tag_soft_labels(local.tags, valid), valid)
        loss = self.w_instance * instance + self.w_region * region + self.w_tag * tag + self.w_soft * soft
        return {"loss": loss, "instance": instance, "region": region, "tag": tag, "soft": soft}
