"""Every DuSSS loss (Eqs. 6-17), EMA (Eq. 12) and the ramp-up against hand computations."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dusss.config import make_config
from dusss.losses import (
    MAX_LOGIT_SCALE, DualContrastiveLoss, Embedding, SSSInfoNCE, SupervisedSegLoss, TextGuidedLoss,
    TextGuidedSemiLoss, ema_update, mask_pool, merged_target, sigmoid_rampup,
)

A, B, LAM, EPS = 0.005, 4.0, 0.2, 1e-6


def _emb(n=5, d=6, k=4, seed=0, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(seed)
    s = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    mu = torch.randn(n, k, generator=g, dtype=dtype) * 2
    sigma = torch.rand(n, k, generator=g, dtype=dtype) + 0.2
    if grad:
        s, mu, sigma = (t.requires_grad_(True) for t in (s, mu, sigma))
    return Embedding(s, mu, sigma)


def _hand_sim_hat(x, y, a=A, b=B, lam=LAM, eps=EPS):
    n = x.s.shape[0]
    out = np.zeros((n, n))
    xs, xm, xg, ys, ym, yg = (t.detach().numpy() for t in (*x, *y))
    for i in range(n):
        for j in range(n):
            sim = float(np.dot(xs[i], ys[j]))
            d_s = float(np.sqrt(((xs[i] - ys[j]) ** 2).sum()))
            d2w = float(((xm[i] - ym[j]) ** 2).sum() + ((xg[i] - yg[j]) ** 2).sum())
            out[i, j] = 1 - (1 - sim) * math.exp(-lam * (a * d2w + b) / (d_s + eps))
    return out


def _hand_nce_rows(logits, mask=None):
    """Mean over rows of -mean over the row's positives of log softmax, with explicit loops."""
    n = logits.shape[0]
    mask = np.eye(n, dtype=bool) if mask is None else mask
    total = 0.0
    for i in range(n):
        lse = math.log(sum(math.exp(logits[i, j]) for j in range(n)))
        pos = [j for j in range(n) if mask[i, j]]
        total += -sum(logits[i, j] - lse for j in pos) / len(pos)
    return total / n


# ---------------------------------------------------------------- SSS-InfoNCE
def test_sss_infonce_matches_hand_computation():
    x, y = _emb(seed=1), _emb(seed=2)
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    out = SSSInfoNCE(a=A, b=B, lam=LAM, eps=EPS)(x, y, scale, return_dict=True)
    logits = _hand_sim_hat(x, y) / 0.07
    x2y, y2x = _hand_nce_rows(logits), _hand_nce_rows(logits.T)
    assert out["x2y"].item() == pytest.approx(x2y, rel=1e-9)
    assert out["y2x"].item() == pytest.approx(y2x, rel=1e-9)
    assert out["loss"].item() == pytest.approx((x2y + y2x) / 2, rel=1e-9)


