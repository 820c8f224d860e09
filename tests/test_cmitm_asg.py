"""CMITM and ASG as Step-1 objectives (Table 1's CMITM and ASG rows): their defining pieces against hand
computations, and real smoke pre-training runs."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dusss.anatomy import QATA_TAGS, report_anatomy, zone_weights
from dusss.config import ConfigError, make_config
from dusss.experiments.grid import GRIDS
from dusss.losses import (ASGLoss, CMITMLoss, asymmetric_loss, masked_patch_loss, patchify, random_patch_mask,
                          soft_label_nce, tag_soft_labels)
from dusss.pretrain import _Objective, pretrain
from dusss.runs import (ROWS, TABLE1_ROWS, default_vlm_checkpoint, needs_vlm, pretrain_config, run_config, run_name,
                        vlm_variant)
from dusss.vlm import DuSSSVLM, load_vlm

A = "Unilateral pulmonary infection, one infected area, upper left lung."
B = "Bilateral pulmonary infection, two infected areas, all left lung and lower right lung."
NUCLEI = "The nuclei are evenly distributed. The nuclei density in the upper left is high."
OFF = dict(use_sss=False, use_cmc=False, use_imc=False)
CMITM, ASG = dict(step1_objective="cmitm", **OFF), dict(step1_objective="asg", **OFF)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def cmitm_vlm() -> DuSSSVLM:
    torch.manual_seed(0)
    return DuSSSVLM.from_config(make_config("smoke", **CMITM)).eval()


@pytest.fixture(scope="module")
def asg_vlm() -> DuSSSVLM:
    torch.manual_seed(0)
    return DuSSSVLM.from_config(make_config("smoke", **ASG)).eval()


# ---------------------------------------------------------------- CMITM: masked image modelling
def test_patch_mask_hides_the_asked_share_and_patchify_is_row_major():
    mask = random_patch_mask(5, 16, 0.75, torch.Generator().manual_seed(1))
    assert mask.shape == (5, 16) and (mask.sum(1) == 12).all()
    assert not torch.equal(mask[0], mask[1])  # drawn per image
    assert (random_patch_mask(2, 4, 0.99).sum(1) == 3).all()  # at least one patch stays visible
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    p = patchify(images, 2)  # (2, 4, 12)
    assert p.shape == (2, 4, 12)
    torch.testing.assert_close(p[1, 1].view(2, 2, 3), images[1, :, 0:2, 2:4].permute(1, 2, 0))  # row 0, column 1


def test_reconstruction_loss_counts_only_the_masked_patches():
    pred, target = _rand(2, 4, 6), _rand(2, 4, 6, seed=1)
    mask = torch.tensor([[True, False, False, True], [False, False, True, False]])
    norm = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    by_hand = sum(((pred[b, i] - norm[b, i]) ** 2).mean() for b, i in ((0, 0), (0, 3), (1, 2))) / 3
    torch.testing.assert_close(masked_patch_loss(pred, target, mask), by_hand)
    other = pred.clone()
    other[~mask] = 100.0  # anything on the visible patches
    torch.testing.assert_close(masked_patch_loss(other, target, mask), masked_patch_loss(pred, target, mask))
    other[0, 0] += 1.0
    assert masked_patch_loss(other, target, mask) != masked_patch_loss(pred, target, mask)
    raw = sum(((pred[b, i] - target[b, i]) ** 2).mean() for b, i in ((0, 0), (0, 3), (1, 2))) / 3
    torch.testing.assert_close(masked_patch_loss(pred, target, mask, norm_pix=False), raw)


def test_the_report_changes_the_reconstruction_and_masked_pixels_do_not(cmitm_vlm):
    cfg = cmitm_vlm.cfg
    images = torch.rand(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(3))

    def run(imgs, texts):
        with torch.no_grad():
            return cmitm_vlm(imgs, texts, ground=False, local=True, generator=torch.Generator().manual_seed(7)).local

    base = run(images, [A, B])
    grid = cfg.image_size // cfg.vit_patch
    assert base.pred.shape == (2, grid * grid, cfg.vit_patch ** 2 * 3) and base.patch_mask.shape == (2, grid * grid)
    assert (base.patch_mask.sum(1) == round(cfg.cmitm_mask_ratio * grid * grid)).all()
    torch.testing.assert_close(base.target, patchify(images, cfg.vit_patch))
    # cross-attention to the report: another report, another reconstruction of the masked patches
    swapped = run(images, [B, A])
    assert (swapped.pred - base.pred)[base.patch_mask].abs().max() > 1e-4
    # the content of a masked patch never reaches the decoder (pixels blanked, tokens dropped)
    hidden = F.interpolate(base.patch_mask.view(2, 1, grid, grid).float(), size=images.shape[-2:]).bool()
    scrambled = torch.where(hidden.expand_as(images), torch.rand_like(images), images)
    torch.testing.assert_close(run(scrambled, [A, B]).pred, base.pred)


# ---------------------------------------------------------------- CMITM: masked language modelling
def test_masked_language_modelling_predicts_only_the_masked_word_pieces(cmitm_vlm):
    enc = cmitm_vlm.text_encoder
    states, keep, ids, positions = enc.masked_tokens([A, B], 0.15, torch.Generator().manual_seed(0))
    special = torch.tensor([[t in enc.tokenizer.all_special_ids for t in row] for row in ids.tolist()])
    n_real = (~special & keep).sum(1)
    assert not (positions & (special | ~keep)).any()  # never [CLS], [SEP] or padding
    assert positions.sum(1).tolist() == [max(1, round(0.15 * int(n))) for n in n_real]
    full, _ = enc.tokens([A, B])
    assert not torch.allclose(states[0, : full.shape[1]][keep[0]], full[0][: int(keep[0].sum())])  # encoder saw [MASK]
    with torch.no_grad():
        local = cmitm_vlm(torch.rand(2, 3, 64, 64), [A, B], ground=False, local=True,
                          generator=torch.Generator().manual_seed(0)).local
    m = int(local.mlm_positions.sum())
    assert local.mlm_logits.shape == (m, enc.word_embeddings().shape[0]) and local.mlm_targets.shape == (m,)
    ids_full = enc.tokenizer([A, B], padding=True, return_tensors="pt")["input_ids"]
    torch.testing.assert_close(local.mlm_targets, ids_full[local.mlm_positions])  # the true pieces, only there
    loss = CMITMLoss(w_contrast=0.0, w_mim=0.0)(_emb(2), _emb(2, 1), local)
    torch.testing.assert_close(loss["loss"], F.cross_entropy(local.mlm_logits, local.mlm_targets))


def _emb(b: int, seed: int = 0):
    from dusss.losses import Embedding

    s = F.normalize(_rand(b, 8, seed=seed), dim=-1)
    return Embedding(s, s, torch.full_like(s, 0.5))


def test_cmitm_weights_and_terms(cmitm_vlm):
    cfg = cmitm_vlm.cfg
    with torch.no_grad():
        out = cmitm_vlm(torch.rand(2, 3, cfg.image_size, cfg.image_size), [A, B], local=True)
    full = CMITMLoss.from_config(cfg)(out.image, out.text, out.local)
    torch.testing.assert_close(full["loss"], full["contrast"] + full["mim"] + full["mlm"])
    i2t = -torch.log_softmax(out.image.s @ out.text.s.T / 0.07, 1).diag().mean()
    t2i = -torch.log_softmax(out.text.s @ out.image.s.T / 0.07, 1).diag().mean()
    torch.testing.assert_close(full["contrast"], (i2t + t2i) / 2)


# ---------------------------------------------------------------- ASG: anatomy
def test_reports_name_their_lung_zones_and_other_grammars_none():
    a = report_anatomy(B)
    assert [(p, s, z) for p, s, z in a.phrases] == [("all left lung", "left", ("upper", "middle", "lower")),
                                                   ("lower right lung", "right", ("lower",))]
    expected = {("left", "upper"), ("left", "middle"), ("left", "lower"), ("right", "lower")}
    assert {QATA_TAGS[i] for i in torch.nonzero(a.tags).flatten().tolist()} == expected
    assert report_anatomy("Unilateral pulmonary infection, two infected areas, upper lower right lung.").phrases[0][2] \
        == ("upper", "lower")
    empty = report_anatomy("No pulmonary infection.")
    assert empty.phrases == [] and empty.tags.sum() == 0
    assert report_anatomy(NUCLEI) is None and report_anatomy("Two bone metastases, large in the centre.") is None


def test_zone_weights_cover_the_named_zone_of_the_named_lung_only():
    w = zone_weights("left", ("upper",), 20, 20).view(20, 20)  # boxes: rows 0.15-0.37, image columns 0.5-0.88
    assert w[:, :10].sum() == 0 and w[:3].sum() == 0 and w[8:].sum() == 0  # not the right lung, not other thirds
    torch.testing.assert_close(w[4:7, 10:17], torch.ones(3, 7))  # patches wholly inside
    assert 0 < w[3, 12] < 1 and 0 < w[7, 12] < 1  # cut by the box: their share of area
    torch.testing.assert_close(w.sum(), torch.tensor((0.37 - 0.15) * 0.38 * 400), rtol=1e-4, atol=1e-4)
    whole = zone_weights("left", ("upper", "middle", "lower"), 4, 4)
    torch.testing.assert_close(whole.sum(), torch.tensor(0.66 * 0.38 * 16), rtol=1e-4, atol=1e-4)  # works at 4x4


def test_region_pooling_uses_the_named_region(asg_vlm):
    cfg = asg_vlm.cfg
    images = torch.rand(2, 3, cfg.image_size, cfg.image_size)
    region_proj, asg_vlm.region_proj = asg_vlm.region_proj, nn.Identity()  # see the pooled features themselves
    try:
        with torch.no_grad():
            local = asg_vlm(images, [A, B], ground=False, local=True).local
            patches = asg_vlm.image_encoder(images)[1]  # (2, W, h, w)
    finally:
        asg_vlm.region_proj = region_proj
    tokens = patches.flatten(2).transpose(1, 2)  # (2, P, W)
    h, w = patches.shape[-2:]
    expected = [(0, "left", ("upper",)), (1, "left", ("upper", "middle", "lower")), (1, "right", ("lower",))]
    assert local.region.shape[0] == 3 and local.phrase_ids.tolist() == [0, 1, 2]
    for r, (b, side, zones) in enumerate(expected):
        wts = zone_weights(side, zones, h, w)
        torch.testing.assert_close(local.region[r], F.normalize(wts @ tokens[b] / wts.sum(), dim=0))
    other = zone_weights("right", ("upper",), h, w)
    assert not torch.allclose(local.region[0], F.normalize(other @ tokens[0] / other.sum(), dim=0))
    assert local.tag_logits.shape == (2, len(QATA_TAGS)) and local.tag_valid.all()


def test_the_anatomy_term_is_least_for_matched_region_phrase_pairs():
    loss = ASGLoss(tau=0.07)
    phrase = torch.eye(8)[:4]  # four distinct phrases
    ids = torch.arange(4)
    matched = loss.region_term(phrase.clone(), phrase, ids)
    shuffled = loss.region_term(phrase[[1, 2, 3, 0]], phrase, ids)
    noisy = loss.region_term(F.normalize(phrase + 0.5 * _rand(4, 8), dim=-1), phrase, ids)
    assert matched < 1e-4 < noisy < shuffled
    # identical phrases are positives of each other: two regions named alike are not pushed apart
    same = loss.region_term(phrase[[0, 0, 1]], phrase[[0, 0, 1]], torch.tensor([0, 0, 1]))
    torch.testing.assert_close(same, torch.tensor(2 / 3 * math.log(2.0)), atol=1e-3, rtol=0)  # log 2 on 2 of 3 rows
    assert loss.region_term(phrase[:1], phrase[:1], ids[:1]) == 0  # one region: nothing to contrast


def test_tag_terms_by_hand():
    logits, tags = _rand(3, 6), (torch.rand(3, 6, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    bce = F.binary_cross_entropy_with_logits(logits, tags, reduction="none").sum(1)
    torch.testing.assert_close(asymmetric_loss(logits, tags, gamma_neg=0.0, gamma_pos=0.0, clip=0.0), bce)
    p = torch.sigmoid(logits)
    pm = (p - 0.05).clamp_min(0)
    asl = -(tags * torch.log(p) + (1 - tags) * pm ** 4 * torch.log(1 - pm)).sum(1)
    torch.testing.assert_close(asymmetric_loss(logits, tags), asl)
    t = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [1.0, 1.0, 0], [0, 0, 0]])
    soft = tag_soft_labels(t, torch.tensor([True, True, True, False]))
    torch.testing.assert_close(soft[:3].sum(1), torch.ones(3))
    assert soft[0, 0] == soft[0, 1] > soft[0, 2] > 0 and soft[3].sum() == 0 and soft[:, 3].sum() == 0
    logits2 = _rand(4, 4, seed=3)
    none = soft_label_nce(logits2, soft, torch.zeros(4, dtype=torch.bool))
    assert none == 0


def test_asg_reduces_to_the_instance_term_without_anatomy(asg_vlm):
    cfg = asg_vlm.cfg
    with torch.no_grad():
        out = asg_vlm(torch.rand(2, 3, cfg.image_size, cfg.image_size), [NUCLEI, NUCLEI + " x"], local=True)
    terms = ASGLoss.from_config(cfg)(out.image, out.text, out.local)
    assert out.local.region.shape[0] == 0 and not out.local.tag_valid.any()
    assert terms["region"] == 0 and terms["tag"] == 0 and terms["soft"] == 0
    torch.testing.assert_close(terms["loss"], terms["instance"])


# ---------------------------------------------------------------- the models and the objective
@pytest.mark.parametrize("extra", [CMITM, ASG], ids=["cmitm", "asg"])
def test_every_term_trains_the_model_and_the_shared_modules_start_as_dusss(extra, smoke_vlm):
    torch.manual_seed(0)
    model = DuSSSVLM.from_config(make_config("smoke", **extra)).train()
    name = extra["step1_objective"]
    cfg = model.cfg
    images = torch.rand(4, 3, cfg.image_size, cfg.image_size)
    masks = (torch.rand(4, 1, cfg.image_size, cfg.image_size) > 0.9).float()
    objective = _Objective(cfg)
    terms = objective(model, images, [A, B, A, B], [A, B, A, B], masks, torch.tensor([True, False, False, False]),
                      torch.Generator().manual_seed(0))
    keys = ("contrast", "mim", "mlm") if name == "cmitm" else ("instance", "region", "tag", "soft")
    for key in keys + ("tg",):
        key = key if key == "tg" else f"{name}_{key}"
        assert torch.isfinite(terms[key]) and terms[key] > 0, key
    terms["loss"].backward()
    parts = (("mim_decoder", "mim_head", "mim_text", "mlm_decoder", "mlm_bias", "image_encoder.vit", "decoder")
             if name == "cmitm" else ("region_proj", "phrase_proj", "tag_decoder", "tag_head", "image_encoder.vit"))
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for part in parts:
        assert any(n.startswith(part) and g is not None and g.abs().sum() > 0 for n, g in grads.items()), part
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    assert not any(p.requires_grad for p in model.text_encoder.backbone.parameters())  # MiniLM stays frozen
    # the new heads are built last: the modules a DuSSS VLM has start as that of the same seed
    torch.manual_seed(0)
    fresh = DuSSSVLM.from_config(make_config("smoke", **extra))
    torch.manual_seed(0)
    plain = DuSSSVLM.from_config(make_config("smoke"))
    assert set(plain.state_dict()) < set(fresh.state_dict())
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, msg=key)
    with pytest.raises(ValueError, match="'cmitm' or 'asg'"):
        smoke_vlm(images[:1], [A], local=True)


def test_config_names_the_choices_and_their_conflicts():
    with pytest.raises(ConfigError, match="must be one of dusss, mgca, cmitm, asg"):
        make_config("smoke", step1_objective="clip")
    for name in ("cmitm", "asg"):
        with pytest.raises(ConfigError, match=f"{name.upper()}'s terms: set use_sss=false"):
            make_config("smoke", step1_objective=name)
    cfg = make_config("smoke", **CMITM, use_tg=True, ground_sup=True)
    assert (cfg.cmitm_mask_ratio, cfg.cmitm_mlm_ratio, cfg.cmitm_tau, cfg.cmitm_norm_pix) == (0.75, 0.15, 0.07, True)
    for key, value in (("cmitm_mask_ratio", 1.0), ("cmitm_mlm_ratio", 0.0), ("cmitm_tau", 0.0),
                       ("cmitm_decoder_depth", 0), ("cmitm_w_mim", -1.0), ("asg_tau", 0.0), ("asg_w_region", -0.5)):
        with pytest.raises(ConfigError, match=key):
            make_config("smoke", **CMITM, **{key: value})


# ---------------------------------------------------------------- the Table-1 rows and their VLM folders
def test_the_rows_read_vlms_of_their_own():
    folders = {}
    for row, paper in (("cmitm", "CMITM"), ("asg", "ASG")):
        spec = ROWS[row]
        assert row in TABLE1_ROWS and needs_vlm(row) and spec.method == "dusss" and spec.paper1 == paper
        assert vlm_variant(spec.switches) == f"{row}-tg0" and run_name(row, 0.5, 1) == f"dusss-{row}-tg0-r0.5-s1"
        pre = pretrain_config(run_config("smoke", "qata-synth", row, 0.5, 666, {}))
        assert pre.step1_objective == row and not pre.use_tg and pre.ground_sup
        assert all((row, q) in GRIDS["table1"] for q in (0.25, 0.5))
    for row in ("dusss", "clip", "mgca", "cmitm", "asg"):
        folders[row] = default_vlm_checkpoint(run_config("smoke", "qata-synth", row, 0.5, 666, {})).parent.name
    assert len(set(folders.values())) == 5, folders
    assert folders["cmitm"] == "cmitm-tg0-s666" and folders["asg"] == "asg-tg0-s666"
    assert TABLE1_ROWS.index("cmitm") < TABLE1_ROWS.index("asg") < TABLE1_ROWS.index("mgca")  # the paper's order


# ---------------------------------------------------------------- real smoke runs
@pytest.mark.parametrize("extra", [CMITM, ASG], ids=["cmitm", "asg"])
def test_pretraining_learns_and_other_objectives_are_refused_in_its_folder(extra, tmp_path_factory):
    name = extra["step1_objective"]
    root = str(tmp_path_factory.mktemp("data") / "qata-synth")
    out = tmp_path_factory.mktemp(name) / "run"
    cfg = make_config("smoke", data_root=root, out_dir=str(out), num_threads=1, vlm_epochs=3, **extra)
    metrics = pretrain(cfg, progress=False)
    assert metrics["last_loss"] < metrics["first_loss"]
    defining = ("cmitm_mim", "cmitm_mlm") if name == "cmitm" else ("asg_region", "asg_tag")
    for key in defining:
        assert metrics[f"last_{key}"] < metrics[f"first_{key}"], key
    assert math.isfinite(metrics["last_tg"]) and math.isfinite(metrics["last_ground_sup"])
    assert 0.0 <= metrics["test_dice"] <= 1.0 and metrics["n_labelled_masks"] == 12
    header = (out / "history.csv").read_text().splitlines()[0].split(",")
    assert {f"{name}_{k}" for k in ("mim", "mlm")} <= set(header) if name == "cmitm" else {"asg_region"} <= set(header)
    assert json.loads((out / "config.json").read_text())["step1_objective"] == name
    model = load_vlm(out / "vlm.pt")
    assert (model.cmitm, model.asg) == (name == "cmitm", name == "asg")
    with torch.no_grad():
        assert model.text_guided_logits(torch.rand(2, 3, 64, 64), [A, B]).shape == (2, 1, 64, 64)
    other = "asg" if name == "cmitm" else "cmitm"
    for kwargs in ({}, dict(OFF, step1_objective=other), dict(OFF, step1_objective="mgca")):
        with pytest.raises(ConfigError, match="other settings .*step1_objective"):
            pretrain(make_config("smoke", data_root=root, out_dir=str(out), num_threads=1, vlm_epochs=3, **kwargs),
                     progress=False)
