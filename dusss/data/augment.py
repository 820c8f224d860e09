"""Joint geometric augmentation of image, mask, report and any cached map (``torchvision.transforms.v2``).

The LViT/DuSSS recipe is a random quarter turn plus flip, then a small random
rotation. For text-paired data the report must stay true, so the policy is a
parameter:

- ``"report-safe"`` (default): horizontal flip and a small rotation only. The
  flip swaps "left"/"right" in the report (:func:`dusss.data.text.flip_report`);
  a small rotation moves nothing across a lung third or image quadrant by much.
  Quarter turns and vertical flips are never drawn, since they make QaTa zone
  words false.
- ``"lvit"``: the full recipe (quarter turn k in 0..3, flip, rotation). Reports
  are rewritten for the MoNuSeg and BM-Seg grammars (their words name image
  regions, :func:`dusss.data.text.rotate_report`); for QaTa and free text the
  transform raises, because no true report exists after a quarter turn.
- ``"none"``: identity (parameters are still returned, so code paths agree).

:meth:`JointAugment.sample` draws a parameter dict, :func:`apply_params` applies
it to any (..., H, W) tensor -- the image, the mask (nearest) or a cached
text-guided map (bilinear) -- so the speed issue can reuse one draw.
"""
from __future__ import annotations

from typing import Any

import math

import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from .layout import DataError
from .registry import GRAMMARS
from .text import flip_report, rotate_report

__all__ = ["POLICIES", "JointAugment", "apply_params", "apply_params_batch", "transform_text"]

POLICIES = ("report-safe", "lvit", "none")


def apply_params(x: torch.Tensor, params: dict[str, Any], *, nearest: bool = False) -> torch.Tensor:
    """Apply a parameter dict from :meth:`JointAugment.sample` to ``x`` (..., H, W), same device and dtype.

    Order: quarter turn (``torch.rot90`` counter-clockwise, ``k`` times), then
    horizontal flip, then rotation by ``angle`` degrees about the centre with
    zero fill. ``nearest=True`` (masks, label maps) keeps values in their set;
    otherwise bilinear (images, probability maps). A ``tv_tensors.Mask`` input
    is always resampled with nearest neighbour.
    """
    nearest = nearest or isinstance(x, tv_tensors.Mask)
    out = x
    if params.get("k", 0) % 4:
        out = torch.rot90(out, params["k"] % 4, dims=(-2, -1))
    if params.get("hflip", False):
        out = TF.horizontal_flip(out)
    angle = float(params.get("angle", 0.0))
    if angle:
        mode = TF.InterpolationMode.NEAREST if nearest else TF.InterpolationMode.BILINEAR
        squeeze = out.ndim == 2
        work = out[None] if squeeze else out  # rotate needs (..., C, H, W)
        work = TF.rotate(work, angle, interpolation=mode, fill=0.0)
        out = work[0] if squeeze else work
    return out


def apply_params_batch(x: torch.Tensor, params: list[dict[str, Any]], *, nearest: bool = False) -> torch.Tensor:
    """:func:`apply_params` for a batch ``x`` (B, C, H, W) with one parameter dict per image, in a few tensor ops.

    Quarter turns per image, flips by one ``torch.where``, rotations by one
    ``affine_grid`` + ``grid_sample`` (bilinear, or nearest for masks; zero
    fill) for the whole batch: the training loop augments its batches with
    this instead of transforming images one by one. Agrees with
    :func:`apply_params` up to interpolation at the rotated borders.
    """
    if x.ndim != 4 or len(params) != len(x):
        raise ValueError(f"apply_params_batch needs (B, C, H, W) and B parameter dicts; got {tuple(x.shape)} and "
                         f"{len(params)}")
    out = x
    ks = [int(p.get("k", 0)) % 4 for p in params]
    if any(ks):
        out = torch.stack([torch.rot90(img, k, dims=(-2, -1)) if k else img for img, k in zip(out, ks)])
    flips = torch.tensor([bool(p.get("hflip", False)) for p in params], device=x.device)
    if bool(flips.any()):
        out = torch.where(flips.view(-1, 1, 1, 1), out.flip(-1), out)
    angles = [float(p.get("angle", 0.0)) for p in params]
    if any(angles):
        rad = torch.tensor([math.radians(a) for a in angles], dtype=torch.float32, device=x.device)
        cos, sin = rad.cos(), rad.sin()
        zero = torch.zeros_like(cos)
        # output pixel -> input pixel: the inverse of a counter-clockwise turn on screen (y down), as TF.rotate
        theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)  # (B, 2, 3)
        grid = F.affine_grid(theta, list(out.shape), align_corners=False)  # (B, H, W, 2)
        work = out.float()
        work = F.grid_sample(work, grid, mode="nearest" if nearest else "bilinear", padding_mode="zeros",
                             align_corners=False)
        out = work.to(out.dtype)
    return out


