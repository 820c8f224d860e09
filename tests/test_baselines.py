"""BCP (dusss.baselines): box geometry, copy-paste mixing of images and labels, the weighted loss, one real step."""
import math

import pytest
import torch
import torch.nn.functional as F

from dusss.baselines import BCPStep, WeightedBCELoss, box_mask, copy_paste
from dusss.config import make_config
from dusss.unet import build_unet


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
    step = BCPStep(cfg)
    assert step.pre_epochs == 1
    torch.manual_seed(0)
    student, teacher = build_unet(cfg), build_unet(cfg)
    x_l, x_u = torch.rand(3, 3, 16, 16), torch.rand(3, 3, 16, 16)
    y_l = (torch.rand(3, 1, 16, 16) > 0.7).float()
    state = torch.get_rng_state()
    loss, l_sup, terms, weight = step(student, teacher, x_l, y_l, x_u, epoch=1, step=0, steps=10)
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
    step = BCPStep(cfg)
    student, teacher = build_unet(cfg), build_unet(cfg)
    x_l, y_l = torch.rand(2, 3, 16, 16), (torch.rand(2, 1, 16, 16) > 0.5).float()
    x_u = torch.full((2, 3, 16, 16), float("nan"))  # any use of the unlabelled images would give NaN
    loss, l_sup, terms, weight = step(student, teacher, x_l, y_l, x_u, epoch=0, step=0, steps=10)
    assert weight == 0.0 and terms["semi"].item() == 0.0 and torch.isfinite(loss)


def test_umix_against_hand_computation():
    from dusss.baselines import umix

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
    from dusss.baselines import UCMTStep, binary_entropy

    assert torch.allclose(binary_entropy(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([0.0, math.log(2), 0.0]),
                          atol=1e-4)
    cfg = make_config("smoke", image_size=16, unet_base=4, method="ucmt", ucmt_grid=4, ucmt_topk=3)
    torch.manual_seed(0)
    student, teacher = build_unet(cfg), build_unet(cfg)
    step = UCMTStep(cfg)
    before = [p.detach().clone() for p in step.student2.parameters()]
    x_l, x_u = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    y_l = (torch.rand(2, 1, 16, 16) > 0.6).float()
    loss, l_sup, terms, weight = step(student, teacher, x_l, y_l, x_u, epoch=5, step=0, steps=10)
    assert 0 < weight <= cfg.cons_weight
    assert torch.allclose(loss, l_sup + weight * terms["semi"])
    assert any(not torch.equal(a, b) for a, b in zip(before, step.student2.parameters()))  # student 2 stepped
    assert all(p.grad is None for p in student.parameters())  # student 1 is left to the loop
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    again = UCMTStep(cfg)
    again.load_state_dict(step.state_dict())
    for a, b in zip(again.student2.parameters(), step.student2.parameters()):
        assert torch.equal(a, b)
