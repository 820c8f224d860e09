"""What Mean Teacher, DuSSS and the CLIP-style row share: the teacher's perturbed view and the consistency term.

The paper gives no consistency weight, ramp-up or perturbation (see
``../shared/PAPER_NOTES.md``, docs: deviations); all three are config fields,
their defaults chosen by the validation study of ``python -m dusss study``:

- ``perturb``: how the two networks' views of an unlabelled image differ.
  ``"noise"`` (SSL4MIS's Mean Teacher): the teacher sees the image plus
  Gaussian noise, the student the image itself. ``"strong"``: weak/strong
  views, the teacher sees the (geometrically augmented) image, the student a
  photometrically distorted copy (random contrast/gamma and brightness, then
  noise). ``"none"``: both see the same image (the loop before this option).
  Noise is defined on the image's **own** scale: its standard deviation is
  ``noise_std`` times the per-image standard deviation of the input, clipped at
  two of those, so an image and a scaled copy get the same relative noise (the
  SSL4MIS recipe, sigma 0.1 clipped at 0.2, assumes z-scored images; on [0, 1]
  inputs with faint lesions the same absolute noise swamps them).
- ``cons_loss``: ``"bce"`` = soft-target cross-entropy to the teacher's
  probabilities (the form of the paper's Eqs. 15-16) or ``"mse"`` = squared
  error between student and target probabilities (Mean Teacher, SSL4MIS).
- ``cons_weight`` with the sigmoid ramp-up over ``rampup_epochs``
  (:func:`dusss.losses.sigmoid_rampup`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..config import Config
from ..losses import consistency_loss, sigmoid_rampup

__all__ = ["PERTURBATIONS", "Perturbation", "consistency_weight", "consistency_loss"]

PERTURBATIONS = ("noise", "strong", "none")


def _image_std(x: Tensor) -> Tensor:
    """Per-image standard deviation over channels and pixels, (B, 1, 1, 1), floored so a flat image gets no NaN."""
    return x.flatten(1).std(dim=1).clamp_min(1e-6).view(-1, 1, 1, 1)


class Perturbation:
    """The teacher's and the student's views of an unlabelled batch (module docstring), from a private generator.

    ``kind`` in :data:`PERTURBATIONS`; ``noise_std`` relative to each image's
    standard deviation. :meth:`views` returns ``(x_student, x_teacher)``. The
    generator's state is part of :meth:`state_dict`, so a resumed run draws
    what the uninterrupted one would have.
    """

    def __init__(self, kind: str = "noise", noise_std: float = 0.1, *, seed: int = 0) -> None:
        if kind not in PERTURBATIONS:
            raise ValueError(f"perturb = {kind!r} is not one of {PERTURBATIONS} (config key perturb)")
        if noise_std < 0:
            raise ValueError(f"noise_std = {noise_std!r} must be >= 0 (config key noise_std)")
        self.kind, self.noise_std = kind, float(noise_std)
        self.generator = torch.Generator().manual_seed(int(seed))

    @classmethod
    def from_config(cls, cfg: Config) -> "Perturbation":
        return cls(cfg.perturb, cfg.noise_std, seed=cfg.seed + 6)

    def _randn(self, shape: torch.Size, like: Tensor) -> Tensor:
        return torch.randn(shape, generator=self.generator).to(device=like.device, dtype=like.dtype)

    def _rand(self, n: int, like: Tensor) -> Tensor:
        return torch.rand(n, generator=self.generator).to(device=like.device, dtype=like.dtype).view(-1, 1, 1, 1)

    def noise(self, x: Tensor) -> Tensor:
        """Gaussian noise for ``x`` (B, C, H, W): sd ``noise_std`` x per-image sd of ``x``, clipped at 2 sd."""
        scale = self.noise_std * _image_std(x)  # (B, 1, 1, 1)
        return (self._randn(x.shape, x) * scale).clamp(-2 * scale, 2 * scale)

    def strong(self, x: Tensor) -> Tensor:
        """A photometrically distorted copy of ``x`` in [0, 1]: contrast x[0.75, 1.25] about the image mean,
        brightness +-0.25 image sd, then :meth:`noise`."""
        mean, sd = x.mean(dim=(1, 2, 3), keepdim=True), _image_std(x)
        contrast = 0.75 + 0.5 * self._rand(len(x), x)
        shift = (self._rand(len(x), x) - 0.5) * 0.5 * sd
        return (mean + contrast * (x - mean) + shift + self.noise(x)).clamp(0.0, 1.0)

    def views(self, x_u: Tensor) -> tuple[Tensor, Tensor]:
        """``(student view, teacher view)`` of the unlabelled batch ``x_u`` (B, C, H, W)."""
        if self.kind == "none" or self.noise_std == 0 and self.kind == "noise":
            return x_u, x_u
        if self.kind == "noise":
            return x_u, x_u + self.noise(x_u)
        return self.strong(x_u), x_u

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("generator") is not None:
            self.generator.set_state(state["generator"])


def consistency_weight(cfg: Config, epoch: float) -> float:
    """``cons_weight`` times the sigmoid ramp-up at ``epoch`` (a float: steps taken / steps per epoch)."""
    return cfg.cons_weight * sigmoid_rampup(epoch, cfg.rampup_epochs)
