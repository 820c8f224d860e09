"""Table 1's LViT row (dusss.lvit, dusss.methods.lvit): LViT-T with EPI pseudo labels and the LV loss.

The defining pieces first, each against a hand computation: the report conditions the prediction, the PLAM's
re-weighting, EPI's exponential average over three updates (and across a save/load of the method's state, and
across augmented views), the LV loss (zero when the prediction is the contrastive label). Then the method trains
for real through :func:`dusss.ssmis.train_ssmis` on smoke data and its checkpoint is rebuilt by
:func:`dusss.evaluate.load_student`.
"""
import io

import pandas as pd
import pytest
import torch

from conftest import SMOKE_REPORTS, check_text_conditions
from dusss.config import ConfigError, make_config
from dusss.data.augment import apply_params_batch
from dusss.lvit import PLAM, LViTStudent
from dusss.methods import METHODS, Models, StepBatch
from dusss.methods.lvit import EPIBank, LVLoss
from dusss.runs import ROWS, TABLE1_ROWS, needs_vlm
from dusss.textseg import build_student, paper_size_config
from dusss.unet import count_parameters

SIZE = 32


def _cfg(**kw):
    return make_config("smoke", image_size=SIZE, method="lvit", **kw)


def _model(seed=0):
    torch.manual_seed(seed)
    return build_student(_cfg(), "lvit")


def test_row_method_and_config():
    method = METHODS["lvit"]
    assert method.student == "lvit" and method.uses_unlabelled and not method.uses_teacher and not method.uses_text
    assert ROWS["lvit"].method == "lvit" and ROWS["lvit"].paper1 == "LViT" and ROWS["lvit"].ratio is None
    assert TABLE1_ROWS.index("lvit") == TABLE1_ROWS.index("clip") - 1 and not needs_vlm("lvit")
    assert isinstance(_model(), LViTStudent)
    with pytest.raises(ConfigError, match="lvit_patch.*= 12"):
        build_student(_cfg(lvit_patch=12), "lvit")
    with pytest.raises(ConfigError, match="lvit_base.*lvit_heads"):
        build_student(_cfg(lvit_base=6, lvit_heads=4), "lvit")
    with pytest.raises(ConfigError, match="lvit_epi_beta"):
        _cfg(lvit_epi_beta=1.0)


def test_paper_size_is_lvit_t():
    cfg = paper_size_config("lvit")
    assert (cfg.image_size, cfg.lvit_base, cfg.lvit_patch, cfg.lvit_heads, cfg.lvit_text_len) == (224, 64, 16, 8, 10)
    params = count_parameters(build_student(cfg, "lvit")) / 1e6
    # LViT-T: 29.7 M, counting modules its forward never calls; MiniLM's 384-wide tokens where BERT's are 768
    assert params == pytest.approx(29.7, rel=2e-2)


def test_the_report_conditions_the_prediction():
    model = _model().eval()
    x = check_text_conditions(model, SIZE)
    with pytest.raises(ValueError, match="one report per image"):
        model(x, SMOKE_REPORTS[:1])
    with pytest.raises(ValueError, match="built for 32 px"):
        model(torch.rand(2, 3, 64, 64), SMOKE_REPORTS)
    assert not any("backbone" in k for k in model.state_dict())  # the frozen encoder is not part of the student


def test_plam_reweights_each_pixel_by_its_channel_statistics():
    torch.manual_seed(0)
    plam = PLAM(4)
    x = torch.randn(2, 4, 5, 5)
    a = torch.relu(torch.einsum("oc,bchw->bohw", plam.conv_avg.weight[:, :, 0, 0], x)).mean(1)  # (B, H, W)
    m = torch.relu(torch.einsum("oc,bchw->bohw", plam.conv_max.weight[:, :, 0, 0], x)).amax(1)
    w = plam.mlp(torch.stack([a, m, a + m], dim=-1))[..., 0]  # (B, H, W)
    assert torch.allclose(plam(x), x * w[:, None], atol=1e-6)


def test_epi_is_the_exponential_average_and_survives_save_and_load():
    beta = 0.6
    g = torch.Generator().manual_seed(3)
    p1, p2, p3 = (torch.rand(2, 1, 8, 8, generator=g) for _ in range(3))
    idx, plain = torch.tensor([4, 1]), [{}, {}]
    bank = EPIBank(beta)
    _, seen = bank.targets(idx, plain, p1)
    assert not seen.any()
    bank.update(idx, plain, p1)
    bank.update(idx, plain, p2)
    bank.update(idx, plain, p3)
    expected = beta * (beta * p1 + (1 - beta) * p2) + (1 - beta) * p3  # P3 = b P2 + (1 - b) p3, P2 = b p1 + (1 - b) p2
    labels, seen = bank.targets(idx, plain, p1)
    assert seen.all() and torch.allclose(labels, expected, atol=2e-3)  # float16 storage
    assert len(bank.labels) == 5 and bank.seen.tolist() == [False, True, False, False, True]
    # a view flipped and turned: the label comes in that view's frame, and a prediction made there folds back
    view = [{"k": 1, "hflip": True}, {}]
    assert torch.allclose(bank.targets(idx, view, p1)[0], apply_params_batch(expected, view), atol=2e-3)
    p4 = torch.rand(2, 1, 8, 8, generator=g)
    bank.update(idx, view, apply_params_batch(p4, view))
    assert torch.allclose(bank.targets(idx, plain, p1)[0], beta * expected + (1 - beta) * p4, atol=3e-3)
    # the method's state, through torch.save / torch.load as the loop's checkpoint carries it
    method = METHODS["lvit"](_cfg(lvit_epi_beta=beta))
    method.epi = bank
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    fresh = METHODS["lvit"](_cfg(lvit_epi_beta=beta))
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh.epi.labels, bank.labels) and torch.equal(fresh.epi.seen, bank.seen)
    bank.update(idx, plain, p1)
    fresh.epi.update(idx, plain, p1)
    assert torch.equal(fresh.epi.labels, bank.labels)  # and continues exactly


