"""``method=mcnet``: MC-Net+ (Wu, Ge, Zhang, Xu, Zhang, Xia & Cai, "Mutual consistency learning for
semi-supervised medical image segmentation", MedIA 2022; MC-Net, MICCAI 2021, is its two-decoder form),
as the authors' 2D code runs it (github.com/ycwu1997/MC-Net, ``train_mcnet_2d.py``, ``mcnet2d_v2``).

One encoder (the student U-Net's) and ``mcnet_decoders`` decoders that differ
only in how they up-sample: the student's own decoder (LViT's 2x2 transposed
conv; the network that is validated, saved and tested), then
:class:`dusss.unet.UNetDecoder` copies with a 1x1 conv followed by bilinear,
nearest and bicubic interpolation (the authors' ``up_type`` 1, 2, 3; 3 decoders
= MC-Net+, 2 = MC-Net). Loss, with ``p_d = σ(z_d)`` over the whole batch
(labelled and unlabelled; one BatchNorm batch with ``bn_batch="joint"``, as the
authors' code, two with ``"separate"``, the Step-2 default,
:func:`dusss.methods.base.bn_batches`)::

    L = Σ_d L_sup(z_d) + w(t) · Σ_{i ≠ j} mean((p_i − sharpen(p_j))²)
    sharpen(p) = p^{1/T} / (p^{1/T} + (1 − p)^{1/T}),  T = mcnet_temperature (0.1)

For one foreground logit ``sharpen(σ(z)) = σ(z / T)`` exactly, and the MSE on
the foreground probability equals the authors' MSE over the two softmax
channels (the background channel gives the same squared errors), so the binary
form is the authors' loss, computed stably from the logits. As in the authors'
code the sharpened pseudo labels are *not* detached (the gradient reaches both
decoders of a pair) and the pair sum is not averaged. ``w(t) = mcnet_weight ·
exp(−5(1 − t)²)`` ramped over ``ssl_rampup_epochs`` (default: the whole run, as its authors; not the Mean-Teacher ``rampup_epochs``) (authors: 0.1 over the run).
Deviations: ``L_sup`` is Eq. 14 (BCE) where the authors optimise Dice only (their
CE is computed but unused), Adam and the project's schedule instead of SGD,
the decoders' output conv is LViT's 1x1 (the authors': 3x3) and the encoder
has no dropout. The extra decoders are trained by the loop's optimiser through
the method's ``parameters()`` hook; their weights are in :meth:`MCNet.state_dict`.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..config import Config
from ..losses import SupervisedSegLoss, sigmoid_rampup
from ..unet import UPSAMPLING, build_decoder
from .base import Models, StepBatch, StepOutput, bn_batches, build_owned

__all__ = ["MCNet", "sharpen", "mutual_consistency"]


def sharpen(p: Tensor, temperature: float) -> Tensor:
    """MC-Net's sharpening ``p^{1/T} / (p^{1/T} + (1 − p)^{1/T})`` of a foreground probability (elementwise)."""
    a, b = p.pow(1.0 / temperature), (1 - p).pow(1.0 / temperature)
    return a / (a + b)


def mutual_consistency(logits: list[Tensor], temperature: float) -> Tensor:
    """``Σ_{i ≠ j} mean((σ(z_i) − sharpen(σ(z_j)))²)`` over the decoders' logits (each (B, 1, H, W)).

    ``sharpen(σ(z)) = σ(z / T)`` is used for stability; nothing is detached.
    """
    probs = [torch.sigmoid(z) for z in logits]
    pseudo = [torch.sigmoid(z / temperature) for z in logits]  # sharpened soft pseudo labels
    terms = [((probs[i] - pseudo[j]) ** 2).mean() for i in range(len(logits)) for j in range(len(logits)) if i != j]
    return torch.stack(terms).sum()


class MCNet:
    """One MC-Net+ step (settings: see the module docstring); owns the extra decoders."""

    name: ClassVar[str] = "mcnet"
    label: ClassVar[str] = "MC-Net"
    summary: ClassVar[str] = "MC-Net+: decoders with different up-sampling, each pulled to the others' sharpened labels"
    uses_unlabelled: ClassVar[bool] = True
    uses_teacher: ClassVar[bool] = False
    uses_text: ClassVar[bool] = False
    distributed: ClassVar[bool] = False
    revision: ClassVar[int] = 2  # 2: reads bn_batch (default two BatchNorm batches); 1 always used one

    def __init__(self, cfg: Config, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.upsampling = UPSAMPLING[1:cfg.mcnet_decoders]  # the student's own decoder is UPSAMPLING[0]
        self.decoders = build_owned(cfg, device, cfg.seed + 9,
                                    lambda: nn.ModuleList(build_decoder(cfg, mode) for mode in self.upsampling))
        self.sup = SupervisedSegLoss()

    def parameters(self) -> Iterator[nn.Parameter]:
        """The extra decoders' parameters (trained by the loop's optimiser)."""
        return self.decoders.parameters()

    def step(self, models: Models, batch: StepBatch) -> StepOutput:
        student, n_l, sep = models.student, len(batch.x_l), self.cfg.bn_batch == "separate"
        feats = bn_batches(student.encode, batch.x_l, batch.x_u, sep)  # 5 maps of Bl + Bu images
        f_l, f_u = [f[:n_l] for f in feats], [f[n_l:] for f in feats]
        logits = [bn_batches(dec, f_l, f_u, sep).float()
                  for dec in [student.decode, *self.decoders]]  # each (Bl + Bu, 1, H, W)
        sups = [self.sup(z[:n_l], batch.y_l) for z in logits]
        l_sup = torch.stack(sups).sum()
        l_mc = mutual_consistency(logits, self.cfg.mcnet_temperature)
        weight = self.cfg.mcnet_weight * sigmoid_rampup(batch.epoch, self.cfg.ssl_rampup_epochs)
        return StepOutput(l_sup + weight * l_mc, l_sup, {"semi": l_mc, "sup_main": sups[0]}, weight)

    def state_dict(self) -> dict:
        """The extra decoders' weights (their optimiser state is the loop's)."""
        return {"decoders": self.decoders.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned; an empty dict leaves the fresh decoders."""
        if state:
            self.decoders.load_state_dict(state["decoders"])
