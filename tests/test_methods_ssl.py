"""CCT, MC-Net and SS-Net (dusss.methods.cct / mcnet / ssnet): their defining pieces by hand, then the real loop.

The last tests train each method a few epochs through :func:`dusss.ssmis.train_ssmis` on smoke data (32 px,
U-Net base 4) and check that the loss fell, the saved student predicts one logit map per image, and an
interrupted run resumes to the same numbers.
"""
import copy
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from dusss.config import ConfigError, make_config
from dusss.methods import METHODS, Models, StepBatch, optimizer_groups
from dusss.methods.cct import CCT, FeaturePerturbation
from dusss.methods.mcnet import MCNet, mutual_consistency, sharpen
from dusss.methods.ssnet import (SSNet, adversarial_perturbation, class_prototypes, frozen_bn_stats,
                                 separation_loss, soft_dice_distance)
from dusss.unet import build_unet

SIZE = 32


def _cfg(method, **kw):
    kw.setdefault("bn_batch", "joint")  # the hand computations below follow the authors' one BatchNorm batch
    return make_config("smoke", image_size=SIZE, unet_base=4, method=method, **kw)


def _data(n_l=2, n_u=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_l, x_u = torch.rand(n_l, 3, SIZE, SIZE, generator=g), torch.rand(n_u, 3, SIZE, SIZE, generator=g)
    return x_l, (x_l[:, :1] > 0.6).float(), x_u


def _batch(x_l, y_l, x_u, epoch=0.5):
    return StepBatch(x_l, y_l, x_u, None, 3, 40, epoch)


def test_registry_config_and_optimiser_groups():
    assert {"cct", "mcnet", "ssnet"} <= set(METHODS)
    assert all(not METHODS[n].uses_teacher and not METHODS[n].uses_text and METHODS[n].uses_unlabelled
               for n in ("cct", "mcnet", "ssnet"))
    cfg = make_config("smoke")
    assert (cfg.cct_aux, cfg.cct_weight, cfg.cct_noise, cfg.cct_dropout, cfg.cct_drop_low, cfg.cct_drop_high) == \
        (3, 0.1, 0.3, 0.3, 0.7, 0.9)
    assert (cfg.mcnet_decoders, cfg.mcnet_temperature, cfg.mcnet_weight) == (3, 0.1, 0.1)
    assert (cfg.ssnet_weight, cfg.ssnet_sep_weight, cfg.ssnet_eps, cfg.ssnet_xi, cfg.ssnet_ip, cfg.ssnet_proj_dim) == \
        (0.1, 0.1, 6.0, 10.0, 1, 32)
    for key, bad in (("mcnet_decoders", 5), ("mcnet_temperature", 0.0), ("cct_dropout", 1.0), ("cct_drop_low", 0.95),
                     ("ssnet_ip", 0), ("ssnet_xi", 0.0), ("cct_aux", 0)):
        with pytest.raises(ConfigError, match=key):
            make_config("smoke", **{key: bad})
    # the loop's optimiser: the student's group, then the method's own modules; none for methods without the hook
    student = build_unet(_cfg("cct"))
    groups = optimizer_groups(student, CCT(_cfg("cct")))
    assert len(groups) == 2 and len(groups[0]["params"]) == len(list(student.parameters()))
    assert len(optimizer_groups(student, METHODS["mt"](_cfg("mt"), "cpu"))) == 1

    class Leaky:
        def parameters(self):
            return student.parameters()

    with pytest.raises(ValueError, match="parameters of the student"):
        optimizer_groups(student, Leaky())


# ---------------------------------------------------------------------------------------------------------------- CCT
def test_feature_perturbations_are_ssl4mis_noise_dropout_and_feature_drop():
    f = torch.rand(3, 4, 8, 8) + 0.1  # positive, as after a ReLU
    pert = FeaturePerturbation(0.3, 0.3, 0.7, 0.9, seed=0)
    ratio = (pert.noise(f) - f) / f  # the multiplicative noise n
    assert torch.allclose(ratio, ratio[:1].expand_as(ratio), atol=1e-6)  # one draw per channel and pixel, shared
    assert ratio.abs().max() <= 0.3 + 1e-6 and ratio.std() > 0.1
    d = pert.dropout(f)
    dropped = d == 0
    assert torch.allclose(d[~dropped], f[~dropped] / 0.7)  # kept values rescaled by 1 / (1 - rate)
    assert 0.2 < dropped.float().mean() < 0.4
    for _ in range(5):
        fd = pert.feature_drop(f)
        zero = (fd == 0).all(dim=1)  # (B, h, w): a pixel is dropped in every channel or in none
        assert torch.equal(fd, f * (~zero).unsqueeze(1))
        att = f.mean(1) / f.mean(1).flatten(1).max(1).values.view(-1, 1, 1)  # channel mean / image maximum
        lo = max(float(att[i][~zero[i]].max()) for i in range(3))  # the threshold u lies above every kept pixel
        hi = min(float(att[i][zero[i]].min()) for i in range(3))  # and at or below every dropped one
        assert lo < hi and lo < 0.9 and hi >= 0.7
    state = pert.state_dict()
    a = pert.dropout(f)
    again = FeaturePerturbation(0.3, 0.3, 0.7, 0.9, seed=99)
    again.load_state_dict(state)
    assert torch.equal(again.dropout(f), a)  # the draws resume


def test_cct_auxiliary_decoders_see_perturbed_features_and_the_main_decoder_the_clean_ones():
    cfg = _cfg("cct")
    torch.manual_seed(0)
    student, method = build_unet(cfg), CCT(cfg)
    assert method.kinds == ["noise", "dropout", "feature_drop"] and len(method.decoders) == 3
    seen = {"aux": []}

    def record(key, pick):
        def hook(module, args):  # returns None: the inputs are left alone
            seen[key].append(pick(args)) if key == "aux" else seen.setdefault(key, pick(args))
        return hook

    for dec in method.decoders:
        dec.register_forward_pre_hook(record("aux", lambda args: [f.detach().clone() for f in args[0]]))
    student.up4.register_forward_pre_hook(record("main4", lambda args: [a.detach() for a in args]))
    student.up1.register_forward_pre_hook(record("main1", lambda args: args[1].detach()))
    x_l, y_l, x_u = _data()
    clean = student.encode(torch.cat([x_l, x_u]))
    out = method.step(Models(student, student, None), _batch(x_l, y_l, x_u))
    x1, x4, x5 = clean[0], clean[3], clean[4]
    assert torch.equal(seen["main4"][0], x5) and torch.equal(seen["main4"][1], x4) and torch.equal(seen["main1"], x1)
    noise, drop, fdrop = seen["aux"]
    for level in range(5):
        for pert in (noise, drop, fdrop):
            assert not torch.equal(pert[level], clean[level])  # every skip of every auxiliary decoder is perturbed
        nz = clean[level] > 0
        ratio = (noise[level][nz] - clean[level][nz]) / clean[level][nz]
        assert ratio.abs().max() <= 0.3 + 1e-5
        kept = drop[level] != 0
        assert torch.allclose(drop[level][kept], clean[level][kept] / 0.7, atol=1e-6)
        assert ((fdrop[level] == 0).all(1) | (fdrop[level] == clean[level]).all(1)).all()
    assert 0 < out.weight < cfg.cct_weight and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in method.parameters())