def test_lv_loss_is_zero_for_the_contrastive_label():
    g = torch.Generator().manual_seed(4)
    masks_l = (torch.rand(3, 1, 8, 8, generator=g) > 0.6).float()
    emb_l = torch.randn(3, 16, generator=g)
    emb_u = torch.stack([emb_l[2] * 2.0 + 0.01, emb_l[0]])  # unlabelled report 0 ~ labelled 2, 1 = labelled 0
    loss = LVLoss()
    out = loss(masks_l[[2, 0]], masks_l, emb_u, emb_l, return_dict=True)
    assert out["pick"].tolist() == [2, 0] and out["lv"].abs() < 1e-6  # aligned: the prediction is the borrowed mask
    assert loss(0.5 * masks_l[[2, 0]], masks_l, emb_u, emb_l).abs() < 1e-6  # cosine: scale-free
    prob = torch.rand(2, 1, 8, 8, generator=g, requires_grad=True)
    value = loss(prob, masks_l, emb_u, emb_l)
    hand = [1 - (prob[i].flatten() @ masks_l[j].flatten()) / (prob[i].norm() * masks_l[j].norm())
            for i, j in ((0, 2), (1, 0))]
    assert value.item() == pytest.approx(float(sum(hand).detach()) / 2, abs=1e-6) and value > 0.05
    value.backward()
    assert torch.isfinite(prob.grad).all() and prob.grad.abs().sum() > 0


def test_step_prototype_phase_then_epi_and_lv():
    model = _model().train()
    method = METHODS["lvit"](_cfg(epochs=4, lvit_pretrain_frac=0.25, rampup_epochs=0.0))
    g = torch.Generator().manual_seed(2)
    x_l, y_l = torch.rand(2, 3, SIZE, SIZE, generator=g), (torch.rand(2, 1, SIZE, SIZE, generator=g) > 0.8).float()
    x_u = torch.rand(2, 3, SIZE, SIZE, generator=g)
    models = Models(model, model, None)

    def batch(step, epoch):
        return StepBatch(x_l, y_l, x_u, None, step, 8, epoch, SMOKE_REPORTS, texts_u=SMOKE_REPORTS[::-1],
                         idx_u=torch.tensor([0, 1]), aug_u=[{}, {}])

    early = method.step(models, batch(0, 0.5))  # the labelled-only prototype: no unlabelled term, no EPI update
    assert torch.equal(early.loss, early.sup) and early.weight == 0.0 and len(method.epi.labels) == 0
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(8):
        out = method.step(models, batch(step, 1.0 + step / 8))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert out.weight == pytest.approx(1.0) and {"semi", "pseudo", "lv"} <= set(out.terms)
    assert out.loss.item() == pytest.approx((out.sup + out.terms["pseudo"] + 0.1 * out.terms["lv"]).item(), rel=1e-5)
    assert losses[-1] < losses[0] and method.epi.seen.all()
    with pytest.raises(ValueError, match="texts_u"):
        method.step(models, StepBatch(x_l, y_l, x_u, None, 0, 8, 2.0, SMOKE_REPORTS))


# ------------------------------------------------------------------------------------------------------ the real loop
def test_method_trains_in_the_loop_and_its_checkpoint_is_rebuilt(tmp_path_factory, tmp_path):
    from dusss.evaluate import load_student
    from dusss.ssmis import train_ssmis

    data_root = str(tmp_path_factory.mktemp("lvit-data") / "qata-synth")
    cfg = make_config("smoke", method="lvit", ratio=0.5, image_size=SIZE, epochs=4, num_threads=1, rampup_epochs=0.0, patience=10,
                      lvit_pretrain_frac=0.25, lr_schedule="constant", data_root=data_root, out_dir=str(tmp_path))
    metrics = train_ssmis(cfg, progress=False)
    history = pd.read_csv(tmp_path / "history.csv")
    assert metrics["method"] == "lvit" and metrics["epochs_run"] == 4 and 0.0 <= metrics["test_dice"] <= 1.0
    assert history["loss_sup"].iloc[-1] < history["loss_sup"].iloc[0]
    # epoch 1 is the labelled-only prototype; from epoch 2 the whole loss at full weight (no ramp-up here)
    assert history["loss_lv"].iloc[0] == 0.0 and (history["loss_lv"].iloc[1:] > 0.0).all()
    assert history["loss"].iloc[-1] < history["loss"].iloc[1]
    last = torch.load(tmp_path / "last.pt", weights_only=False)
    epi = last["method"]["epi"]  # every unlabelled image drawn after the prototype phase has an EPI pseudo label
    assert epi["seen"].all() and len(epi["seen"]) == metrics["n_unlabelled"]
    assert tuple(epi["labels"].shape[1:]) == (1, SIZE, SIZE)
    model, saved, ckpt = load_student(tmp_path / "best.pt")
    assert isinstance(model, LViTStudent) and saved == cfg and not model.training
    assert not any("backbone" in k for k in ckpt["student"])
    with torch.no_grad():
        assert model(torch.rand(2, 3, SIZE, SIZE), SMOKE_REPORTS).shape == (2, 1, SIZE, SIZE)
