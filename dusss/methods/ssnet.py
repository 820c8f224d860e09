"""``method=ssnet``: SS-Net (Wu, Wu, Wu, Ge & Cai, "Exploring smoothness and class-separation for
semi-supervised medical image segmentation", MICCAI 2022), as the authors' 2D (ACDC) code runs it
(github.com/ycwu1997/SS-Net, ``train_ss_2d.py``), for one foreground logit.

The student U-Net alone segments; SS-Net adds two terms, with ``p = σ(z)``::

    L = L_sup + w(t) · (L_lds + ssnet_sep_weight · (L_sep(labelled) + L_sep(unlabelled)))

- **Smoothness** ``L_lds`` (virtual adversarial training, Miyato et al. 2019):
  a random direction ``d ~ U(-0.5, 0.5)``, L2-normalised per image, is refined
  by ``ssnet_ip`` (1) power iterations, ``d ← normalise(∇_d D(σ(f(x + ξ d)), p))``
  with ``ξ = ssnet_xi`` (10); the adversarial perturbation ``r = ε d`` has L2 norm
  ``ε = ssnet_eps`` (6.0, the authors' 2D value) per image, and
  ``L_lds = D(σ(f(x + r)), sg[p])`` on every image of the batch (labelled and
  unlabelled). ``D`` is the authors' soft Dice distance over the classes
  (``softDiceLoss``), here the two classes background ``1 − p`` and foreground
  ``p``: ``D(a, b) = mean_c [1 − (2 Σ a_c b_c + s) / (Σ a_c² + Σ b_c² + s)]``,
  ``s = 1e-10``, sums over the whole batch. BatchNorm running statistics are not
  updated by the perturbed forward passes (the authors' ``_disable_tracking_bn_stats``).
  Every forward takes labelled and unlabelled images as one BatchNorm batch with
  ``bn_batch="joint"`` (as the authors), as two with ``"separate"`` (the Step-2
  default, :func:`dusss.methods.base.bn_batches`).
- **Class separation** ``L_sep`` on the last decoder features ``f``
  (``UNet.decode(.., features=True)``, one vector per pixel): a projection head
  ``g`` and a prediction head ``h`` (Linear-BN-ReLU-Linear, width
  ``ssnet_proj_dim`` = 32, as the authors'). The prototype ``P_c`` of class
  ``c`` is the mean of the L2-normalised projections ``g(f)`` (computed with
  ``g`` in eval mode, no gradient) of the labelled pixels of class ``c`` that the
  network predicts correctly; ``L_sep = (1/2) Σ_c mean_{i ∈ c} (1 − ĥ(g(f_i)) · P_c)``
  over the labelled pixels (class = ground truth) and, separately, the
  unlabelled pixels (class = pseudo label ``p > threshold``), ``ĥ`` L2-normalised.
  A class with fewer than two pixels in the batch keeps its last prototype (the
  authors' memory keeps a class's entries until new ones come).

``w(t) = ssnet_weight · exp(−5(1 − t)²)`` ramped over ``ssl_rampup_epochs`` (default: the whole run, as its authors; not the Mean-Teacher ``rampup_epochs``)
(authors: 0.1 over the run), ``ssnet_sep_weight`` = 0.1 (authors).

Simplified for binary logits (docs: deviations): (1) both classes are
separated; the authors' multi-class code leaves the background class out of
the memory, which for one foreground class would leave a single class and no
separation. (2) One prototype per class, the mean of the normalised
projections of *all* correctly predicted labelled pixels, replaces the
authors' memory of the 32 pixels ranked by learned self-attention selectors
and their learned distance weights; with uniform weights the authors' mean
distance to the memory ``mean_j (1 − ĥ · m̂_j)`` *is* ``1 − ĥ · mean_j m̂_j``, so
the simplification drops the selection and the weights, not the geometry.
(3) The clean prediction ``p`` of ``L_lds`` is the (detached) prediction of the
training forward pass (the authors make a second, identical forward pass:
identical here because this U-Net has no dropout). Further: ``L_sup`` is Eq. 14
(BCE) where the authors optimise Dice only (their CE is computed but unused),
Adam and the project's schedule instead of SGD. The heads are trained by the
loop's optimiser through the method's ``parameters()`` hook; their weights, the
prototypes and the random generator are in :meth:`SSNet.state_dict`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config
from ..losses import SupervisedSegLoss, sigmoid_rampup
from .base import Models, StepBatch, StepOutput, bn_batches, build_owned

__all__ = ["SSNet", "soft_dice_distance", "adversarial_perturbation", "frozen_bn_stats", "class_prototypes",
           "separation_loss", "N_CLASSES"]

N_CLASSES = 2  # background, foreground
_SMOOTH = 1e-10  # the authors' softDiceLoss smoothing


def soft_dice_distance(p: Tensor, q: Tensor) -> Tensor:
    """The authors' soft Dice distance for two classes: mean over {1 − p, p} of ``1 − (2Σab + s)/(Σa² + Σb² + s)``.

    ``p``, ``q`` (B, 1, H, W) foreground probabilities; sums run over the whole batch.
    """
    losses = []
    for a, b in ((1 - p, 1 - q), (p, q)):
        dice = (2 * (a * b).sum() + _SMOOTH) / ((a * a).sum() + (b * b).sum() + _SMOOTH)
        losses.append(1 - dice)
    return torch.stack(losses).mean()


def _unit_per_image(d: Tensor) -> Tensor:
    """``d`` (B, ...) divided by each image's L2 norm (+ 1e-8, as the authors)."""
    return d / (d.flatten(1).norm(dim=1).view(-1, *([1] * (d.dim() - 1))) + 1e-8)


