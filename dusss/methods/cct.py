"""``method=cct``: Cross-Consistency Training (Ouali, Hudelot & Tami, CVPR 2020) as SSL4MIS runs it in 2D.

One encoder (the student U-Net's), its own decoder (the *main* decoder: the
network that is validated, saved and tested) and ``cct_aux`` auxiliary
decoders of the same shape (:class:`dusss.unet.UNetDecoder`, transposed conv),
each reading a *perturbed* copy of every encoder feature map
(``UNet.encode``: the five skips). The perturbations are SSL4MIS's
(``networks/unet.py``), cycled over the auxiliary decoders:

- ``noise``: ``f + f * n``, ``n ~ U(-cct_noise, cct_noise)`` drawn once per
  channel and pixel and shared by the batch (CCT's feature noise, 0.3);
- ``dropout``: dropout of the features at rate ``cct_dropout`` (0.3), kept
  values scaled by ``1 / (1 - rate)``;
- ``feature_drop``: the pixels whose channel-mean activation is at least
  ``u x`` its image's maximum are zeroed, ``u ~ U(cct_drop_low, cct_drop_high)``
  (0.7, 0.9) drawn once per feature map (CCT's feature dropout).

Loss, with ``p = σ(z)`` and ``K = cct_aux``::

    L = (L_sup(main) + Σ_k L_sup(aux_k)) / (K + 1)
        + w(t) · (1/K) Σ_k mean((p_aux_k(x_u) − sg[p_main(x_u)])²)

``L_sup`` is Eq. 14 (BCE) on the labelled images; the consistency is on the
unlabelled images, to the main decoder's *detached* probability (CCT's
``output_ul.detach()``; SSL4MIS lets the gradient reach the main decoder too);
``w(t) = cct_weight · exp(−5(1 − t)²)`` ramped over ``ssl_rampup_epochs`` (default: the whole run, as its authors; not the Mean-Teacher ``rampup_epochs``)
(SSL4MIS: 0.1 over the run). Labelled and unlabelled images pass the network
as one BatchNorm batch with ``bn_batch="joint"`` (as its authors), as two with
``"separate"`` (the Step-2 default, :func:`dusss.methods.base.bn_batches`). The auxiliary decoders are trained by the loop's optimiser
through the method's ``parameters()`` hook (:mod:`dusss.methods.base`); their
weights and the perturbation generator are in :meth:`CCT.state_dict`.
Deviations from SSL4MIS: BCE instead of (CE + Dice) / 2, Adam and the
project's schedule instead of SGD with poly decay, and the detached target.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..config import Config
from ..losses import SupervisedSegLoss, consistency_loss, sigmoid_rampup
from ..unet import build_decoder
from .base import Models, StepBatch, StepOutput, bn_batches, build_owned

__all__ = ["CCT", "FEATURE_PERTURBATIONS", "FeaturePerturbation"]

FEATURE_PERTURBATIONS = ("noise", "dropout", "feature_drop")  # auxiliary decoder k uses the (k mod 3)-th


class FeaturePerturbation:
    """SSL4MIS's three perturbations of a feature map (module docstring), drawn from a private generator.

    The generator lives on the training device (no host-to-device copies of
    full-size masks) and its state is part of :meth:`state_dict`, so a resumed
    run draws what the uninterrupted one would have.
    """

    def __init__(self, noise: float = 0.3, dropout: float = 0.3, drop_low: float = 0.7, drop_high: float = 0.9, *,
                 seed: int = 0, device: torch.device | str = "cpu") -> None:
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"cct_dropout = {dropout!r} must be in [0, 1)")
        if not 0.0 < drop_low <= drop_high <= 1.0:
            raise ValueError(f"cct_drop_low, cct_drop_high = {drop_low!r}, {drop_high!r} must satisfy 0 < low <= high <= 1")
        self.noise_range, self.rate, self.low, self.high = float(noise), float(dropout), float(drop_low), float(drop_high)
        self.generator = torch.Generator(device=torch.device(device)).manual_seed(int(seed))

    def _rand(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        return torch.rand(shape, generator=self.generator, device=like.device)

    def noise(self, f: Tensor) -> Tensor:
        """``f + f * n``, ``n ~ U(-r, r)`` of shape (C, h, w), the same for every image of the batch."""
        n = (2 * self._rand(tuple(f.shape[1:]), f) - 1) * self.noise_range  # (C, h, w)
        return f + f * n.to(f.dtype).unsqueeze(0)

    def dropout(self, f: Tensor) -> Tensor:
        """Dropout at rate ``cct_dropout`` (the training-mode ``F.dropout``), from the private generator."""
        keep = self._rand(tuple(f.shape), f) >= self.rate  # (B, C, h, w)
        return f * keep.to(f.dtype) / (1.0 - self.rate)

    def feature_drop(self, f: Tensor) -> Tensor:
        """Zero the pixels whose channel-mean activation is >= ``u`` x the image's maximum, ``u ~ U(low, high)``."""
        attention = f.mean(dim=1, keepdim=True)  # (B, 1, h, w)
        peak = attention.flatten(1).max(dim=1).values.view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        u = self.low + (self.high - self.low) * self._rand((), f)  # one draw per map, as SSL4MIS
        return f * (attention < peak * u).to(f.dtype)

    def __call__(self, kind: str, feats: list[Tensor]) -> list[Tensor]:
        """Each map of ``feats`` perturbed by ``kind`` in :data:`FEATURE_PERTURBATIONS` (independent draws)."""
        if kind not in FEATURE_PERTURBATIONS:
            raise ValueError(f"feature perturbation {kind!r} is not one of {FEATURE_PERTURBATIONS}")
        return [getattr(self, kind)(f) for f in feats]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("generator") is not None:
            self.generator.set_state(state["generator"])


