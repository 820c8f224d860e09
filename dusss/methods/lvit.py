"""``method=lvit``: Table 1's LViT row, semi-supervised LViT-T (Li et al. 2024) reading every image's report.

The student is :class:`dusss.lvit.LViTStudent`. LViT's semi-supervised
recipe (its paper, Sec. III; its public code has neither part) has two pieces,
both here:

- **EPI**, the Exponential Pseudo-label Iteration: a prototype model is first
  trained on the labelled images; it predicts a pseudo label for every
  unlabelled image, and each later pass replaces it by the exponential average
  ``P_t = β · P_{t-1} + (1 - β) · p_t`` of the previous pseudo label and the
  model's new prediction ``p_t``. Here the first ``lvit_pretrain_frac`` of the
  epochs train the labelled-only prototype; after that, each time the loop
  draws an unlabelled image (once per pass over the unlabelled split), its
  pseudo label (binarised at ``threshold``) supervises the prediction with
  ``L_sup``'s cross-entropy, and is then averaged with that prediction
  (``β = lvit_epi_beta``). The first draw after the prototype phase sets
  ``P_0`` to the model's prediction. Pseudo labels live in each image's
  un-augmented frame (:class:`EPIBank`, float16, CPU), taken to and from the
  augmented frame with the loop's augmentation parameters; the bank is part of
  :meth:`LViT.state_dict`, so a resumed run continues it exactly.
- **LV loss**, the Language-Vision loss: for each unlabelled image the
  labelled image whose report is most similar (cosine of the frozen
  encoder's sentence vectors) lends its mask as the *contrastive label*;
  ``L_LV = 1 - cos(p, contrastive label)``, the cosine of the two maps
  flattened (:class:`LVLoss`). The candidates are the step's labelled batch
  (LViT searches the whole labelled set), their reports and masks in the same
  augmented frames as their images.

``loss = L_sup + w(t) · (L_pseudo + lvit_lv_weight · L_LV)`` with ``w`` the
project's sigmoid ramp-up (``cons_weight``, ``rampup_epochs``) counted from
the end of the prototype phase. Labelled and unlabelled images pass through
the student as two batches (BatchNorm statistics apart).
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config
from ..data.augment import apply_params_batch
from ..losses import SupervisedSegLoss
from .base import Models, StepBatch, StepOutput
from .consistency import consistency_weight

__all__ = ["LViT", "EPIBank", "LVLoss", "invert_params_batch"]


def invert_params_batch(x: Tensor, params: list[dict], *, nearest: bool = False) -> Tensor:
    """Undo :func:`dusss.data.augment.apply_params_batch` for ``x`` (B, C, H, W): the rotation by ``-angle``,
    then the flip, then the quarter turns back (corners rotated out of view come back zero-filled)."""
    out = apply_params_batch(x, [{"angle": -float(p.get("angle", 0.0))} for p in params], nearest=nearest)
    out = apply_params_batch(out, [{"hflip": bool(p.get("hflip", False))} for p in params], nearest=nearest)
    return apply_params_batch(out, [{"k": -int(p.get("k", 0)) % 4} for p in params], nearest=nearest)


class EPIBank:
    """EPI's pseudo labels: one probability map per unlabelled image, in its un-augmented frame.

    :meth:`update` folds a prediction made on an augmented view into the
    image's label, ``P ← β · P + (1 - β) · p`` on the pixels that view shows
    (the first update sets ``P = p``, unseen pixels 0); :meth:`targets` returns
    the labels in the augmented frames of the current views. Maps are stored
    in float16 on the CPU, grown to the largest index seen.
    """

    def __init__(self, beta: float) -> None:
        self.beta = float(beta)
        self.labels = torch.zeros(0, 1, 1, 1, dtype=torch.float16)  # (N, 1, H, W)
        self.seen = torch.zeros(0, dtype=torch.bool)  # (N,)

    def _grow(self, idx: Tensor, shape: torch.Size) -> None:
        n = int(idx.max()) + 1
        if self.labels.shape[-2:] != shape[-2:]:
            if len(self.labels):
                raise ValueError(f"EPI pseudo labels are {tuple(self.labels.shape[-2:])} px, predictions "
                                 f"{tuple(shape[-2:])} px; a run keeps one image_size")
            self.labels = torch.zeros(0, 1, *shape[-2:], dtype=torch.float16)
        if n > len(self.labels):
            grow = n - len(self.labels)
            self.labels = torch.cat([self.labels, self.labels.new_zeros(grow, 1, *shape[-2:])])
            self.seen = torch.cat([self.seen, self.seen.new_zeros(grow)])

    def targets(self, idx: Tensor, params: list[dict], like: Tensor) -> tuple[Tensor, Tensor]:
        """Pseudo labels ``(B, 1, H, W)`` of images ``idx`` in the views ``params`` (on ``like``'s device and
        dtype) and whether each has one yet ``(B,)``."""
        self._grow(idx, like.shape)
        labels = apply_params_batch(self.labels[idx.cpu()].float(), params)  # (B, 1, H, W)
        return labels.to(like.device, like.dtype), self.seen[idx.cpu()].to(like.device)

    @torch.no_grad()
    def update(self, idx: Tensor, params: list[dict], probs: Tensor) -> None:
        """Fold ``probs`` (B, 1, H, W), predictions on the views ``params`` of images ``idx``, into their labels."""
        idx = idx.cpu()
        self._grow(idx, probs.shape)
        new = invert_params_batch(probs.detach().float().cpu(), params)  # (B, 1, H, W) un-augmented frame
        shown = invert_params_batch(torch.ones_like(new), params, nearest=True) > 0.5  # pixels this view shows
        old, seen = self.labels[idx].float(), self.seen[idx].view(-1, 1, 1, 1)
        averaged = torch.where(seen, self.beta * old + (1.0 - self.beta) * new, new)
        self.labels[idx] = torch.where(shown, averaged, torch.where(seen, old, torch.zeros_like(old))).half()
        self.seen[idx] = True

    def state_dict(self) -> dict:
        return {"labels": self.labels.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict) -> None:
        if "labels" in state:
            self.labels, self.seen = state["labels"].clone().half(), state["seen"].clone().bool()


class LVLoss(nn.Module):
    """LViT's Language-Vision loss: ``1 - cos(p_u, y_c)``, ``y_c`` the mask of the labelled image whose report is
    most similar to the unlabelled image's (module docstring).

    ``forward(prob_u (Bu, 1, H, W) probabilities, masks_l (Bl, 1, H, W), emb_u (Bu, D), emb_l (Bl, D))``:
    ``TextSim = cos(emb_u, emb_l)`` picks ``y_c`` per unlabelled image; the loss is
    the mean over images of one minus the cosine of the flattened maps (0 when
    ``p_u`` is a positive multiple of ``y_c``; an empty ``y_c`` gives 1 and no
    gradient). ``return_dict`` adds the picked indices and their text similarity.
    """

    def forward(self, prob_u: Tensor, masks_l: Tensor, emb_u: Tensor, emb_l: Tensor,
                return_dict: bool = False) -> Tensor | dict[str, Tensor]:
        text_sim = F.normalize(emb_u.float(), dim=1) @ F.normalize(emb_l.float(), dim=1).T  # (Bu, Bl)
        pick = text_sim.argmax(dim=1)  # (Bu,)
        contrast = masks_l[pick].to(prob_u.dtype)  # (Bu, 1, H, W) contrastive labels
        img_sim = F.cosine_similarity(prob_u.flatten(1), contrast.flatten(1), dim=1, eps=1e-8)  # (Bu,)
        loss = (1.0 - img_sim).mean()
        if return_dict:
            return {"lv": loss, "pick": pick, "text_sim": text_sim.gather(1, pick[:, None]).squeeze(1)}
        return loss


class LViT:
    """Table 1's LViT row: LViT-T with EPI pseudo labels and the LV loss on the unlabelled images."""

    name: ClassVar[str] = "lvit"
    label: ClassVar[str] = "LViT"
    summary: ClassVar[str] = ("LViT-T reading each image's report, EPI pseudo labels + LV loss on unlabelled images "
                              "(Table 1's LViT row)")
    student: ClassVar[str] = "lvit"
    uses_unlabelled: ClassVar[bool] = True
    uses_teacher: ClassVar[bool] = False
    uses_text: ClassVar[bool] = False  # the Step-1 VLM's maps: not read (the student reads the reports itself)
    distributed: ClassVar[bool] = False  # the EPI bank is per process: not run under torchrun

    def __init__(self, cfg: Config, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.sup, self.lv = SupervisedSegLoss(), LVLoss()
        self.epi = EPIBank(cfg.lvit_epi_beta)
        self.start = cfg.lvit_pretrain_frac * cfg.epochs  # epochs of the labelled-only prototype

    def step(self, models: Models, batch: StepBatch) -> StepOutput:
        if batch.texts_l is None:
            raise ValueError("method 'lvit' needs the labelled images' reports (StepBatch.texts_l); the loop fills "
                             "them for a student with needs_text")
        l_sup = self.sup(models.forward(batch.x_l, batch.texts_l).float(), batch.y_l)
        zero = l_sup.new_zeros(())
        if batch.epoch < self.start:  # the prototype: labelled images only
            return StepOutput(l_sup, l_sup, {"semi": zero, "pseudo": zero, "lv": zero}, 0.0)
        if batch.x_u is None or batch.texts_u is None or batch.idx_u is None or batch.aug_u is None:
            raise ValueError("method 'lvit' needs the unlabelled images with their reports, indices and augmentation "
                             "parameters (StepBatch.x_u, texts_u, idx_u, aug_u)")
        z_u = models.forward(batch.x_u, batch.texts_u).float()  # (Bu, 1, H, W)
        prob = torch.sigmoid(z_u)
        target, seen = self.epi.targets(batch.idx_u, batch.aug_u, prob)
        target = torch.where(seen.view(-1, 1, 1, 1), target, prob.detach())  # first draw: P_0 = the prediction
        l_pseudo = self.sup(z_u, (target > self.cfg.threshold).float())
        student = getattr(models.student, "module", models.student)
        l_lv = self.lv(prob, batch.y_l, student.sentence_embedding(batch.texts_u),
                       student.sentence_embedding(batch.texts_l))
        self.epi.update(batch.idx_u, batch.aug_u, prob)
        semi = l_pseudo + self.cfg.lvit_lv_weight * l_lv
        weight = consistency_weight(self.cfg, batch.epoch - self.start)
        return StepOutput(l_sup + weight * semi, l_sup, {"semi": semi, "pseudo": l_pseudo, "lv": l_lv}, weight)

    def state_dict(self) -> dict:
        return {"epi": self.epi.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epi.load_state_dict(state.get("epi", {}))
