"""MGCA as a Step-1 objective (Table 1's MGCA row): its three terms against hand computations, and a real smoke run."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from dusss.config import ConfigError, make_config
from dusss.experiments.grid import GRIDS
from dusss.losses import (MGCALoss, clipped_token_weights, cross_attend, prototype_alignment, sinkhorn_knopp,
                          token_alignment_nce)
from dusss.pretrain import _Objective, pretrain
from dusss.runs import (ROWS, TABLE1_ROWS, default_vlm_checkpoint, needs_vlm, pretrain_config, pretrain_dir,
                        run_config, run_name, vlm_variant)
from dusss.vlm import DuSSSVLM, load_vlm

A = "Unilateral pulmonary infection, one infected area, upper left lung."
B = "Bilateral pulmonary infection, two infected areas, all left lung and lower right lung."
MGCA = dict(step1_objective="mgca", use_sss=False, use_cmc=False, use_imc=False)


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ---------------------------------------------------------------- prototype level
def test_sinkhorn_codes_are_distributions_with_uniform_prototype_marginals():
    scores = _unit(16, 32) @ _unit(8, 32, seed=1).T  # (B, K) cosines of 16 samples on 8 prototypes
    codes = sinkhorn_knopp(scores, eps=0.05, iters=100)
    assert codes.shape == (16, 8) and (codes >= 0).all()
    torch.testing.assert_close(codes.sum(1), torch.ones(16))  # each sample: a distribution over prototypes
    torch.testing.assert_close(codes.sum(0), torch.full((8,), 16 / 8), rtol=1e-3, atol=1e-3)  # equal partition
    # MGCA's 3 iterations, by hand: rows to 1/K, columns to 1/B, three times, then columns normalised
    q = torch.exp(scores / 0.05).T.double()
    q /= q.sum()
    for _ in range(3):
        q /= q.sum(1, keepdim=True) * 8
        q /= q.sum(0, keepdim=True) * 16
    torch.testing.assert_close(sinkhorn_knopp(scores, 0.05, 3), (q / q.sum(0, keepdim=True)).T.float())
    # a raw softmax would put most samples on the same prototype; the codes spread them
    assert codes.sum(0).max() < F.softmax(scores / 0.05, dim=1).sum(0).max()


def test_prototype_term_is_the_swapped_prediction_by_hand():
    img, txt = torch.randn(4, 6, generator=torch.Generator().manual_seed(2)), torch.randn(4, 6)
    q_img, q_txt = sinkhorn_knopp(img, 0.05, 3), sinkhorn_knopp(txt, 0.05, 3)
    by_hand = 0.0
    for i in range(4):
        by_hand += -(q_img[i] * torch.log(torch.softmax(txt[i] / 0.2, 0))).sum() / 8
        by_hand += -(q_txt[i] * torch.log(torch.softmax(img[i] / 0.2, 0))).sum() / 8
    torch.testing.assert_close(prototype_alignment(img, txt, tau=0.2, eps=0.05, iters=3), by_hand)
    # text scores that agree with the image's assignment cost less than ones that contradict it
    assert prototype_alignment(img, img) < prototype_alignment(img, -img)


# ---------------------------------------------------------------- token level
def test_cross_attention_reads_the_other_modality():
    words, patches = _unit(1, 3, 8), _unit(1, 5, 8, seed=1)
    att = cross_attend(words, patches, tau=0.1)  # (1, 3, 8)
    assert att.shape == (1, 3, 8)
    torch.testing.assert_close(att.norm(dim=-1), torch.ones(1, 3))
    # by hand: softmax over the patches of word . patch / tau, then the weighted patches, normalised
    w = torch.softmax(words[0] @ patches[0].T / 0.1, dim=1)
    torch.testing.assert_close(att[0], F.normalize(w @ patches[0], dim=-1))
    # other patches, another attended representation of the same word
    assert not torch.allclose(cross_attend(words, _unit(1, 5, 8, seed=2), tau=0.1), att)
    # a patch that copies word 0 draws word 0's attention at a low temperature
    patches2 = patches.clone()
    patches2[0, 4] = words[0, 0]
    assert F.cosine_similarity(cross_attend(words, patches2, tau=0.01)[0, 0], words[0, 0], dim=0) > 0.99
    # masked keys (padding words) get no weight: changing one leaves the patches' attended words unchanged
    mask = torch.tensor([[True, True, False]])
    other = words.clone()
    other[0, 2] = _unit(8, seed=5)
    torch.testing.assert_close(cross_attend(patches, words, mask), cross_attend(patches, other, mask))


def test_token_loss_matches_a_hand_computation():
    tokens, attended = _unit(2, 3, 4), _unit(2, 3, 4, seed=1)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    weights = clipped_token_weights(torch.rand(2, 3, generator=torch.Generator().manual_seed(3)), mask)
    by_hand = 0.0
    for b in range(2):
        n = int(mask[b].sum())
        sim = tokens[b, :n] @ attended[b, :n].T / 0.1  # padding is neither an anchor nor a negative
        for i in range(n):
            by_hand += weights[b, i] * (-torch.log_softmax(sim[i], 0)[i] - torch.log_softmax(sim[:, i], 0)[i]) / 2
    got = token_alignment_nce(tokens, attended, weights, tau=0.1, mask=mask)
    torch.testing.assert_close(got, by_hand / 2)


def test_token_loss_is_lowest_when_the_image_shows_what_the_words_say():
    words = torch.eye(8)[:4].unsqueeze(0)  # (1, 4, 8): four orthogonal "words"
    aligned = torch.cat([torch.eye(8)[:4], _unit(4, 8, seed=1)]).unsqueeze(0)  # the image holds every word
    unrelated = _unit(1, 8, 8, seed=2)
    mask, attn = torch.ones(1, 4, dtype=torch.bool), torch.ones(1, 4)

    def word_loss(patches: torch.Tensor) -> torch.Tensor:
        return token_alignment_nce(words, cross_attend(words, patches, tau=0.1), clipped_token_weights(attn, mask),
                                   tau=0.1, mask=mask)

    assert word_loss(aligned) < 0.1 < word_loss(unrelated)


def test_token_weights_are_clipped_cls_attention():
    attn = torch.tensor([[0.0, 1.0, 2.0, 3.0, 100.0, 7.0]])
    mask = torch.tensor([[True, True, True, True, True, False]])
    w = clipped_token_weights(attn, mask)
    lo, hi = torch.quantile(attn[0, :5], 0.1), torch.quantile(attn[0, :5], 0.9)
    expected = attn[0, :5].clamp(lo, hi)
    torch.testing.assert_close(w[0, :5], expected / expected.sum())
    assert w[0, 5] == 0 and w.sum() == pytest.approx(1.0)


# ---------------------------------------------------------------- the model and the objective
@pytest.fixture(scope="module")
def mgca_vlm() -> DuSSSVLM:
    torch.manual_seed(0)
    return DuSSSVLM.from_config(make_config("smoke", **MGCA)).train()


def test_mgca_features_and_every_term_train_the_model(mgca_vlm):
    cfg = mgca_vlm.cfg
    images = torch.rand(4, 3, cfg.image_size, cfg.image_size)
    masks = (torch.rand(4, 1, cfg.image_size, cfg.image_size) > 0.9).float()
    labelled = torch.tensor([True, False, False, False])
    out = mgca_vlm(images, [A, B, A, B], local=True)
    local, grid = out.local, (cfg.image_size // cfg.vit_patch) ** 2
    assert local.patches.shape == (4, grid, cfg.embed_dim) and local.patch_attn.shape == (4, grid)
    assert local.words.shape[:2] == local.word_mask.shape == local.word_attn.shape
    assert local.word_mask.sum(1).tolist()[:2] == [12, 16]  # words (pieces merged), no [CLS]/[SEP]
    assert local.proto_image.shape == (4, cfg.mgca_prototypes)
    objective = _Objective(cfg)
    mgca_vlm.zero_grad()
    terms = objective(mgca_vlm, images, [A, B, A, B], [A, B, A, B], masks, labelled, torch.Generator())
    for key in ("mgca_instance", "mgca_token", "mgca_token_word", "mgca_token_patch", "mgca_proto", "tg",
                "ground_sup"):
        assert torch.isfinite(terms[key]) and terms[key] > 0, key
    assert terms["cmc"] == 0 and terms["imc"] == 0
    terms["loss"].backward()
    grads = {n: p.grad for n, p in mgca_vlm.named_parameters() if p.requires_grad}
    for part in ("word_local", "patch_local", "prototypes", "image_encoder.vit", "decoder", "txt_proj"):
        assert any(n.startswith(part) and g is not None and g.abs().sum() > 0 for n, g in grads.items()), part
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    objective.after_backward(mgca_vlm, epoch=0)  # MGCA: prototypes fixed in the first epoch
    assert mgca_vlm.prototypes.weight.grad is None
    torch.testing.assert_close(mgca_vlm.prototypes.weight.norm(dim=1), torch.ones(cfg.mgca_prototypes))


def test_mgca_weights_switch_terms_off(mgca_vlm):
    cfg = mgca_vlm.cfg
    out = mgca_vlm(torch.rand(2, 3, cfg.image_size, cfg.image_size), [A, B], local=True)
    full = MGCALoss.from_config(cfg)(out.image, out.text, out.local)
    only_token = MGCALoss(w_instance=0.0, w_proto=0.0)(out.image, out.text, out.local)
    torch.testing.assert_close(only_token["loss"], full["token"])
    torch.testing.assert_close(full["loss"], full["instance"] + full["token"] + full["proto"])


def test_the_shared_modules_start_as_the_dusss_vlm_of_the_same_seed(mgca_vlm, smoke_vlm):
    # the MGCA heads are built last, so an MGCA and a DuSSS VLM of one seed differ only in their objective
    assert not any(k.startswith(("word_local", "patch_local", "prototypes")) for k in smoke_vlm.state_dict())
    assert set(smoke_vlm.state_dict()) < set(mgca_vlm.state_dict())
    with pytest.raises(ValueError, match="step1_objective='mgca'"):
        smoke_vlm(torch.rand(1, 3, 64, 64), [A], local=True)
    torch.manual_seed(0)
    fresh = DuSSSVLM.from_config(make_config("smoke", **MGCA))
    torch.manual_seed(0)
    plain = DuSSSVLM.from_config(make_config("smoke"))
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, msg=key)


def test_config_names_the_mgca_choice_and_its_conflicts():
    with pytest.raises(ConfigError, match="step1_objective.*must be one of dusss, mgca"):
        make_config("smoke", step1_objective="clip")
    with pytest.raises(ConfigError, match="use_sss=false, use_cmc=false and use_imc=false"):
        make_config("smoke", step1_objective="mgca")
    cfg = make_config("smoke", **MGCA, use_tg=False, ground_sup=True)  # the grounding decoder still trains
    assert (cfg.mgca_w_instance, cfg.mgca_w_token, cfg.mgca_w_proto) == (1.0, 1.0, 1.0)
    assert (cfg.mgca_tau_instance, cfg.mgca_tau_token, cfg.mgca_tau_proto) == (0.07, 0.1, 0.2)
    with pytest.raises(ConfigError, match="mgca_tau_token"):
        make_config("smoke", **MGCA, mgca_tau_token=0.0)


# ---------------------------------------------------------------- the Table-1 row and its VLM folder
def test_the_mgca_row_reads_its_own_vlm():
    spec = ROWS["mgca"]
    assert "mgca" in TABLE1_ROWS and needs_vlm("mgca") and spec.method == "dusss" and spec.paper1 == "MGCA"
    assert vlm_variant(spec.switches) == "mgca-tg0" and run_name("mgca", 0.5, 1) == "dusss-mgca-tg0-r0.5-s1"
    cfg = run_config("smoke", "qata-synth", "mgca", 0.5, 666, {})
    pre = pretrain_config(cfg)
    assert pre.step1_objective == "mgca" and not pre.use_tg and pre.ground_sup
    assert default_vlm_checkpoint(cfg) == pretrain_dir(pre) / "vlm.pt"
    others = {default_vlm_checkpoint(run_config("smoke", "qata-synth", row, 0.5, 666, {})) for row in ("dusss", "clip")}
    assert default_vlm_checkpoint(cfg).parent.name == "mgca-tg0-s666" and default_vlm_checkpoint(cfg) not in others
    assert all(("mgca", q) in GRIDS["table1"] for q in (0.25, 0.5))  # the grid pre-trains this VLM for the row
    # a mapping without the objective is a DuSSS variant, as before
    assert vlm_variant({"use_sss": True, "use_cmc": True, "use_imc": True, "use_tg": True}) == "sss1-cmc1-imc1-tg1"


# ---------------------------------------------------------------- a real smoke run
def test_pretraining_with_mgca_learns_and_a_dusss_config_is_refused(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data") / "qata-synth")
    out = tmp_path_factory.mktemp("mgca") / "run"
    cfg = make_config("smoke", data_root=root, out_dir=str(out), num_threads=1, vlm_epochs=3, **MGCA)
    metrics = pretrain(cfg, progress=False)
    assert metrics["last_loss"] < metrics["first_loss"]
    assert metrics["last_mgca_token"] < metrics["first_mgca_token"]
    for key in ("first_mgca_instance", "first_mgca_proto", "last_tg", "last_ground_sup"):
        assert math.isfinite(metrics[key]), key
    assert 0.0 <= metrics["test_dice"] <= 1.0 and metrics["n_labelled_masks"] == 12
    header = (out / "history.csv").read_text().splitlines()[0].split(",")
    assert {"mgca_instance", "mgca_token", "mgca_proto", "tg", "ground_sup"} <= set(header)
    assert json.loads((out / "config.json").read_text())["step1_objective"] == "mgca"
    model = load_vlm(out / "vlm.pt")
    assert model.mgca and model.prototypes.weight.shape == (cfg.mgca_prototypes, cfg.embed_dim)
    with torch.no_grad():
        assert model.text_guided_logits(torch.rand(2, 3, 64, 64), [A, B]).shape == (2, 1, 64, 64)
    with pytest.raises(ConfigError, match="other settings .*step1_objective"):
        pretrain(make_config("smoke", data_root=root, out_dir=str(out), num_threads=1, vlm_epochs=3), progress=False)
