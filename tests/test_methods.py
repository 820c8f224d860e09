"""Step-2 methods (dusss.methods): the registry, the shared perturbation and consistency, BCP and UCMT steps by hand."""
import math

import pytest
import torch
import torch.nn.functional as F

from dusss.config import make_config
from dusss.methods import Models, StepBatch
from dusss.methods.bcp import BCP, WeightedBCELoss, box_mask, copy_paste
from dusss.methods.ucmt import UCMT, binary_entropy, umix
from dusss.unet import build_unet


def _step(method, student, teacher, x_l, y_l, x_u, *, step, total=40, epoch=0.0):
    """One call of the method's step as the loop makes it (no DDP wrapper: forward is the student)."""
    out = method.step(Models(student, student, teacher), StepBatch(x_l, y_l, x_u, None, step, total, epoch))
    return out.loss, out.sup, out.terms, out.weight


@pytest.mark.parametrize("h,w,frac", [(12, 12, 2 / 3), (30, 21, 2 / 3), (8, 8, 1.0), (10, 16, 0.25)])
def test_box_mask_is_one_box_of_the_right_size_inside_the_image(h, w, frac):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        m = box_mask(h, w, frac, generator=g)
        assert m.shape == (1, 1, h, w)
        rows = m[0, 0].sum(1).nonzero().flatten()
        cols = m[0, 0].sum(0).nonzero().flatten()
        bh, bw = round(frac * h), round(frac * w)
        assert len(rows) == bh and len(cols) == bw  # contiguous extents of the right size
        assert rows[-1] - rows[0] + 1 == bh and cols[-1] - cols[0] + 1 == bw
        assert m.sum().item() == bh * bw  # a full rectangle, nothing else


def test_box_positions_cover_the_image():
    g = torch.Generator().manual_seed(1)
    tops = {int(box_mask(9, 9, 2 / 3, generator=g)[0, 0].sum(1).nonzero()[0]) for _ in range(200)}
    assert tops == {0, 1, 2, 3}  # 9 - 6 + 1 positions, all drawn


def test_box_mask_rejects_bad_fraction():
    with pytest.raises(ValueError, match="bcp_box"):
        box_mask(8, 8, 0.0)


def test_copy_paste_against_hand_computation_and_labels_follow_images():
    m = torch.zeros(1, 1, 4, 4)
    m[..., 1:3, 0:2] = 1.0  # hand-placed box
    a = torch.arange(2 * 3 * 16, dtype=torch.float).reshape(2, 3, 4, 4)
    b = -a - 1
    mixed = copy_paste(a, b, m)
    for i in range(2):
        for y in range(4):
            for x in range(4):
                inside = 1 <= y < 3 and x < 2
                assert torch.equal(mixed[i, :, y, x], (b if inside else a)[i, :, y, x])
    # a label that encodes the source pixel is mixed exactly as the image is
    la, lb = (a[:, :1] >= 0).float() * 0, torch.ones(2, 1, 4, 4)
    ml = copy_paste(la, lb, m)
    assert torch.equal(ml, (mixed[:, :1] < 0).float())


def test_weighted_bce_equals_plain_bce_with_unit_weights_and_hand_value():
    torch.manual_seed(0)
    z, y = torch.randn(2, 1, 5, 5), (torch.rand(2, 1, 5, 5) > 0.5).float()
    loss = WeightedBCELoss()
    assert torch.allclose(loss(z, y, torch.ones_like(y)), F.binary_cross_entropy_with_logits(z, y))
    w = torch.rand(2, 1, 5, 5)
    p = torch.sigmoid(z)
    hand = (w * -(y * torch.log(p) + (1 - y) * torch.log(1 - p))).mean()
    assert torch.allclose(loss(z, y, w), hand, atol=1e-6)
    assert loss(z, y, torch.zeros_like(w)).item() == 0.0


