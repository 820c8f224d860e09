"""Semantic Similarity-Supervision (SSS), the paper's Eqs. 1-5, pairwise over a batch.

Every function takes a batch of ``N`` items on one side and ``M`` on the other
and returns an ``(N, M)`` matrix, so a contrastive loss can correct its whole
logit matrix at once. Notation (see ``PAPER_NOTES.md`` §1):

- ``s`` (·, D): L2-normalised projected embeddings, ``sim = s1 · s2``;
- ``mu`` (·, K), ``sigma`` (·, K): mean and *standard deviation* of the diagonal
  Gaussian embedding of the same token (``sigma = exp(log_sigma)``).

The chain is ``D_2W`` (Eq. 1) -> ``D_u = a·D_2W + b`` (Eq. 2) ->
``D̂_u = D_u / (D_s + eps)`` (Eq. 3, ``D_s = ‖s1 − s2‖₂``) ->
``D_SSS = exp(−λ·D̂_u)`` (Eq. 4) -> ``ŝim = 1 − (1 − sim)·D_SSS`` (Eq. 5).

Numerical safety. ``D_s`` is the Euclidean distance (not squared, unlike the
authors' code). Its derivative ``1/(2·D_s)`` is infinite for identical
embeddings, so it is computed as ``sqrt(clamp(‖s1‖² + ‖s2‖² − 2·s1·s2, min=eps²))``:
exact above ``eps``, equal to ``eps`` (with zero gradient) below it. With the
extra ``+ eps`` of Eq. 3, ``D̂_u ≤ D_u / (2·eps)`` stays finite, ``D_SSS``
underflows to 0 and ``ŝim`` to 1 for duplicates, and every gradient is finite.
All tensors are made on the inputs' device and in their dtype.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "wasserstein2", "uncertainty_level", "semantic_distance", "relative_uncertainty",
    "sss_weight", "uncertain_similarity", "sss_terms", "SSSTerms", "uncertain_similarity_from_cosine",
]


def _check_pair(name1: str, x1: Tensor, name2: str, x2: Tensor) -> None:
    """Raise a ValueError naming the tensors unless both are (·, F) with the same F."""
    if x1.dim() != 2 or x2.dim() != 2:
        raise ValueError(
            f"{name1} and {name2} must be 2-D (batch, features); got shapes {tuple(x1.shape)} and "
            f"{tuple(x2.shape)}. Flatten or pool the embeddings first."
        )
    if x1.shape[1] != x2.shape[1]:
        raise ValueError(
            f"{name1} has {x1.shape[1]} features but {name2} has {x2.shape[1]}; both sides must "
            "come from the same projection head."
        )


def _pairwise_sq_dist(x1: Tensor, x2: Tensor) -> Tensor:
    """``‖x1_i − x2_j‖²`` for all pairs, by the expansion (memory N·M, not N·M·F), clamped at 0."""
    sq = (x1 * x1).sum(-1, keepdim=True) + (x2 * x2).sum(-1).unsqueeze(0) - 2.0 * x1 @ x2.T  # (N, M)
    return sq.clamp_min(0.0)


def wasserstein2(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """Eq. 1: squared 2-Wasserstein distance between diagonal Gaussians, pairwise.

    ``D_2W[i, j] = ‖mu1_i − mu2_j‖² + ‖sigma1_i − sigma2_j‖²`` for
    ``mu1, sigma1`` of shape (N, K) and ``mu2, sigma2`` of shape (M, K), with
    ``sigma`` standard deviations (for diagonal covariances the Bures term of the
    general formula reduces to this). Returns an (N, M) tensor, ``>= 0``.
    """
    _check_pair("mu1", mu1, "mu2", mu2)
    _check_pair("sigma1", sigma1, "sigma2", sigma2)
    if mu1.shape != sigma1.shape or mu2.shape != sigma2.shape:
        raise ValueError(
            f"mu and sigma must have the same shape on each side; got mu1 {tuple(mu1.shape)}, "
            f"sigma1 {tuple(sigma1.shape)}, mu2 {tuple(mu2.shape)}, sigma2 {tuple(sigma2.shape)}"
        )
    return _pairwise_sq_dist(mu1, mu2) + _pairwise_sq_dist(sigma1, sigma2)  # (N, M)


def uncertainty_level(d2w: Tensor, *, a: float, b: float) -> Tensor:
    """Eq. 2: uncertainty level ``D_u = a · D_2W + b`` (elementwise); ``a`` must be positive."""
    if not a > 0:
        raise ValueError(f"SSS scale a = {a!r} must be > 0 (Eq. 2); the default is 0.005")
    return a * d2w + b


def semantic_distance(s1: Tensor, s2: Tensor, *, eps: float = 1e-6) -> Tensor:
    """``D_s = ‖s1 − s2‖₂`` pairwise (N, M), Euclidean and not squared, floored at ``eps``.

    For L2-normalised embeddings this is ``sqrt(2 − 2·sim)``. The floor
    (``sqrt(clamp(·, min=eps²))``) keeps the gradient finite (zero) for identical
    embeddings, where the exact derivative ``1/(2·D_s)`` would be infinite.
    """
    _check_pair("s1", s1, "s2", s2)
    return _pairwise_sq_dist(s1, s2).clamp_min(eps * eps).sqrt()  # (N, M)


def relative_uncertainty(d_u: Tensor, d_s: Tensor, *, eps: float = 1e-6) -> Tensor:
    """Eq. 3: relative uncertainty ``D̂_u = D_u / (D_s + eps)`` (elementwise).

    The paper writes ``D_u / D_s``; ``eps`` (PAPER_NOTES §1) keeps it finite
    for identical embeddings.
    """
    return d_u / (d_s + eps)


def sss_weight(d_hat_u: Tensor, *, lam: float) -> Tensor:
    """Eq. 4: ``D_SSS = exp(−λ · D̂_u)``, in (0, 1] for ``λ >= 0``; ``λ = 0`` gives 1 (no SSS)."""
    if lam < 0:
        raise ValueError(f"SSS lambda = {lam!r} must be >= 0 (Eq. 4); the default is 0.2")
    return torch.exp(-lam * d_hat_u)


class SSSTerms(NamedTuple):
    """Every intermediate of Eqs. 1-5, each (N, M): for inspection and plots."""

    sim: Tensor
    d2w: Tensor
    d_u: Tensor
    d_s: Tensor
    d_hat_u: Tensor
    d_sss: Tensor
    sim_hat: Tensor


def sss_terms(
    s1: Tensor, s2: Tensor, mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor,
    *, a: float = 0.005, b: float = 4.0, lam: float = 0.2, eps: float = 1e-6,
) -> SSSTerms:
    """Eqs. 1-5 with every intermediate returned (see :func:`uncertain_similarity`)."""
    _check_pair("s1", s1, "s2", s2)
    if s1.shape[0] != mu1.shape[0] or s2.shape[0] != mu2.shape[0]:
        raise ValueError(
            f"s and mu must describe the same items: s1 has {s1.shape[0]} rows, mu1 {mu1.shape[0]}; "
            f"s2 has {s2.shape[0]} rows, mu2 {mu2.shape[0]}"
        )
    sim = s1 @ s2.T  # (N, M) cosine for L2-normalised s
    d2w = wasserstein2(mu1, sigma1, mu2, sigma2)  # (N, M)
    d_u = uncertainty_level(d2w, a=a, b=b)
    d_s = semantic_distance(s1, s2, eps=eps)
    d_hat_u = relative_uncertainty(d_u, d_s, eps=eps)
    d_sss = sss_weight(d_hat_u, lam=lam)
    sim_hat = 1.0 - (1.0 - sim) * d_sss  # Eq. 5
    return SSSTerms(sim, d2w, d_u, d_s, d_hat_u, d_sss, sim_hat)


def uncertain_similarity(
    s1: Tensor, s2: Tensor, mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor,
    *, a: float = 0.005, b: float = 4.0, lam: float = 0.2, eps: float = 1e-6,
) -> Tensor:
    """Eq. 5: the SSS-corrected ("uncertainty") cosine similarity ``ŝim``, pairwise (N, M).

    ``ŝim = 1 − (1 − sim) · exp(−λ · (a·D_2W + b) / (D_s + eps))`` for
    L2-normalised ``s1`` (N, D), ``s2`` (M, D) and Gaussian embeddings
    ``mu1, sigma1`` (N, K), ``mu2, sigma2`` (M, K) (standard deviations). Since
    ``D_SSS ∈ (0, 1]``, ``sim <= ŝim <= 1``: uncertain pairs are pulled towards
    similarity 1, more so the larger ``D_u`` (the paper's Eq. 18). ``λ = 0``
    returns ``sim`` exactly. Defaults are ``dusss.config.Config``'s.
    """
    return sss_terms(s1, s2, mu1, sigma1, mu2, sigma2, a=a, b=b, lam=lam, eps=eps).sim_hat


def uncertain_similarity_from_cosine(
    sim: Tensor, d2w: Tensor, *, a: float = 0.005, b: float = 4.0, lam: float = 0.2, eps: float = 1e-6,
) -> Tensor:
    """Eq. 5 written in the cosine ``sim`` and ``D_2W`` alone, valid for unit-norm embeddings.

    For L2-normalised ``s``, ``D_s = sqrt(2 − 2·sim)``, so ``ŝim`` depends on the
    pair only through ``sim`` and ``D_2W`` (any broadcastable shapes). This is
    what the notebook plots and differentiates against; it equals
    :func:`uncertain_similarity` on unit vectors (a test checks it).
    """
    if sim.shape != d2w.shape:
        sim, d2w = torch.broadcast_tensors(sim, d2w)
    d_s = (2.0 - 2.0 * sim).clamp_min(eps * eps).sqrt()
    d_hat_u = relative_uncertainty(uncertainty_level(d2w, a=a, b=b), d_s, eps=eps)
    return 1.0 - (1.0 - sim) * sss_weight(d_hat_u, lam=lam)