def test_cct_loss_against_a_hand_computation():
    cfg = _cfg("cct")
    torch.manual_seed(1)
    student, method = build_unet(cfg), CCT(cfg)
    x_l, y_l, x_u = _data(seed=1)
    state = method.perturb.state_dict()
    out = method.step(Models(student, student, None), _batch(x_l, y_l, x_u, epoch=2.0))
    replay = FeaturePerturbation(cfg.cct_noise, cfg.cct_dropout, cfg.cct_drop_low, cfg.cct_drop_high)
    replay.load_state_dict(state)
    feats = student.encode(torch.cat([x_l, x_u]))
    z_main = student.decode(feats)
    z_aux = [dec(replay(kind, feats)) for dec, kind in zip(method.decoders, method.kinds)]
    bce = [F.binary_cross_entropy_with_logits(z[:2], y_l) for z in [z_main, *z_aux]]
    p_main = torch.sigmoid(z_main[2:])
    cons = sum(((torch.sigmoid(z[2:]) - p_main) ** 2).mean() for z in z_aux) / 3
    assert out.weight == pytest.approx(0.1)  # ramp-up over (smoke) 1 epoch is complete at epoch 2
    assert torch.allclose(out.sup, sum(bce) / 4, atol=1e-6) and torch.allclose(out.terms["semi"], cons, atol=1e-7)
    assert torch.allclose(out.loss, sum(bce) / 4 + 0.1 * cons, atol=1e-6)
    # the consistency target is detached: its gradient reaches the auxiliary decoders, not the main one
    student.zero_grad()
    out.terms["semi"].backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for n, p in student.named_parameters()
               if n.startswith(("up", "outc")))
    assert any(p.grad.abs().max() > 0 for p in method.parameters())


