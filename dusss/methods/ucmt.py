"""``method=ucmt``: a simplified UCMT, after Shen, Cao, Yang, Liu, Yang & Zaiane,
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
  unlabelled and on the UMIX images (the mean of the two); the students see the
  labelled and unlabelled images as one BatchNorm batch with ``bn_batch="joint"``,
  as two with ``"separate"`` (the Step-2 default, :func:`dusss.methods.base.bn_batches`).

The first student is the network that is validated, saved and tested.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import Config
from ..losses import SupervisedSegLoss
from ..unet import build_unet
from .base import Models, StepBatch, StepOutput, bn_batches
from .consistency import consistency_weight

__all__ = ["UCMT", "umix", "binary_entropy"]


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


class UCMT:
    """One simplified-UCMT step (settings: see the module docstring).

    Holds the second student and its optimiser (saved in the loop's
    ``last.pt`` through :meth:`state_dict`). :meth:`step` trains the second
    student itself and returns the first student's loss for the loop to
    optimise.
    """

    name: ClassVar[str] = "ucmt"
    label: ClassVar[str] = "UCMT (simplified)"
    summary: ClassVar[str] = "UCMT (simplified): two students, EMA teacher, uncertainty-guided patch mixing"
    uses_unlabelled: ClassVar[bool] = True
    uses_teacher: ClassVar[bool] = True
    uses_text: ClassVar[bool] = False
    distributed: ClassVar[bool] = False
    revision: ClassVar[int] = 2  # 2: reads bn_batch (default two BatchNorm batches); 1 always used one

    def __init__(self, cfg: Config, device: torch.device | str = "cpu") -> None:
        with torch.random.fork_rng(devices=[]):  # its own initialisation, leaving the loop's RNG untouched
            torch.manual_seed(cfg.seed + 5)
            memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
            self.student2 = build_unet(cfg).to(device).to(memory_format=memory).train()
        self.optimizer2 = torch.optim.Adam(self.student2.parameters(), lr=cfg.lr)
        self.grid, self.k, self.threshold = cfg.ucmt_grid, cfg.ucmt_topk, cfg.threshold
        self.cfg = cfg
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

    def step(self, models: Models, batch: StepBatch) -> StepOutput:
        """Loss of student 1; student 2 takes its own optimiser step here."""
        student, teacher = models.forward, models.teacher
        x_l, y_l, x_u = batch.x_l, batch.y_l, batch.x_u
        weight = consistency_weight(self.cfg, batch.epoch)
        n_l = len(x_l)
        sep = self.cfg.bn_batch == "separate"  # one BatchNorm batch (joint, as its authors) or two
        z1 = bn_batches(student, x_l, x_u, sep).float()  # (Bl + Bu, 1, H, W)
        z2 = bn_batches(self.student2, x_l, x_u, sep).float()
        with torch.no_grad():
            y_u = (torch.sigmoid(teacher(x_u)) > self.threshold).to(x_u.dtype)  # (Bu, 1, H, W)
            p_mean = (torch.sigmoid(z1[n_l:]) + torch.sigmoid(z2[n_l:])) / 2
            x_m, y_m = umix(x_u, y_u, binary_entropy(p_mean), self.grid, self.k)
        losses = []
        for net, z in ((student, z1), (self.student2, z2)):
            l_sup = self.sup(z[:n_l], y_l)
            l_semi = (self.sup(z[n_l:], y_u) + self.sup(net(x_m).float(), y_m)) / 2
            losses.append((l_sup + weight * l_semi, l_sup, l_semi))
        self.optimizer2.zero_grad(set_to_none=True)
        losses[1][0].backward()
        self.optimizer2.step()
        loss, l_sup, l_semi = losses[0]
        return StepOutput(loss, l_sup, {"semi": l_semi}, weight)