def transform_text(text: str, params: dict[str, Any], grammar: str) -> str:
    """The report of the transformed image: quarter turns first, then the flip (as :func:`apply_params`)."""
    k = params.get("k", 0) % 4
    if k:
        text = rotate_report(text, k, grammar)
    if params.get("hflip", False):
        text = flip_report(text, grammar)
    return text


class JointAugment:
    """Draw one geometric transform and apply it to an image (C, H, W) and its mask (1, H, W).

    ``policy`` is ``report-safe``, ``lvit`` or ``none`` (module docstring);
    ``p_flip``, ``p_rot90`` and ``p_rotate`` are the probabilities of each
    part, ``max_angle`` the rotation range in degrees (LViT uses 20; 10 keeps
    lesions inside their third). Calling the object returns
    ``(image, mask, params)``; the mask stays binary. Draws come from torch's
    global RNG (seeded by ``seed_everything`` and re-seeded per DataLoader
    worker, so workers do not repeat each other), or from a private generator
    when ``seed`` is given.
    """

    def __init__(self, policy: str = "report-safe", *, p_flip: float = 0.5, p_rot90: float = 0.5,
                 p_rotate: float = 0.5, max_angle: float = 10.0, seed: int | None = None):
        if policy not in POLICIES:
            raise DataError(f"augmentation policy {policy!r} is not one of {POLICIES}")
        for key, val in (("p_flip", p_flip), ("p_rot90", p_rot90), ("p_rotate", p_rotate)):
            if not 0.0 <= val <= 1.0:
                raise DataError(f"augmentation {key}={val} must be in [0, 1]")
        if max_angle < 0:
            raise DataError(f"augmentation max_angle={max_angle} must be >= 0 degrees")
        self.policy, self.p_flip, self.p_rot90, self.p_rotate, self.max_angle = policy, p_flip, p_rot90, p_rotate, max_angle
        self.generator = None if seed is None else torch.Generator().manual_seed(int(seed))

    def _uniform(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def sample(self) -> dict[str, Any]:
        """A parameter dict ``{"k": int, "hflip": bool, "angle": float}`` drawn under the policy."""
        if self.policy == "none":
            return {"k": 0, "hflip": False, "angle": 0.0}
        k = 1 + min(2, int(3 * self._uniform())) if self.policy == "lvit" and self._uniform() < self.p_rot90 else 0
        hflip = self._uniform() < self.p_flip
        angle = (2 * self._uniform() - 1) * self.max_angle if self._uniform() < self.p_rotate else 0.0
        return {"k": k, "hflip": hflip, "angle": angle}

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, params: dict[str, Any] | None = None):
        """``(image, mask, params)`` after one drawn (or the given) transform; image bilinear, mask nearest."""
        params = self.sample() if params is None else params
        out_image = apply_params(tv_tensors.Image(image), params).as_subclass(torch.Tensor)
        out_mask = apply_params(tv_tensors.Mask(mask), params).as_subclass(torch.Tensor)
        return out_image, out_mask, params

    def check_grammar(self, grammar: str) -> None:
        """Raise ``DataError`` now if some draw of this policy would make a ``grammar`` report false.

        Called by :class:`dusss.data.LViTDataset` when it is built, so a bad
        combination fails at once instead of inside a DataLoader worker. What a
        grammar survives is its :class:`dusss.data.registry.GrammarSpec`
        (``flips``, ``turns``).
        """
        if self.policy == "none":
            return
        spec = GRAMMARS.get(grammar)
        if self.p_flip > 0 and not (spec and spec.flips):
            raise DataError(f"augmentation {self!r} flips images, but reports of grammar {grammar!r} cannot be "
                            f"rewritten; use JointAugment(p_flip=0) (rotations only) or a known grammar")
        if self.policy == "lvit" and self.p_rot90 > 0 and not (spec and spec.turns):
            raise DataError(f"augmentation {self!r} draws quarter turns, which make {grammar!r} reports false; "
                            f"use policy='report-safe' or p_rot90=0")

    def transform_text(self, text: str, params: dict[str, Any], grammar: str) -> str:
        """The report of the transformed image (``ValueError`` when the policy makes it false)."""
        return transform_text(text, params, grammar)

    def __repr__(self) -> str:
        return (f"JointAugment(policy={self.policy!r}, p_flip={self.p_flip}, p_rot90={self.p_rot90}, "
                f"p_rotate={self.p_rotate}, max_angle={self.max_angle})")