# ------------------------------------------------------------------------------------------------------------- MC-Net
def test_sharpening_against_hand_values():
    p = torch.tensor([0.5, 0.6, 0.2, 0.45])
    hand = torch.tensor([0.5, 0.0060466176 / (0.0060466176 + 0.0001048576),  # 0.6^10 / (0.6^10 + 0.4^10)
                         1.024e-7 / (1.024e-7 + 0.1073741824), 0.11850053])  # 0.2^10 / (0.2^10 + 0.8^10)
    assert torch.allclose(sharpen(p, 0.1), hand, atol=1e-7)
    assert torch.allclose(sharpen(p, 1.0), p)  # T = 1: no sharpening
    z = torch.linspace(-6, 6, 25)
    assert torch.allclose(sharpen(torch.sigmoid(z), 0.1), torch.sigmoid(z / 0.1), atol=1e-6)  # σ(z / T)


def test_mutual_consistency_pulls_each_decoder_to_the_others_sharpened_labels():
    torch.manual_seed(0)
    logits = [torch.randn(2, 1, 4, 4, requires_grad=True) for _ in range(3)]
    probs = [torch.sigmoid(z) for z in logits]
    hand = sum(((probs[i] - sharpen(probs[j], 0.1)) ** 2).mean() for i in range(3) for j in range(3) if i != j)
    loss = mutual_consistency(logits, 0.1)
    assert torch.allclose(loss, hand, atol=1e-6)
    assert mutual_consistency([torch.full((1, 1, 2, 2), 50.0)] * 2, 0.1).item() == pytest.approx(0.0, abs=1e-12)
    loss.backward()
    assert all(torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0 for z in logits)


@pytest.mark.parametrize("n, modes", [(2, ["bilinear"]), (3, ["bilinear", "nearest"])])
def test_mcnet_decoders_differ_in_upsampling_and_the_loss_matches_by_hand(n, modes):
    cfg = _cfg("mcnet", mcnet_decoders=n)
    torch.manual_seed(0)
    student, method = build_unet(cfg), MCNet(cfg)
    assert isinstance(student.up4.up, torch.nn.ConvTranspose2d)  # the student's own decoder: transposed conv
    assert [dec.up4.up[1].mode for dec in method.decoders] == modes == [dec.upsample for dec in method.decoders]
    x_l, y_l, x_u = _data()
    out = method.step(Models(student, student, None), _batch(x_l, y_l, x_u, epoch=2.0))
    feats = student.encode(torch.cat([x_l, x_u]))
    logits = [student.decode(feats)] + [dec(feats) for dec in method.decoders]
    assert not torch.allclose(logits[0], logits[1])
    sup = sum(F.binary_cross_entropy_with_logits(z[:2], y_l) for z in logits)
    assert torch.allclose(out.loss, sup + 0.1 * mutual_consistency(logits, 0.1), atol=1e-6)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in method.parameters())


# ------------------------------------------------------------------------------------------------------------- SS-Net
def test_soft_dice_distance_against_hand_values():
    p = torch.tensor([1.0, 0.0, 0.5, 0.5]).view(1, 1, 2, 2)
    q = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 2, 2)
    fg = 1 - (2 * (1 + 0.5) + 1e-10) / ((1 + 0.25 + 0.25) + 2 + 1e-10)
    bg = 1 - (2 * (1 + 0.5) + 1e-10) / ((1 + 0.25 + 0.25) + 2 + 1e-10)
    assert soft_dice_distance(p, q).item() == pytest.approx((fg + bg) / 2)
    assert soft_dice_distance(q, q).item() == pytest.approx(0.0, abs=1e-7)


