"""Eqs. 1-5 (dusss.sss) against plain-loop numpy computations, limits and float64 gradcheck."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dusss.sss import (
    relative_uncertainty, semantic_distance, sss_terms, sss_weight, uncertain_similarity,
    uncertain_similarity_from_cosine, uncertainty_level, wasserstein2,
)

A, B, LAM, EPS = 0.005, 4.0, 0.2, 1e-6


def _inputs(n=4, m=3, d=5, k=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s1 = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    s2 = F.normalize(torch.randn(m, d, generator=g, dtype=dtype), dim=-1)
    mu1, mu2 = torch.randn(n, k, generator=g, dtype=dtype) * 3, torch.randn(m, k, generator=g, dtype=dtype) * 3
    sig1 = torch.rand(n, k, generator=g, dtype=dtype) * 2 + 0.1
    sig2 = torch.rand(m, k, generator=g, dtype=dtype) * 2 + 0.1
    return s1, s2, mu1, sig1, mu2, sig2


def _hand_sss(s1, s2, mu1, sig1, mu2, sig2, a=A, b=B, lam=LAM, eps=EPS):
    """Eqs. 1-5 element by element with python loops over numpy arrays."""
    s1, s2, mu1, sig1, mu2, sig2 = (t.numpy() for t in (s1, s2, mu1, sig1, mu2, sig2))
    n, m = s1.shape[0], s2.shape[0]
    out = {k: np.zeros((n, m)) for k in ("d2w", "d_u", "d_s", "d_hat", "d_sss", "sim_hat")}
    for i in range(n):
        for j in range(m):
            d2w = sum((mu1[i, q] - mu2[j, q]) ** 2 + (sig1[i, q] - sig2[j, q]) ** 2 for q in range(mu1.shape[1]))
            sim = sum(s1[i, q] * s2[j, q] for q in range(s1.shape[1]))
            d_s = math.sqrt(sum((s1[i, q] - s2[j, q]) ** 2 for q in range(s1.shape[1])))
            d_u = a * d2w + b
            d_hat = d_u / (d_s + eps)
            d_sss = math.exp(-lam * d_hat)
            for key, val in zip(out, (d2w, d_u, d_s, d_hat, d_sss, 1 - (1 - sim) * d_sss)):
                out[key][i, j] = val
    return out


def test_wasserstein2_matches_loops():
    s1, s2, mu1, sig1, mu2, sig2 = _inputs()
    hand = _hand_sss(s1, s2, mu1, sig1, mu2, sig2)
    got = wasserstein2(mu1, sig1, mu2, sig2)
    assert got.shape == (4, 3)
    np.testing.assert_allclose(got.numpy(), hand["d2w"], rtol=1e-10, atol=1e-10)


def test_every_intermediate_of_eqs_1_to_5_matches_loops():
    args = _inputs(seed=1)
    hand = _hand_sss(*args)
    t = sss_terms(*args, a=A, b=B, lam=LAM, eps=EPS)
    np.testing.assert_allclose(t.d2w.numpy(), hand["d2w"], rtol=1e-10)
    np.testing.assert_allclose(t.d_u.numpy(), hand["d_u"], rtol=1e-10)
    np.testing.assert_allclose(t.d_s.numpy(), hand["d_s"], rtol=1e-9)
    np.testing.assert_allclose(t.d_hat_u.numpy(), hand["d_hat"], rtol=1e-9)
    np.testing.assert_allclose(t.d_sss.numpy(), hand["d_sss"], rtol=1e-9)
    np.testing.assert_allclose(t.sim_hat.numpy(), hand["sim_hat"], rtol=1e-9)
    np.testing.assert_allclose(uncertain_similarity(*args, a=A, b=B, lam=LAM, eps=EPS).numpy(), hand["sim_hat"], rtol=1e-9)


def test_helpers_are_the_single_equations():
    d2w = torch.tensor([[0.0, 10.0]], dtype=torch.float64)
    assert torch.allclose(uncertainty_level(d2w, a=0.5, b=2.0), torch.tensor([[2.0, 7.0]], dtype=torch.float64))
    d_hat = relative_uncertainty(torch.tensor([3.0]), torch.tensor([2.0]), eps=0.5)
    assert d_hat.item() == pytest.approx(3.0 / 2.5)
    assert sss_weight(torch.tensor([2.0]), lam=0.5).item() == pytest.approx(math.exp(-1.0))
    with pytest.raises(ValueError, match="a = 0"):
        uncertainty_level(d2w, a=0.0, b=1.0)
    with pytest.raises(ValueError, match="lambda"):
        sss_weight(d2w, lam=-1.0)


def test_semantic_distance_is_euclidean_not_squared():
    s1 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    s2 = torch.tensor([[0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    d = semantic_distance(s1, s2, eps=EPS)
    np.testing.assert_allclose(d.numpy(), [[math.sqrt(2), 2.0, math.sqrt(0.4 ** 2 + 0.8 ** 2)]], rtol=1e-12)
    # equals sqrt(2 - 2 sim) for unit vectors
    np.testing.assert_allclose(d.numpy(), np.sqrt(2 - 2 * (s1 @ s2.T).numpy()), rtol=1e-12)


def test_identical_embeddings_give_finite_values_and_gradients():
    s1, _, mu1, sig1, _, _ = _inputs(n=3, dtype=torch.float32)
    leaves = [t.clone().requires_grad_(True) for t in (s1, mu1, sig1)]
    s, mu, sig = leaves
    # the same tensors on both sides: D_s = 0 and D_2W = 0 on the diagonal
    sim_hat = uncertain_similarity(s, s, mu, sig, mu, sig, a=A, b=B, lam=LAM, eps=EPS)
    assert torch.isfinite(sim_hat).all()
    assert torch.allclose(sim_hat.diagonal(), torch.ones(3), atol=1e-6)
    sim_hat.sum().backward()
    for leaf in leaves:
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    # semantic distance alone: finite gradient at zero distance
    x = s1.clone().requires_grad_(True)
    semantic_distance(x, x, eps=EPS).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_lambda_zero_gives_plain_cosine():
    args = _inputs(seed=2)
    got = uncertain_similarity(*args, a=A, b=B, lam=0.0, eps=EPS)
    torch.testing.assert_close(got, args[0] @ args[1].T, rtol=0, atol=1e-12)


def test_large_uncertainty_drives_sim_hat_to_one():
    args = _inputs(seed=3)
    for b in (1e3, 1e5):
        got = uncertain_similarity(*args, a=A, b=b, lam=LAM, eps=EPS)
        assert torch.allclose(got, torch.ones_like(got), atol=1e-6)
    # the same through D_2W: Gaussians far apart, not through b
    s1, s2, mu1, sig1, mu2, sig2 = args
    far = uncertain_similarity(s1, s2, mu1 + 1e4, sig1, mu2, sig2, a=A, b=B, lam=LAM, eps=EPS)
    assert torch.allclose(far, torch.ones_like(far), atol=1e-6)


def test_sim_hat_increases_with_uncertainty_eq18():
    """Eq. 18: at fixed sim and D_s, ŝim grows strictly with D_u (through b and through D_2W)."""
    s1, s2, mu1, sig1, mu2, sig2 = _inputs(seed=4)
    values = [uncertain_similarity(s1, s2, mu1, sig1, mu2, sig2, a=A, b=b, lam=LAM, eps=EPS)
              for b in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)]
    for lo, hi in zip(values, values[1:]):
        assert (hi > lo).all()
    shifts = [0.0, 1.0, 5.0, 20.0]  # moving mu1 away from mu2 raises D_2W only
    by_mu = [uncertain_similarity(s1, s2, mu1 + d, sig1, mu2, sig2, a=A, b=B, lam=LAM, eps=EPS) for d in shifts]
    d2w = [wasserstein2(mu1 + d, sig1, mu2, sig2) for d in shifts]
    for k in range(len(shifts) - 1):
        grew = d2w[k + 1] > d2w[k]
        assert grew.any()
        assert (by_mu[k + 1][grew] > by_mu[k][grew]).all()
    # and sim <= ŝim <= 1 always
    sim = s1 @ s2.T
    assert (values[0] >= sim - 1e-12).all() and (values[-1] <= 1).all()


def test_gradcheck_float64():
    s1, s2, mu1, sig1, mu2, sig2 = _inputs(n=3, m=3, d=4, k=3, seed=5)

    def fn(a1, a2, m1, ls1, m2, ls2):
        # normalise inside, positive sigma via exp: the same constraints the model applies
        return uncertain_similarity(F.normalize(a1, dim=-1), F.normalize(a2, dim=-1), m1, ls1.exp(), m2, ls2.exp(),
                                    a=0.05, b=1.0, lam=0.5, eps=EPS)

    inputs = tuple(t.clone().requires_grad_(True) for t in (s1, s2, mu1, sig1.log(), mu2, sig2.log()))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


def test_bad_shapes_raise_clear_errors():
    s1, s2, mu1, sig1, mu2, sig2 = _inputs()
    with pytest.raises(ValueError, match="features"):
        uncertain_similarity(s1, s2[:, :3], mu1, sig1, mu2, sig2)
    with pytest.raises(ValueError, match="same items"):
        uncertain_similarity(s1, s2, mu1[:2], sig1[:2], mu2, sig2)
    with pytest.raises(ValueError, match="same shape"):
        wasserstein2(mu1, sig1[:, :2], mu2, sig2[:, :2])


def test_dtype_and_device_follow_the_inputs():
    args = _inputs(dtype=torch.float32)
    out = uncertain_similarity(*args)
    assert out.dtype == torch.float32 and out.device == args[0].device
    meta = uncertain_similarity(*(t.to("meta") for t in args))
    assert meta.device.type == "meta" and meta.shape == (4, 3)


def test_from_cosine_form_equals_the_embedding_form_on_unit_vectors():
    s1, s2, mu1, sig1, mu2, sig2 = _inputs(seed=6)
    full = uncertain_similarity(s1, s2, mu1, sig1, mu2, sig2, a=A, b=B, lam=LAM, eps=EPS)
    short = uncertain_similarity_from_cosine(s1 @ s2.T, wasserstein2(mu1, sig1, mu2, sig2), a=A, b=B, lam=LAM, eps=EPS)
    torch.testing.assert_close(short, full, rtol=1e-9, atol=1e-12)
    sim = torch.tensor([1.0, 0.5], requires_grad=True)  # sim = 1: D_s = 0
    out = uncertain_similarity_from_cosine(sim, torch.tensor(0.0))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(sim.grad).all()
