"""Semi-supervised baselines of Table 1 that reuse the Step-2 training loop (:mod:`dusss.ssmis`).

``method=bcp``: Bidirectional Copy-Paste, Bai, Chen, Li, Wei & Wang,
"Bidirectional Copy-Paste for Semi-Supervised Medical Image Segmentation",
CVPR 2023 (github.com/DeepMed-Lab-ECNU/BCP). Settings, following its 2D (ACDC)
code where this loop allows:

- a box of ``bcp_box`` = 2/3 of the image side (one random position per batch)
  is copied from an unlabelled image into a labelled one ("inward") and from a
  labelled image into an unlabelled one ("outward"); the targets are mixed in
  exactly the same way from the ground truth and the teacher's hard pseudo label
  (``sigmoid(z_teacher) > threshold``);
- pixels whose target is a pseudo label weigh ``bcp_u_weight`` = 0.5 (BCP's
  ``u_weight``), pixels whose target is ground truth weigh 1;
- pre-training on labelled data: the first ``bcp_pretrain_frac`` = 1/4 of the
  epochs (BCP: 10k of 40k iterations) copy-paste between labelled images only;
  then the teacher restarts as a copy of the pre-trained student (BCP
  initialises both from the pre-trained model) and follows it by EMA (Eq. 12);
- the loss is this project's pixel-wise BCE (Eq. 14) with those weights, not
  BCP's Dice + CE, so that all rows of Table 1 share one segmentation loss;
  BCP's largest-connected-component filter of the pseudo labels is not used
  (QaTa lesions and nuclei come in many components).

``method=ucmt``: a simplified UCMT, after Shen, Cao, Yang, Liu, Yang & Zaiane,
"Co-training with High-Confidence Pseudo Labels for Semi-supervised Medical
Image Segmentation", IJCAI 2023 (github.com/Senyh/UCMT). Settings:

- two students (the loop's U-Net and a second U-Net of the same shape with its
  own initialisation and Adam optimiser; UCMT shares one encoder between two
  decoders) and an EMA teacher of the first student (Eq. 12);
- hard pseudo labels from the teacher, ``sigmoid(z_teacher) > threshold``;
- uncertainty = binary entropy of the two students' mean probability on the
  unlabelled image (high where they disagree or are unsure);
- UMIX: each image is cut into a ``ucmt_grid`` x ``ucmt_grid`` grid; its
  ``ucmt_topk`` most uncertain patches (mean uncertainty) are replaced by the
  ``ucmt_topk`` most certain patches of the next image in the batch (the r-th
  most uncertain by the r-th most certain), the pseudo labels likewise;
- each student: ``L_sup`` (Eq. 14) on the labelled images plus, ramped up like
  ``L_semi`` (``cons_weight``, ``rampup_epochs``), BCE to the pseudo labels on the
  unlabelled and on the UMIX images (the mean of the two).

The first student is the network that is validated, saved and tested.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Config

__all__ = ["BASELINE_METHODS", "box_mask", "copy_paste", "WeightedBCELoss", "BCPStep", "umix", "binary_entropy",
           "UCMTStep", "make_baseline"]

BASELINE_METHODS = ("bcp", "ucmt")  # methods whose training step lives in this module


def box_mask(height: int, width: int, frac: float, *, generator: torch.Generator | None = None,
             device: torch.device | str = "cpu") -> Tensor:
    """``(1, 1, H, W)`` float mask, 1 inside one random axis-aligned box of ``round(frac·H) x round(frac·W)``.

    The box lies wholly inside the image; its top-left corner is drawn
    uniformly from the positions that allow that (BCP's ``generate_mask``).
    ``frac`` must be in (0, 1].
    """
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"box fraction {frac!r} must be in (0, 1]; BCP uses 2/3 (config key bcp_box)")
    bh, bw = max(1, round(frac * height)), max(1, round(frac * width))
    top = int(torch.randint(0, height - bh + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - bw + 1, (1,), generator=generator))
    mask = torch.zeros(1, 1, height, width, device=device)  # (1, 1, H, W)
    mask[..., top:top + bh, left:left + bw] = 1.0
    return mask


def copy_paste(background: Tensor, foreground: Tensor, mask: Tensor) -> Tensor:
    """``background ⊙ (1 − M) + foreground ⊙ M``: paste the box ``M`` of ``foreground`` into ``background``.

    Works for images ``(B, C, H, W)``, masks / labels ``(B, 1, H, W)`` and
    per-pixel weights alike, so images and their targets are mixed identically.
    """
    return background * (1.0 - mask) + foreground * mask


class WeightedBCELoss(nn.Module):
    """Eq. 14 (pixel-wise BCE on logits) with a per-pixel weight, averaged over all pixels and images.

    BCP's mixed loss weighs pseudo-labelled pixels by ``u_weight`` and
    ground-truth pixels by 1; with all weights 1 this equals
    :class:`dusss.losses.SupervisedSegLoss`.
    """

    def forward(self, logits: Tensor, target: Tensor, weight: Tensor) -> Tensor:
        """Mean of ``weight · BCE(logits, target)``; all three ``(B, 1, H, W)``."""
        per_pixel = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
        return (weight * per_pixel).mean()


class BCPStep:
    """One BCP training step inside :func:`dusss.ssmis.train_ssmis` (settings: see the module docstring).

    :meth:`__call__` gets the student, the teacher, a labelled batch and an
    unlabelled batch and returns ``(loss, l_sup, terms, weight)`` for the
    loop: ``l_sup`` is the loss on ground-truth pixels, ``terms["semi"]`` the
    loss on pseudo-labelled pixels (already weighted), ``weight`` the share of
    the semi-supervised stage (0 while pre-training, 1 after).
    """

    def state_dict(self) -> dict:
        """Nothing to save: BCP draws its boxes from torch's global RNG, which the loop's checkpoint holds."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Counterpart of :meth:`state_dict` (nothing to restore)."""

    def __init__(self, cfg: Config) -> None:
        self.box, self.u_weight, self.threshold = cfg.bcp_box, cfg.bcp_u_weight, cfg.threshold
        self.pre_epochs = max(1, round(cfg.bcp_pretrain_frac * cfg.epochs)) if cfg.bcp_pretrain_frac > 0 else 0
        self.loss = WeightedBCELoss()

    def __call__(self, student: nn.Module, teacher: nn.Module, x_l: Tensor, y_l: Tensor, x_u: Tensor,
                 epoch: int, step: int, steps: int) -> tuple[Tensor, Tensor, dict[str, Tensor], float]:
        """Loss of one step at ``epoch`` (0-based, as the loop counts before it increments), ``step`` of ``steps``."""
        m = box_mask(x_l.shape[-2], x_l.shape[-1], self.box, device=x_l.device)  # (1, 1, H, W), torch's RNG
        ones = torch.ones_like(y_l)  # (Bl, 1, H, W)
        if epoch < self.pre_epochs:  # pre-training: copy-paste between labelled images only
            x_mix = copy_paste(x_l, x_l.roll(1, dims=0), m)  # (Bl, 3, H, W)
            y_mix = copy_paste(y_l, y_l.roll(1, dims=0), m)
            l_sup = self.loss(student(x_mix), y_mix, ones)
            return l_sup, l_sup, {"semi": torch.zeros((), device=x_l.device)}, 0.0
        if epoch == self.pre_epochs and step == 0:  # BCP starts teacher and student from the pre-trained model
            teacher.load_state_dict(student.state_dict())
        n = min(len(x_l), len(x_u))
        x_l, y_l, x_u, ones = x_l[:n], y_l[:n], x_u[:n], ones[:n]
        with torch.no_grad():
            y_u = (torch.sigmoid(teacher(x_u)) > self.threshold).to(x_u.dtype)  # (n, 1, H, W) hard pseudo labels
        x_u2, y_u2 = x_u.roll(1, dims=0), y_u.roll(1, dims=0)  # the outward mix pairs each labelled image anew
        x_in = copy_paste(x_l, x_u, m)  # labelled background, unlabelled box
        y_in = copy_paste(y_l, y_u, m)
        w_in = copy_paste(ones, self.u_weight * ones, m)
        x_out = copy_paste(x_u2, x_l, m)  # unlabelled background, labelled box
        y_out = copy_paste(y_u2, y_l, m)
        w_out = copy_paste(self.u_weight * ones, ones, m)
        z = student(torch.cat([x_in, x_out]))  # (2n, 1, H, W): one BatchNorm batch
        y, w = torch.cat([y_in, y_out]), torch.cat([w_in, w_out])  # (2n, 1, H, W)
        gt = torch.cat([(1.0 - m).expand_as(y_in), m.expand_as(y_out)])  # 1 where the target is ground truth
        l_sup = self.loss(z, y, w * gt)
        l_semi = self.loss(z, y, w * (1.0 - gt))
        return l_sup + l_semi, l_sup, {"semi": l_semi}, 1.0


def binary_entropy(p: Tensor) -> Tensor:
    """``−p log p − (1 − p) log(1 − p)`` in nats, elementwise, finite at p = 0 and 1."""
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def umix(x: Tensor, y: Tensor, uncertainty: Tensor, grid: int, k: int) -> tuple[Tensor, Tensor]:
    """UCMT's UMIX: in image ``i`` replace the ``k`` most uncertain grid patches by the ``k`` most certain of image ``i+1``.

    ``x`` (B, C, H, W), ``y`` (B, 1, H, W) and ``uncertainty`` (B, 1, H, W);
    the image is cut into ``grid`` x ``grid`` patches of ``H // grid`` x
    ``W // grid`` pixels (a remainder strip is never moved). Patch scores are
    the mean uncertainty; the r-th most uncertain patch of image ``i`` receives
    the r-th most certain patch of image ``(i + 1) mod B``, and ``y`` is mixed
    identically. Returns the mixed ``(x, y)``; the inputs are not changed.
    """
    b, _, h, w = x.shape
    if not 1 <= k <= grid * grid:
        raise ValueError(f"ucmt_topk = {k} must be in [1, ucmt_grid**2 = {grid * grid}]")
    ph, pw = h // grid, w // grid
    if ph == 0 or pw == 0:
        raise ValueError(f"ucmt_grid = {grid} is larger than the image ({h}x{w}); lower it")
    score = F.avg_pool2d(uncertainty[..., : ph * grid, : pw * grid], (ph, pw)).flatten(1)  # (B, grid*grid)
    hi = score.topk(k, dim=1).indices  # (B, k) most uncertain
    lo = (-score).topk(k, dim=1).indices  # (B, k) most certain
    x_out, y_out = x.clone(), y.clone()
    for i in range(b):
        j = (i + 1) % b
        for dst, src in zip(hi[i].tolist(), lo[j].tolist()):
            dy, dx, sy, sx = (dst // grid) * ph, (dst % grid) * pw, (src // grid) * ph, (src % grid) * pw
            x_out[i, :, dy:dy + ph, dx:dx + pw] = x[j, :, sy:sy + ph, sx:sx + pw]
            y_out[i, :, dy:dy + ph, dx:dx + pw] = y[j, :, sy:sy + ph, sx:sx + pw]
    return x_out, y_out


class UCMTStep:
    """One simplified-UCMT step inside :func:`dusss.ssmis.train_ssmis` (settings: see the module docstring).

    Holds the second student and its optimiser (saved in the loop's
    ``last.pt`` through :meth:`state_dict`). :meth:`__call__` trains the
    second student itself and returns the first student's
    ``(loss, l_sup, terms, weight)`` for the loop to optimise.
    """

    def __init__(self, cfg: Config, device: torch.device | str = "cpu") -> None:
        from .losses import SupervisedSegLoss
        from .unet import build_unet

        with torch.random.fork_rng(devices=[]):  # its own initialisation, leaving the loop's RNG untouched
            torch.manual_seed(cfg.seed + 5)
            self.student2 = build_unet(cfg).to(device).train()
        self.optimizer2 = torch.optim.Adam(self.student2.parameters(), lr=cfg.lr)
        self.grid, self.k, self.threshold = cfg.ucmt_grid, cfg.ucmt_topk, cfg.threshold
        self.cons_weight, self.rampup = cfg.cons_weight, cfg.rampup_epochs
        self.sup = SupervisedSegLoss()

    def state_dict(self) -> dict:
        """The second student's weights and optimiser state."""
        return {"student2": self.student2.state_dict(), "optimizer2": self.optimizer2.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (resume); an empty dict leaves the fresh second student."""
        if not state:
            return
        self.student2.load_state_dict(state["student2"])
        self.optimizer2.load_state_dict(state["optimizer2"])

    def __call__(self, student: nn.Module, teacher: nn.Module, x_l: Tensor, y_l: Tensor, x_u: Tensor,
                 epoch: int, step: int, steps: int) -> tuple[Tensor, Tensor, dict[str, Tensor], float]:
        """Loss of student 1 at ``epoch`` (0-based), ``step`` of ``steps``; student 2 takes its own step here."""
        from .losses import sigmoid_rampup

        weight = self.cons_weight * sigmoid_rampup(epoch + step / steps, self.rampup)
        n_l = len(x_l)
        z1 = student(torch.cat([x_l, x_u]))  # (Bl + Bu, 1, H, W)
        z2 = self.student2(torch.cat([x_l, x_u]))
        with torch.no_grad():
            y_u = (torch.sigmoid(teacher(x_u)) > self.threshold).to(x_u.dtype)  # (Bu, 1, H, W)
            p_mean = (torch.sigmoid(z1[n_l:]) + torch.sigmoid(z2[n_l:])) / 2
            x_m, y_m = umix(x_u, y_u, binary_entropy(p_mean), self.grid, self.k)
        losses = []
        for net, z in ((student, z1), (self.student2, z2)):
            l_sup = self.sup(z[:n_l], y_l)
            l_semi = (self.sup(z[n_l:], y_u) + self.sup(net(x_m), y_m)) / 2
            losses.append((l_sup + weight * l_semi, l_sup, l_semi))
        self.optimizer2.zero_grad(set_to_none=True)
        losses[1][0].backward()
        self.optimizer2.step()
        loss, l_sup, l_semi = losses[0]
        return loss, l_sup, {"semi": l_semi}, weight


def make_baseline(cfg: Config, device: torch.device | str = "cpu") -> Any:
    """The step object for ``cfg.method`` if it is in :data:`BASELINE_METHODS` (on ``device``), else None."""
    if cfg.method == "bcp":
        return BCPStep(cfg)
    if cfg.method == "ucmt":
        return UCMTStep(cfg, device)
    return None