def test_frozen_bn_stats_leaves_running_statistics_alone():
    net = build_unet(_cfg("ssnet")).train()
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "tracked" in k}
    with frozen_bn_stats(net):
        net(torch.rand(2, 3, SIZE, SIZE))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert all(m.track_running_stats for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    net(torch.rand(2, 3, SIZE, SIZE))
    assert not all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


def test_adversarial_perturbation_has_norm_eps_and_hurts_more_than_a_random_one():
    cfg = _cfg("ssnet")
    torch.manual_seed(0)
    net = build_unet(cfg).train()
    x = torch.rand(4, 3, SIZE, SIZE)
    g = torch.Generator().manual_seed(0)
    adv, rnd = [], []
    with frozen_bn_stats(net):
        p = torch.sigmoid(net(x)).detach()
        for _ in range(5):
            r = adversarial_perturbation(net, x, p, xi=10.0, eps=6.0, iterations=1, generator=g)
            assert torch.allclose(r.flatten(1).norm(dim=1), torch.full((4,), 6.0), rtol=1e-5)
            noise = torch.randn(x.shape, generator=g)
            noise = 6.0 * noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            with torch.no_grad():
                adv.append(soft_dice_distance(torch.sigmoid(net(x + r)), p).item())
                rnd.append(soft_dice_distance(torch.sigmoid(net(x + noise)), p).item())
    assert min(adv) > max(rnd), (adv, rnd)
    assert all(q.grad is None for q in net.parameters())  # the direction search leaves the weights' gradients alone


def test_prototypes_are_class_means_of_normalised_features_and_pull_features_to_them():
    torch.manual_seed(0)
    emb, labels = torch.randn(10, 5), torch.tensor([0, 1, 1, 0, 0, 1, 0, 0, 1, 0])
    protos, counts = class_prototypes(emb, labels)
    unit = emb / emb.norm(dim=1, keepdim=True)
    assert counts.tolist() == [6, 4]
    assert torch.allclose(protos[0], unit[labels == 0].mean(0), atol=1e-6)
    assert torch.allclose(protos[1], unit[labels == 1].mean(0), atol=1e-6)
    q = torch.randn(10, 5)
    qn = q / q.norm(dim=1, keepdim=True)
    hand = sum((1 - qn[labels == c] @ protos[c]).mean() for c in (0, 1)) / 2
    valid = torch.tensor([True, True])
    assert torch.allclose(separation_loss(q, labels, protos, valid), hand, atol=1e-6)
    # equals the mean cosine distance to every member of the class (the authors' memory, uniform weights)
    dist0 = (1 - qn[labels == 0] @ unit[labels == 0].T).mean()
    dist1 = (1 - qn[labels == 1] @ unit[labels == 1].T).mean()
    assert torch.allclose(hand, (dist0 + dist1) / 2, atol=1e-6)
    only_fg = separation_loss(q, labels, protos, torch.tensor([False, True]))
    assert torch.allclose(only_fg, (1 - qn[labels == 1] @ protos[1]).mean() / 2, atol=1e-6)


def test_ssnet_step_prototypes_terms_and_memory():
    cfg = _cfg("ssnet")
    torch.manual_seed(0)
    student, method = build_unet(cfg), SSNet(cfg)
    x_l, y_l, x_u = _data()
    proj = copy.deepcopy(method.heads["projection"]).eval()  # as the step sees it before its own forward passes
    out = method.step(Models(student, student, None), _batch(x_l, y_l, x_u, epoch=2.0))
    t = out.terms
    assert torch.allclose(t["semi"], t["lds"] + 0.1 * (t["sep_l"] + t["sep_u"]))
    assert torch.allclose(out.loss, out.sup + 0.1 * t["semi"]) and t["lds"] > 0
    assert all(p.grad is None for p in student.parameters())  # the VAT probe left no gradients behind
    # the prototypes are the class means of the projections of the correctly predicted labelled pixels
    with torch.no_grad():
        z, f = student.decode(student.encode(torch.cat([x_l, x_u])), features=True)
        pred = (torch.sigmoid(z[:2]) > 0.5).long().reshape(-1)
        rows = f[:2].permute(0, 2, 3, 1).reshape(-1, 4)
        labels = y_l.reshape(-1).long()
        ok = pred == labels
        emb = F.normalize(proj(rows[ok]), dim=1)
    for c in (0, 1):
        if int((labels[ok] == c).sum()) > 1:
            assert method.valid[c] and torch.allclose(method.prototypes[c], emb[labels[ok] == c].mean(0), atol=1e-5)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in method.parameters())
    # a class missing from a later batch keeps its prototype (the authors' memory)
    kept = method.prototypes.clone()
    method.update_prototypes(f[:2], torch.zeros_like(y_l), torch.zeros_like(y_l).long())
    assert torch.equal(method.prototypes[1], kept[1]) and not torch.equal(method.prototypes[0], kept[0])


def test_ssnet_state_round_trips():
    cfg = _cfg("ssnet")
    a = SSNet(cfg)
    a.prototypes, a.valid = torch.randn(2, 32), torch.tensor([True, False])
    torch.rand(3, generator=a.generator)
    b = SSNet(cfg.replace(seed=1))
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.prototypes, a.prototypes) and torch.equal(b.valid, a.valid)
    assert torch.equal(torch.rand(3, generator=b.generator), torch.rand(3, generator=a.generator))
    assert all(torch.equal(p, q) for p, q in zip(a.heads.state_dict().values(), b.heads.state_dict().values()))