class CCT:
    """One CCT step (settings: see the module docstring); owns the auxiliary decoders."""

    name: ClassVar[str] = "cct"
    label: ClassVar[str] = "CCT"
    summary: ClassVar[str] = "CCT: auxiliary decoders on perturbed encoder features, consistent with the main decoder"
    uses_unlabelled: ClassVar[bool] = True
    uses_teacher: ClassVar[bool] = False
    uses_text: ClassVar[bool] = False
    distributed: ClassVar[bool] = False
    revision: ClassVar[int] = 2  # 2: reads bn_batch (default two BatchNorm batches); 1 always used one

    def __init__(self, cfg: Config, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.kinds = [FEATURE_PERTURBATIONS[k % len(FEATURE_PERTURBATIONS)] for k in range(cfg.cct_aux)]
        self.decoders = build_owned(cfg, device, cfg.seed + 7,
                                    lambda: nn.ModuleList(build_decoder(cfg) for _ in self.kinds))
        self.perturb = FeaturePerturbation(cfg.cct_noise, cfg.cct_dropout, cfg.cct_drop_low, cfg.cct_drop_high,
                                           seed=cfg.seed + 8, device=device)
        self.sup = SupervisedSegLoss()

    def parameters(self) -> Iterator[nn.Parameter]:
        """The auxiliary decoders' parameters (trained by the loop's optimiser)."""
        return self.decoders.parameters()

    def step(self, models: Models, batch: StepBatch) -> StepOutput:
        student, n_l, sep = models.student, len(batch.x_l), self.cfg.bn_batch == "separate"

        def parts(feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
            return [f[:n_l] for f in feats], [f[n_l:] for f in feats]

        feats = bn_batches(student.encode, batch.x_l, batch.x_u, sep)  # 5 maps of Bl + Bu images
        z_main = bn_batches(student.decode, *parts(feats), sep).float()  # (Bl + Bu, 1, H, W) from the clean features
        z_aux = [bn_batches(dec, *parts(self.perturb(kind, feats)), sep).float()
                 for dec, kind in zip(self.decoders, self.kinds)]
        l_main = self.sup(z_main[:n_l], batch.y_l)
        l_sup = (l_main + sum(self.sup(z[:n_l], batch.y_l) for z in z_aux)) / (1 + len(z_aux))
        target = torch.sigmoid(z_main[n_l:]).detach()  # (Bu, 1, H, W)
        l_cons = torch.stack([consistency_loss(z[n_l:], target, "mse") for z in z_aux]).mean()
        weight = self.cfg.cct_weight * sigmoid_rampup(batch.epoch, self.cfg.ssl_rampup_epochs)
        return StepOutput(l_sup + weight * l_cons, l_sup, {"semi": l_cons, "sup_main": l_main}, weight)

    def state_dict(self) -> dict:
        """The auxiliary decoders' weights and the perturbation generator (their optimiser state is the loop's)."""
        return {"decoders": self.decoders.state_dict(), "perturb": self.perturb.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned; an empty dict leaves the fresh decoders."""
        if not state:
            return
        self.decoders.load_state_dict(state["decoders"])
        self.perturb.load_state_dict(state["perturb"])