def test_bcp_step_targets_and_weights_match_a_hand_computation():
    cfg = make_config("smoke", image_size=16, unet_base=4, epochs=4, bcp_pretrain_frac=0.25)
    step = BCP(cfg)
    assert step.pretrain_steps(40) == 10
    torch.manual_seed(0)
    student, teacher = build_unet(cfg), build_unet(cfg)
    x_l, x_u = torch.rand(3, 3, 16, 16), torch.rand(3, 3, 16, 16)
    y_l = (torch.rand(3, 1, 16, 16) > 0.7).float()
    state = torch.get_rng_state()
    loss, l_sup, terms, weight = _step(step, student, teacher, x_l, y_l, x_u, step=10)
    assert weight == 1.0 and math.isfinite(loss.item())
    assert torch.allclose(loss, l_sup + terms["semi"])
    # teacher restarts as a copy of the student at the start of the semi-supervised stage
    for a, b in zip(student.parameters(), teacher.parameters()):  # (buffers moved on with the forward passes)
        assert torch.equal(a, b)
    # recompute by hand with the same box draw
    torch.set_rng_state(state)
    m = box_mask(16, 16, cfg.bcp_box)
    with torch.no_grad():
        y_u = (torch.sigmoid(teacher(x_u)) > 0.5).float()
    y_u2 = y_u.roll(1, 0)
    x_in, x_out = x_l * (1 - m) + x_u * m, x_u.roll(1, 0) * (1 - m) + x_l * m
    y_in, y_out = y_l * (1 - m) + y_u * m, y_u2 * (1 - m) + y_l * m
    z = student(torch.cat([x_in, x_out]))
    bce = F.binary_cross_entropy_with_logits(z, torch.cat([y_in, y_out]), reduction="none")
    w_gt = torch.cat([(1 - m).expand(3, 1, 16, 16), m.expand(3, 1, 16, 16)])
    assert torch.allclose(l_sup, (bce * w_gt).mean(), atol=1e-6)
    assert torch.allclose(terms["semi"], (0.5 * bce * (1 - w_gt)).mean(), atol=1e-6)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_bcp_pretraining_stage_uses_labelled_images_only():
    cfg = make_config("smoke", image_size=16, unet_base=4, epochs=4)
    step = BCP(cfg)
    student, teacher = build_unet(cfg), build_unet(cfg)
    x_l, y_l = torch.rand(2, 3, 16, 16), (torch.rand(2, 1, 16, 16) > 0.5).float()
    x_u = torch.full((2, 3, 16, 16), float("nan"))  # any use of the unlabelled images would give NaN
    loss, l_sup, terms, weight = _step(step, student, teacher, x_l, y_l, x_u, step=0)
    assert weight == 0.0 and terms["semi"].item() == 0.0 and torch.isfinite(loss)


def test_umix_against_hand_computation():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float).reshape(2, 1, 4, 4)  # 2 images, 2x2 grid of 2x2 patches
    y = (x % 3 == 0).float()
    u = torch.zeros(2, 1, 4, 4)
    u[0, :, 0:2, 2:4] = 1.0  # image 0: patch 1 (top right) most uncertain
    u[0, :, 2:4, 0:2] = 0.5  # then patch 2 (bottom left)
    u[1] = 1.0
    u[1, :, 2:4, 2:4] = 0.0  # image 1: patch 3 (bottom right) most certain
    u[1, :, 0:2, 0:2] = 0.2  # then patch 0 (top left)
    xm, ym = umix(x, y, u, grid=2, k=2)
    hand = x.clone()
    hand[0, :, 0:2, 2:4] = x[1, :, 2:4, 2:4]  # most uncertain <- most certain of the next image
    hand[0, :, 2:4, 0:2] = x[1, :, 0:2, 0:2]  # second <- second
    # image 1 receives from image 0 (wrap-around): its two most uncertain patches (ties: 1, 2 in topk order)
    assert torch.equal(xm[0], hand[0])
    changed = (xm[1] != x[1]).flatten().sum().item()
    assert changed == 8  # exactly two 2x2 patches replaced
    assert torch.equal(ym, (xm % 3 == 0).float())  # labels moved with their pixels
    assert torch.equal(x, torch.arange(32, dtype=torch.float).reshape(2, 1, 4, 4))  # input untouched
    with pytest.raises(ValueError, match="ucmt_topk"):
        umix(x, y, u, grid=2, k=5)