# ------------------------------------------------------------------------------------------------------ the real loop
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ssl-data") / "qata-synth")


def _run(root, out, method, epochs):
    from dusss.ssmis import train_ssmis

    # a constant learning rate: the cosine schedule spans `epochs`, so a 1-epoch run would not be a prefix of a
    # 3-epoch one; no ramp-up: every epoch's loss is the same objective, so "the loss fell" compares like with like
    cfg = make_config("smoke", method=method, image_size=SIZE, unet_base=4, epochs=epochs, num_threads=1,
                      lr_schedule="constant", ssl_rampup_epochs=0.0, data_root=root, out_dir=str(out))
    return train_ssmis(cfg, progress=False)


@pytest.mark.parametrize("method", ["cct", "mcnet", "ssnet"])
def test_method_trains_in_the_loop_and_resumes_exactly(method, data_root, tmp_path):
    from dusss.evaluate import load_student
    from dusss.utils import load_checkpoint

    full = _run(data_root, tmp_path / "full", method, 3)
    history = pd.read_csv(tmp_path / "full" / "history.csv")
    assert full["method"] == method and full["epochs_run"] == 3 and 0.0 <= full["test_dice"] <= 1.0
    assert history["loss"].iloc[-1] < history["loss"].iloc[0] and history["loss_sup"].iloc[-1] < history["loss_sup"].iloc[0]
    assert (history["loss_semi"] > 0).all() and history["diag_teacher_dice"].isna().all()
    model, _, _ = load_student(tmp_path / "full" / "best.pt")
    with torch.no_grad():
        assert model(torch.rand(2, 3, SIZE, SIZE)).shape == (2, 1, SIZE, SIZE)  # the student: one logit map
    last = load_checkpoint(tmp_path / "full" / "last.pt")
    assert len(last["optimizer"]["param_groups"]) == 2 and last["method"]  # the method's modules trained and saved

    _run(data_root, tmp_path / "resumed", method, 1)  # "interrupted" after one epoch
    resumed = _run(data_root, tmp_path / "resumed", method, 3)
    again = pd.read_csv(tmp_path / "resumed" / "history.csv")
    pd.testing.assert_frame_equal(history.drop(columns="seconds"), again.drop(columns="seconds"))
    assert resumed["test_dice"] == full["test_dice"] and resumed["val_dice"] == full["val_dice"]
    assert math.isfinite(history["cons_weight"].iloc[-1]) and history["cons_weight"].iloc[-1] == pytest.approx(0.1)


@pytest.mark.parametrize("method", ["cct", "mcnet", "ssnet"])
def test_bn_batch_separate_normalises_labelled_and_unlabelled_images_as_two_batches(method):
    x_l, y_l, x_u = _data(n_l=2, n_u=3)
    sizes = {}
    for mode in ("joint", "separate"):
        cfg = _cfg(method, bn_batch=mode)
        torch.manual_seed(0)
        student, m = build_unet(cfg), METHODS[method](cfg)
        seen = []
        first_bn = next(mod for mod in student.modules() if isinstance(mod, torch.nn.BatchNorm2d))
        hook = first_bn.register_forward_hook(lambda mod, inp, out: seen.append(len(inp[0])))
        out = m.step(Models(student, student, None), _batch(x_l, y_l, x_u, epoch=2.0))
        hook.remove()
        assert torch.isfinite(out.loss)
        sizes[mode] = seen
    assert set(sizes["joint"]) == {5}  # every forward: 2 labelled + 3 unlabelled images in one batch
    assert set(sizes["separate"]) == {2, 3} and sizes["separate"].count(2) == sizes["separate"].count(3)


def test_bn_batches_is_one_call_of_the_concatenation_or_the_concatenation_of_two_calls():
    from dusss.methods.base import bn_batches
    calls = []

    def fn(x):
        calls.append(len(x[0]) if isinstance(x, list) else len(x))
        return [t * 2 for t in x] if isinstance(x, list) else (x * 2, x + 1)

    a, b = torch.ones(2, 1), torch.zeros(3, 1)
    joint, separate = bn_batches(fn, a, b, False), bn_batches(fn, a, b, True)
    assert calls == [5, 2, 3] and all(torch.equal(j, s) for j, s in zip(joint, separate))
    assert isinstance(separate, tuple) and separate[0].shape == (5, 1)
    out = bn_batches(fn, [a, a], [b, b], True)  # lists of maps (the encoder's skips)
    assert isinstance(out, list) and len(out) == 2 and out[0].shape == (5, 1)