def test_lambda_zero_and_sss_off_equal_plain_infonce():
    x, y = _emb(seed=3), _emb(seed=4)
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    cos = x.s @ y.s.T
    target = torch.arange(5)
    plain = 0.5 * (F.cross_entropy(cos * scale, target) + F.cross_entropy(cos.T * scale, target))
    lam0 = SSSInfoNCE(a=A, b=B, lam=0.0, eps=EPS)(x, y, scale)
    off = SSSInfoNCE(a=A, b=B, lam=LAM, use_sss=False)(x, y, scale)
    torch.testing.assert_close(lam0, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(off, plain, rtol=0, atol=0)
    # and SSS on with lambda > 0 is a different loss (the switch does something)
    assert abs(SSSInfoNCE(a=A, b=B, lam=LAM)(x, y, scale).item() - plain.item()) > 1e-3


def test_positive_mask_multi_positive_form():
    x, y = _emb(seed=5), _emb(seed=6)
    scale = torch.tensor(10.0, dtype=torch.float64)
    loss = SSSInfoNCE()
    diag = torch.eye(5, dtype=torch.bool)
    torch.testing.assert_close(loss(x, y, scale, diag), loss(x, y, scale))
    mask = diag.clone()
    mask[0, 3] = mask[3, 0] = True  # items 0 and 3 have identical reports
    mask[1, 2] = True  # and an asymmetric extra positive, to tell rows from columns
    got = loss(x, y, scale, mask, return_dict=True)
    logits = _hand_sim_hat(x, y) * 10.0
    assert got["x2y"].item() == pytest.approx(_hand_nce_rows(logits, mask.numpy()), rel=1e-9)
    assert got["y2x"].item() == pytest.approx(_hand_nce_rows(logits.T, mask.numpy().T), rel=1e-9)
    empty = diag.clone()
    empty[2, 2] = False
    with pytest.raises(ValueError, match="without any positive"):
        loss(x, y, scale, empty)
    with pytest.raises(ValueError, match="positive_mask has shape"):
        loss(x, y, scale, diag[:4, :4])


def test_duplicated_inputs_give_finite_loss_and_gradients():
    x = _emb(n=4, dtype=torch.float32, grad=True)
    dup = Embedding(*(torch.cat([t[:2], t[:2]]) for t in x))  # rows 0,1 repeated as 2,3
    dcl = DualContrastiveLoss(a=A, b=B, lam=LAM, eps=EPS)
    out = dcl(dup, dup, dup, dup)  # identical image, text and both views: D_s = 0 everywhere on the diagonal
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    for t in (*x, dcl.temperature.log_logit_scale):
        assert t.grad is not None and torch.isfinite(t.grad).all()


def test_gradcheck_sss_infonce_float64():
    def fn(s1, mu1, ls1, s2, mu2, ls2, log_scale):
        x = Embedding(F.normalize(s1, dim=-1), mu1, ls1.exp())
        y = Embedding(F.normalize(s2, dim=-1), mu2, ls2.exp())
        return SSSInfoNCE(a=0.05, b=1.0, lam=0.5)(x, y, log_scale.exp())

    x, y = _emb(n=3, d=4, k=3, seed=7), _emb(n=3, d=4, k=3, seed=8)
    inputs = [t.clone().requires_grad_(True) for t in (x.s, x.mu, x.sigma.log(), y.s, y.mu, y.sigma.log())]
    inputs.append(torch.tensor(math.log(5.0), dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-5)


# ---------------------------------------------------------------- DCL
def test_dcl_terms_weights_and_hand_values():
    i1, t1, i2, t2 = (_emb(seed=s) for s in (10, 11, 12, 13))
    dcl = DualContrastiveLoss(a=A, b=B, lam=LAM, eps=EPS, w_cmc=0.7, w_imc=0.3).double()
    out = dcl(i1, t1, i2, t2)
    assert set(out) == {"loss", "cmc", "imc", "imc_image", "imc_text", "tau"}
    assert out["tau"].item() == pytest.approx(0.07)
    scale = dcl.temperature().item()  # 1/0.07 as stored (the parameter was made in float32)

    def sym(x, y):
        logits = _hand_sim_hat(x, y) * scale
        return 0.5 * (_hand_nce_rows(logits) + _hand_nce_rows(logits.T))

    cmc, imc_i, imc_t = sym(i1, t1), sym(i1, i2), sym(t1, t2)
    assert out["cmc"].item() == pytest.approx(cmc, rel=1e-9)
    assert out["imc_image"].item() == pytest.approx(imc_i, rel=1e-9)
    assert out["imc_text"].item() == pytest.approx(imc_t, rel=1e-9)
    assert out["imc"].item() == pytest.approx((imc_i + imc_t) / 2, rel=1e-9)
    assert out["loss"].item() == pytest.approx(0.7 * cmc + 0.3 * (imc_i + imc_t) / 2, rel=1e-9)


def test_dcl_switches():
    i1, t1, i2, t2 = (_emb(seed=s) for s in (14, 15, 16, 17))
    full = DualContrastiveLoss().double()(i1, t1, i2, t2)
    cmc_only = DualContrastiveLoss(use_imc=False).double()(i1, t1)
    assert cmc_only["imc"].item() == 0.0 and cmc_only["imc_image"].item() == 0.0
    torch.testing.assert_close(cmc_only["loss"], full["cmc"])
    imc_only = DualContrastiveLoss(use_cmc=False).double()(i1, t1, i2, t2)
    assert imc_only["cmc"].item() == 0.0
    torch.testing.assert_close(imc_only["loss"], full["imc"])
    with pytest.raises(ValueError, match="use_cmc=False and use_imc=False"):
        DualContrastiveLoss(use_cmc=False, use_imc=False)
    with pytest.raises(ValueError, match="img2 and txt2"):
        DualContrastiveLoss()(i1, t1)


def test_dcl_temperature_is_learnable_and_clamped():
    dcl = DualContrastiveLoss.from_config(make_config("smoke", sss_lam=0.3, sss_a=0.01))
    assert dcl.nce.lam == 0.3 and dcl.nce.a == 0.01 and dcl.nce.b == 4.0
    assert sum(p.numel() for p in dcl.parameters()) == 1  # the one temperature
    with torch.no_grad():
        dcl.temperature.log_logit_scale.fill_(math.log(1000.0))
    i1, t1, i2, t2 = (_emb(seed=s, dtype=torch.float32) for s in (18, 19, 20, 21))
    out = dcl(i1, t1, i2, t2)
    assert out["tau"].item() == pytest.approx(1 / MAX_LOGIT_SCALE)


def test_from_config_reads_switches():
    cfg = make_config("smoke", {"use_sss": "false", "use_imc": "false", "w_cmc": "2.0", "tau_init": "0.1"})
    dcl = DualContrastiveLoss.from_config(cfg)
    assert (dcl.nce.use_sss, dcl.use_imc, dcl.w_cmc) == (False, False, 2.0)
    assert dcl.temperature().item() == pytest.approx(10.0)


# ---------------------------------------------------------------- L_tg and mask pooling
def test_mask_pool_matches_loops_and_handles_empty_masks():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    w = torch.rand(2, 1, 4, 5, generator=g, dtype=torch.float64)
    w[1] = 0.0  # empty mask for image 1
    got = mask_pool(feats, w)
    f, wn = feats.numpy(), w.numpy()
    for d in range(3):
        num = sum(f[0, d, h, x] * wn[0, 0, h, x] for h in range(4) for x in range(5))
        assert got[0, d].item() == pytest.approx(num / wn[0].sum(), rel=1e-12)
        assert got[1, d].item() == pytest.approx(f[1, d].mean(), rel=1e-12)  # falls back to the mean
    feats.requires_grad_(True)
    w.requires_grad_(True)
    mask_pool(feats, w).sum().backward()
    assert torch.isfinite(feats.grad).all() and torch.isfinite(w.grad).all()
    with pytest.raises(ValueError, match="resize the mask"):
        mask_pool(feats, w[:, :, :2])


def test_text_guided_loss_matches_hand_computation_and_gradcheck():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(4, 6, generator=g, dtype=torch.float64)
    t = torch.randn(4, 6, generator=g, dtype=torch.float64)
    loss = TextGuidedLoss(tau_init=0.07).double()
    vn = v.numpy() / np.linalg.norm(v.numpy(), axis=1, keepdims=True)
    tn = t.numpy() / np.linalg.norm(t.numpy(), axis=1, keepdims=True)
    logits = vn @ tn.T * loss.temperature().item()
    assert loss.temperature().item() == pytest.approx(1 / 0.07)
    expected = 0.5 * _hand_nce_rows(logits) + 0.5 * _hand_nce_rows(logits.T)
    assert loss(v, t).item() == pytest.approx(expected, rel=1e-9)
    inputs = (v.clone().requires_grad_(True), t.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(lambda a, b: loss(a, b), inputs, eps=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        loss(v, t[:3])


# ---------------------------------------------------------------- segmentation losses
def _bce(z, y):
    p = 1 / (1 + np.exp(-z))
    return float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))


def test_supervised_loss_is_pixelwise_bce():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 1, 3, 4, generator=g, dtype=torch.float64)
    y = (torch.rand(2, 1, 3, 4, generator=g) > 0.5).double()
    assert SupervisedSegLoss()(z, y).item() == pytest.approx(_bce(z.numpy(), y.numpy()), rel=1e-10)
    inputs = (z.clone().requires_grad_(True),)
    assert torch.autograd.gradcheck(lambda a: SupervisedSegLoss()(a, y), inputs)
    with pytest.raises(ValueError, match="must match"):
        SupervisedSegLoss()(z, y[:, :, :2])


def test_eq15_merges_logits_background_stays_background():
    """Teacher and text both say background: the merged pseudo label must be background.

    The authors' code adds probabilities, sigmoid(p_t + p_text) > 0.5 always, and fails this.
    """
    teacher = torch.full((1, 1, 2, 2), -3.0)  # p = 0.047
    text = torch.full((1, 1, 2, 2), -2.0)  # p = 0.12
    merged = merged_target(teacher, text)
    assert (merged < 0.5).all()
    assert merged[0, 0, 0, 0].item() == pytest.approx(1 / (1 + math.exp(5.0)))
    authors = torch.sigmoid(torch.sigmoid(teacher) + torch.sigmoid(text))
    assert (authors > 0.5).all()  # the probability merge would call this foreground
    # both foreground -> foreground; disagreement -> decided by the stronger evidence
    assert merged_target(torch.tensor(3.0), torch.tensor(2.0)).item() > 0.5
    assert merged_target(torch.tensor(4.0), torch.tensor(-1.0)).item() > 0.5
    assert merged_target(torch.tensor(-4.0), torch.tensor(1.0)).item() < 0.5


def test_text_guided_semi_loss_eqs_15_to_17():
    g = torch.Generator().manual_seed(3)
    zs, zt, zx = (torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    sig = lambda a: 1 / (1 + np.exp(-a))  # noqa: E731
    merged = _bce(zs.numpy(), sig(zt.numpy() + zx.numpy()))
    text = _bce(zs.numpy(), sig(zx.numpy()))
    out = TextGuidedSemiLoss()(zs, zt, zx, return_dict=True)
    assert out["merged"].item() == pytest.approx(merged, rel=1e-10)
    assert out["text"].item() == pytest.approx(text, rel=1e-10)
    assert out["semi"].item() == pytest.approx((merged + text) / 2, rel=1e-10)
    mt = TextGuidedSemiLoss()(zs, zt, return_dict=True)  # Mean-Teacher baseline
    assert mt["semi"].item() == pytest.approx(_bce(zs.numpy(), sig(zt.numpy())), rel=1e-10)
    assert mt["merged"].item() == mt["semi"].item() and mt["text"].item() == 0.0


def test_semi_targets_are_detached_and_gradient_is_p_minus_target():
    g = torch.Generator().manual_seed(4)
    zs, zt, zx = (torch.randn(1, 1, 2, 2, generator=g, dtype=torch.float64).requires_grad_(True) for _ in range(3))
    TextGuidedSemiLoss()(zs, zt, zx).backward()
    assert zt.grad is None and zx.grad is None  # nothing reaches teacher or VLM
    with torch.no_grad():
        target = 0.5 * (torch.sigmoid(zt + zx) + torch.sigmoid(zx))
        expected = (torch.sigmoid(zs) - target) / zs.numel()
    torch.testing.assert_close(zs.grad, expected)
    inputs = (zs.detach().clone().requires_grad_(True),)
    assert torch.autograd.gradcheck(lambda a: TextGuidedSemiLoss()(a, zt, zx), inputs)


# ---------------------------------------------------------------- EMA and ramp-up
def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))