def test_ucmt_step_trains_the_second_student_and_returns_the_first_students_loss():
    assert torch.allclose(binary_entropy(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([0.0, math.log(2), 0.0]),
                          atol=1e-4)
    cfg = make_config("smoke", image_size=16, unet_base=4, method="ucmt", ucmt_grid=4, ucmt_topk=3)
    torch.manual_seed(0)
    student, teacher = build_unet(cfg), build_unet(cfg)
    step = UCMT(cfg)
    before = [p.detach().clone() for p in step.student2.parameters()]
    x_l, x_u = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    y_l = (torch.rand(2, 1, 16, 16) > 0.6).float()
    loss, l_sup, terms, weight = _step(step, student, teacher, x_l, y_l, x_u, step=5, epoch=0.5)
    assert 0 < weight <= cfg.cons_weight
    assert torch.allclose(loss, l_sup + weight * terms["semi"])
    assert any(not torch.equal(a, b) for a, b in zip(before, step.student2.parameters()))  # student 2 stepped
    assert all(p.grad is None for p in student.parameters())  # student 1 is left to the loop
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    again = UCMT(cfg)
    again.load_state_dict(step.state_dict())
    for a, b in zip(again.student2.parameters(), step.student2.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- the registry and the shared consistency pieces
from dusss.config import ConfigError  # noqa: E402
from dusss.losses import consistency_loss  # noqa: E402
from dusss.methods import METHODS, get_method, register  # noqa: E402
from dusss.methods.consistency import Perturbation  # noqa: E402
from dusss.methods.mean_teacher import MeanTeacher  # noqa: E402
from dusss.ssmis import decline_streak  # noqa: E402


def test_registry_holds_every_method_and_names_the_choices_of_an_unknown_one():
    assert {"dusss", "mt", "supervised", "bcp", "ucmt"} <= set(METHODS)
    assert all(cls.name == name for name, cls in METHODS.items())
    with pytest.raises(ConfigError, match="registered Step-2 method.*mt"):
        get_method("meanteacher")
    with pytest.raises(ConfigError, match="registered Step-2 method"):
        make_config("smoke", method="meanteacher")


def test_noise_follows_the_image_scale():
    """The same relative noise for an input and its scaled copy: noise(k x) = k noise(x) for the same draw."""
    x = torch.rand(3, 3, 16, 16) * torch.tensor([0.2, 1.0, 0.05]).view(3, 1, 1, 1)
    small = Perturbation("noise", 0.1, seed=4).noise(x)
    large = Perturbation("noise", 0.1, seed=4).noise(5.0 * x)
    assert torch.allclose(large, 5.0 * small, atol=1e-6)
    # its spread is noise_std of each image's own spread (clipping at 2 sd removes ~5 % of the tails)
    for i in range(3):
        ratio = float(small[i].std() / x[i].std())
        assert 0.08 < ratio < 0.105, ratio
        assert float(small[i].abs().max()) <= 2 * 0.1 * float(x[i].flatten().std()) + 1e-6


def test_views_noise_on_the_teacher_strong_on_the_student_none_alike():
    x = torch.rand(4, 3, 16, 16)
    s, t = Perturbation("noise", 0.1, seed=0).views(x)
    assert torch.equal(s, x) and not torch.equal(t, x)
    s, t = Perturbation("strong", 0.1, seed=0).views(x)
    assert torch.equal(t, x) and not torch.equal(s, x) and 0.0 <= float(s.min()) and float(s.max()) <= 1.0
    s, t = Perturbation("none", 0.1, seed=0).views(x)
    assert s is x and t is x
    with pytest.raises(ValueError, match="perturb"):
        Perturbation("gaussian")


def test_perturbation_resumes_its_draws():
    p = Perturbation("noise", 0.1, seed=1)
    x = torch.rand(2, 3, 8, 8)
    p.noise(x)
    state = p.state_dict()
    a = p.noise(x)
    q = Perturbation("noise", 0.1, seed=99)
    q.load_state_dict(state)
    assert torch.equal(q.noise(x), a)


def test_consistency_forms_against_hand_computation():
    torch.manual_seed(0)
    z, target = torch.randn(2, 1, 4, 4), torch.rand(2, 1, 4, 4)
    p = torch.sigmoid(z)
    assert torch.allclose(consistency_loss(z, target, "mse"), ((p - target) ** 2).mean(), atol=1e-7)
    bce = -(target * p.log() + (1 - target) * (1 - p).log()).mean()
    assert torch.allclose(consistency_loss(z, target, "bce"), bce, atol=1e-6)
    assert consistency_loss(z, p, "mse").item() == pytest.approx(0.0, abs=1e-12)  # zero at its minimum
    with pytest.raises(ValueError, match="cons_loss"):
        consistency_loss(z, target, "l1")


def test_mean_teacher_step_feeds_the_teacher_a_noisy_view_and_the_student_the_clean_one():
    cfg = make_config("smoke", image_size=16, unet_base=4, method="mt", perturb="noise", noise_std=0.1, bn_batch="joint")
    torch.manual_seed(0)
    student, teacher = build_unet(cfg), build_unet(cfg)
    seen = {}

    def watch(name):
        def hook(module, inputs, output):
            seen.setdefault(name, inputs[0].detach().clone())  # returns None: the output is left alone
        return hook

    teacher.register_forward_hook(watch("teacher"))
    student.register_forward_hook(watch("student"))
    x_l, y_l, x_u = torch.rand(2, 3, 16, 16), (torch.rand(2, 1, 16, 16) > 0.6).float(), torch.rand(2, 3, 16, 16)
    out = MeanTeacher(cfg, torch.device("cpu")).step(Models(student, student, teacher),
                                                     StepBatch(x_l, y_l, x_u, None, 3, 40, 0.5))
    assert torch.equal(seen["student"][2:], x_u)  # the student sees the unlabelled images as they are
    diff = seen["teacher"] - x_u
    assert float(diff.abs().max()) > 0 and float(diff.std()) == pytest.approx(0.1 * float(x_u.std()), rel=0.3)
    assert torch.allclose(out.loss, out.sup + out.weight * out.terms["semi"])
    assert 0 < out.weight < cfg.cons_weight  # ramping up


@pytest.mark.parametrize("bn_batch", ["joint", "separate"])
def test_bn_batch_decides_whether_unlabelled_images_shift_the_labelled_images_normalisation(bn_batch):
    cfg = make_config("smoke", image_size=16, unet_base=4, method="mt", perturb="none", bn_batch=bn_batch)
    torch.manual_seed(0)
    student, teacher = build_unet(cfg), build_unet(cfg)
    x_l, y_l = torch.rand(2, 3, 16, 16), (torch.rand(2, 1, 16, 16) > 0.6).float()
    sups = []
    for x_u in (torch.rand(2, 3, 16, 16), 5 * torch.rand(2, 3, 16, 16) - 2):  # two very different unlabelled batches
        out = MeanTeacher(cfg, torch.device("cpu")).step(Models(student, student, teacher),
                                                         StepBatch(x_l, y_l, x_u, None, 3, 40, 0.5))
        sups.append(float(out.sup.detach()))
    # the supervised loss reads the labelled logits: joint BatchNorm mixes in the unlabelled batch's statistics
    assert (sups[0] == pytest.approx(sups[1], abs=1e-6)) == (bn_batch == "separate")


def test_decline_streak_counts_consecutive_falls_at_the_end():
    assert decline_streak([]) == 0 and decline_streak([0.5]) == 0
    assert decline_streak([0.5, 0.6, 0.55, 0.5, 0.4]) == 3
    assert decline_streak([0.5, 0.4, 0.45]) == 0
    assert decline_streak([0.5, 0.5]) == 0  # flat is not a fall


class _ToyMethod:
    """A method defined outside the package: supervised loss on the labelled images plus a tiny L2 on the output."""

    name = "toy-outside"
    label = "toy"
    summary = "a method registered from a test"
    uses_unlabelled = True
    uses_teacher = False
    uses_text = False
    distributed = False
    steps_seen = 0

    def __init__(self, cfg, device):
        from dusss.losses import SupervisedSegLoss

        self.sup = SupervisedSegLoss()

    def step(self, models, batch):
        from dusss.methods import StepOutput

        type(self).steps_seen += 1
        assert batch.x_u is not None and batch.text_logits is None
        z = models.forward(torch.cat([batch.x_l, batch.x_u])).float()
        l_sup = self.sup(z[: len(batch.x_l)], batch.y_l)
        reg = 1e-3 * z[len(batch.x_l):].pow(2).mean()
        return StepOutput(l_sup + reg, l_sup, {"semi": reg}, 1e-3)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_a_method_registered_from_outside_trains_in_the_loop(tmp_path):
    from dusss.ssmis import train_ssmis

    register(_ToyMethod)
    try:
        cfg = make_config("smoke", method="toy-outside", epochs=2, num_threads=1, data_root=str(tmp_path / "data"),
                          out_dir=str(tmp_path / "toy"))
        metrics = train_ssmis(cfg, progress=False)
    finally:
        METHODS.pop("toy-outside")
    history = __import__("pandas").read_csv(tmp_path / "toy" / "history.csv")
    assert _ToyMethod.steps_seen == metrics["total_steps"] > 0
    assert 0.0 <= metrics["test_dice"] <= 1.0 and metrics["method"] == "toy-outside"
    assert (history["loss_semi"] > 0).all() and history["diag_teacher_dice"].isna().all()
    with pytest.raises(TypeError, match="protocol"):
        register(type("Bad", (), {"name": "bad"}))