@contextmanager
def frozen_bn_stats(model: nn.Module):
    """BatchNorm layers of ``model`` normalise with batch statistics but leave their running statistics alone."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


def adversarial_perturbation(model: nn.Module | Callable[[Tensor], Tensor], x: Tensor, p: Tensor, *, xi: float, eps: float, iterations: int,
                             generator: torch.Generator) -> Tensor:
    """The VAT perturbation ``ε d`` of ``x`` (B, C, H, W) against the prediction ``p`` (B, 1, H, W): norm ε per image.

    ``d`` starts as ``U(-0.5, 0.5)`` noise from ``generator``, normalised per
    image, and follows ``iterations`` power iterations ``d ← normalise(∇_d
    D(σ(model(x + ξ d)), p))`` (:func:`soft_dice_distance`). Only ``d`` receives
    gradients (the parameters' ``.grad`` are left alone); call inside
    :func:`frozen_bn_stats`.
    """
    d = _unit_per_image(torch.rand(x.shape, generator=generator, device=x.device) - 0.5)  # (B, C, H, W)
    p = p.detach()
    for _ in range(iterations):
        d = d.detach().requires_grad_(True)
        distance = soft_dice_distance(torch.sigmoid(model(x + xi * d).float()), p)
        (grad,) = torch.autograd.grad(distance, d)
        d = _unit_per_image(grad)
    return eps * d.detach()


def class_prototypes(emb: Tensor, labels: Tensor, n_classes: int = N_CLASSES) -> tuple[Tensor, Tensor]:
    """Class means of the L2-normalised rows of ``emb`` (N, D) by ``labels`` (N,) in [0, n_classes).

    Returns ``(prototypes (n_classes, D), counts (n_classes,))``; a class without rows has a zero prototype.
    """
    e = F.normalize(emb.float(), dim=1)  # (N, D)
    onehot = F.one_hot(labels.long(), n_classes).to(e.dtype)  # (N, n_classes)
    counts = onehot.sum(0)  # (n_classes,)
    return onehot.T @ e / counts.clamp_min(1).unsqueeze(1), counts


def separation_loss(q: Tensor, labels: Tensor, prototypes: Tensor, valid: Tensor) -> Tensor:
    """``(1/K) Σ_c mean_{i: labels_i = c} (1 − q̂_i · P_c)`` over the classes with a prototype and >= 2 rows.

    ``q`` (N, D) predicted embeddings (normalised here), ``labels`` (N,),
    ``prototypes`` (K, D), ``valid`` (K,) bool: which prototypes exist.
    """
    k = len(prototypes)
    distance = 1 - (F.normalize(q.float(), dim=1) * prototypes[labels.long()]).sum(1)  # (N,)
    loss = q.new_zeros((), dtype=torch.float32)
    for c in range(k):
        members = labels == c
        if bool(valid[c]) and int(members.sum()) > 1:
            loss = loss + distance[members].mean()
    return loss / k


def _head(d_in: int, d: int) -> nn.Sequential:
    """The authors' projection / prediction head: Linear, BatchNorm1d, ReLU, Linear."""
    return nn.Sequential(nn.Linear(d_in, d), nn.BatchNorm1d(d), nn.ReLU(inplace=True), nn.Linear(d, d))


class SSNet:
    """One SS-Net step (settings: see the module docstring); owns the two heads, the prototypes and a generator."""

    name: ClassVar[str] = "ssnet"
    label: ClassVar[str] = "SS-Net"
    summary: ClassVar[str] = "SS-Net: adversarial smoothness (VAT) and prototype class separation of decoder features"
    uses_unlabelled: ClassVar[bool] = True
    uses_teacher: ClassVar[bool] = False
    uses_text: ClassVar[bool] = False
    distributed: ClassVar[bool] = False
    revision: ClassVar[int] = 2  # 2: reads bn_batch (default two BatchNorm batches); 1 always used one

    def __init__(self, cfg: Config, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        dim = cfg.ssnet_proj_dim
        self.heads = build_owned(cfg, device, cfg.seed + 10, lambda: nn.ModuleDict(
            {"projection": _head(cfg.unet_base, dim), "prediction": _head(dim, dim)}))
        self.generator = torch.Generator(device=torch.device(device)).manual_seed(cfg.seed + 11)
        self.prototypes = torch.zeros(N_CLASSES, dim, device=device)  # (2, D) last prototype of each class
        self.valid = torch.zeros(N_CLASSES, dtype=torch.bool, device=device)
        self.sup = SupervisedSegLoss()

    def parameters(self) -> Iterator[nn.Parameter]:
        """The projection and prediction heads' parameters (trained by the loop's optimiser)."""
        return self.heads.parameters()

    def _embed(self, f: Tensor) -> Tensor:
        """``h(g(f))`` of every pixel of ``f`` (B, C, H, W): (B·H·W, D)."""
        rows = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])  # (B·H·W, C)
        return self.heads["prediction"](self.heads["projection"](rows))

    def update_prototypes(self, f_l: Tensor, y_l: Tensor, pred_l: Tensor) -> None:
        """Prototypes from the correctly predicted labelled pixels (projection head in eval mode, no gradient)."""
        rows = f_l.permute(0, 2, 3, 1).reshape(-1, f_l.shape[1])  # (Bl·H·W, C)
        labels = y_l.reshape(-1).long()
        correct = pred_l.reshape(-1) == labels
        if not bool(correct.any()):
            return
        projection = self.heads["projection"]
        with torch.no_grad():
            projection.eval()
            emb = projection(rows[correct].detach())  # (M, D)
            projection.train()
        protos, counts = class_prototypes(emb, labels[correct])
        fresh = counts > 1
        self.prototypes = torch.where(fresh.unsqueeze(1), protos.to(self.prototypes.dtype), self.prototypes)
        self.valid = self.valid | fresh

    def step(self, models: Models, batch: StepBatch) -> StepOutput:
        student, n_l, sep = models.student, len(batch.x_l), self.cfg.bn_batch == "separate"

        def forward(inp: Tensor) -> Tensor:  # the student on labelled + unlabelled images, as bn_batch says
            return bn_batches(student, inp[:n_l], inp[n_l:], sep)

        x = torch.cat([batch.x_l, batch.x_u])  # (Bl + Bu, 3, H, W)
        z, f = bn_batches(lambda xx: student.decode(student.encode(xx), features=True), batch.x_l, batch.x_u, sep)
        z = z.float()  # (B, 1, H, W) logits; f (B, base, H, W) features
        l_sup = self.sup(z[:n_l], batch.y_l)
        p = torch.sigmoid(z).detach()  # (B, 1, H, W)

        with frozen_bn_stats(student):
            r_adv = adversarial_perturbation(forward, x, p, xi=self.cfg.ssnet_xi, eps=self.cfg.ssnet_eps,
                                             iterations=self.cfg.ssnet_ip, generator=self.generator)
            l_lds = soft_dice_distance(torch.sigmoid(forward(x + r_adv.to(x.dtype)).float()), p)

        pred = (p > self.cfg.threshold).long()  # (B, 1, H, W) hard predictions / pseudo labels
        self.update_prototypes(f[:n_l], batch.y_l, pred[:n_l])
        l_sep_l = separation_loss(self._embed(f[:n_l]), batch.y_l.reshape(-1), self.prototypes, self.valid)
        l_sep_u = separation_loss(self._embed(f[n_l:]), pred[n_l:].reshape(-1), self.prototypes, self.valid)

        semi = l_lds + self.cfg.ssnet_sep_weight * (l_sep_l + l_sep_u)
        weight = self.cfg.ssnet_weight * sigmoid_rampup(batch.epoch, self.cfg.ssl_rampup_epochs)
        terms = {"semi": semi, "lds": l_lds, "sep_l": l_sep_l, "sep_u": l_sep_u}
        return StepOutput(l_sup + weight * semi, l_sup, terms, weight)

    def state_dict(self) -> dict:
        """The heads' weights, the prototypes and the generator (the heads' optimiser state is the loop's)."""
        return {"heads": self.heads.state_dict(), "prototypes": self.prototypes.cpu(), "valid": self.valid.cpu(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned; an empty dict leaves the fresh heads."""
        if not state:
            return
        self.heads.load_state_dict(state["heads"])
        self.prototypes = state["prototypes"].to(self.prototypes.device)
        self.valid = state["valid"].to(self.valid.device)
        self.generator.set_state(state["generator"])