def test_ema_update_eq12_with_ssl4mis_ramp():
    student = _net()
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(1.0)
    student.train()(torch.randn(2, 1, 5, 5))  # moves BN running stats, num_batches_tracked = 1
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    alpha_eff = ema_update(teacher, student, alpha=0.99, step=9)
    assert alpha_eff == pytest.approx(0.9)
    for name, value in teacher.state_dict().items():
        s = student.state_dict()[name]
        if value.dtype.is_floating_point:
            torch.testing.assert_close(value, 0.9 * before[name] + 0.1 * s)
        else:
            assert torch.equal(value, s)  # integer buffer copied
    assert ema_update(teacher, student, alpha=0.99, step=0) == 0.0  # step 0: plain copy
    for name, value in teacher.state_dict().items():
        torch.testing.assert_close(value, student.state_dict()[name])
    assert ema_update(teacher, student, alpha=0.99, step=10_000) == 0.99
    with pytest.raises(ValueError, match="differ"):
        ema_update(nn.Linear(2, 2), student, 0.99, 1)


def test_sigmoid_rampup():
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(5, 10) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(10, 10) == 1.0 and sigmoid_rampup(50, 10) == 1.0
    assert sigmoid_rampup(3, 0) == 1.0
    values = [sigmoid_rampup(t, 10) for t in range(11)]
    assert all(b > a for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="rampup_epochs"):
        sigmoid_rampup(1, -1)
