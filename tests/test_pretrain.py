"""Step-1 pre-training: metric helpers against hand computations, and real smoke runs (loss, reload, resume)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

import dusss.pretrain as pretrain_mod
from dusss.cli import main as cli_main
from dusss.config import make_config
from dusss.pretrain import (MaskReferences, photometric_view, pointing_game, pretrain, retrieval_metrics,
                            same_text_mask, zones_named)
from dusss.utils import load_checkpoint
from dusss.vlm import load_vlm

A = "Unilateral pulmonary infection, one infected area, upper left lung."
B = "Bilateral pulmonary infection, two infected areas, all left lung and lower right lung."
C = "Unilateral pulmonary infection, one infected area, upper right lung."


# ---------------------------------------------------------------- helpers
def test_same_text_mask_marks_identical_reports():
    mask = same_text_mask([A, B, A, C])
    expected = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_retrieval_counts_identical_reports_as_hits():
    texts = [A, A, B, C]
    txt = torch.eye(4)
    # image 0 is closest to text 1 (same report A): a hit; image 2 closest to text 3 (C, not B): a miss
    img = torch.stack([txt[1], txt[1], txt[3], txt[3]])
    m = retrieval_metrics(img, txt, texts)
    assert m["i2t_r1"] == pytest.approx(3 / 4)
    # text->image: text 0 -> images 0/1 tie (both A), text 1 -> image 0/1, text 2 (B) -> image 0 (A): miss,
    # text 3 (C) -> image 2 or 3: image 3 is C (hit) only if chosen; topk picks the first maximum
    assert 0.5 <= m["t2i_r1"] <= 1.0
    assert m["i2t_r5"] == 1.0 and m["t2i_r5"] == 1.0
    assert m["chance_r1"] == pytest.approx((2 / 4 + 2 / 4 + 1 / 4 + 1 / 4) / 4)


def test_pointing_game_by_hand():
    maps = torch.zeros(3, 1, 4, 4)
    masks = torch.zeros(3, 1, 4, 4)
    maps[0, 0, 1, 1] = 5.0
    masks[0, 0, 1, 1] = 1.0  # hit
    maps[1, 0, 3, 3] = 5.0
    masks[1, 0, 0, 0] = 1.0  # miss
    hits = pointing_game(maps, masks)  # image 2 has an empty mask: NaN
    assert hits[:2].tolist() == [1.0, 0.0] and math.isnan(hits[2].item())


def test_zone_reference_is_the_mean_mask_of_its_zone_group():
    masks = torch.zeros(3, 1, 4, 4)
    masks[0, 0, 0, :2] = 1.0  # A
    masks[1, 0, 1, :2] = 1.0  # A again, lesion lower
    masks[2, 0, 3, 2:] = 1.0  # C
    refs = MaskReferences(masks, [A, A, C])
    torch.testing.assert_close(refs.zone_map(A), masks[:2].mean(0, keepdim=True))
    torch.testing.assert_close(refs.zone_map(C), masks[2:].mean(0, keepdim=True))
    torch.testing.assert_close(refs.zone_map(B), masks.mean(0, keepdim=True))  # unseen zones -> global mean
    scores = refs.score(masks, [A, A, C])
    assert scores["ref_zones_dice"][2] == pytest.approx(1.0)  # the only C image is its own mean
    assert all(0.0 <= d <= 1.0 for d in scores["ref_mean_dice"])
    assert zones_named(B) == (("left", "all"), ("right", "lower"))
    assert zones_named("free text") == ("free text",)


def test_photometric_view_keeps_geometry_and_range():
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(2, 3, 8, 8)
    images[:, :, 2:4, 2:4] = 0.8
    view = photometric_view(images, g)
    assert view.shape == images.shape and view.min() >= 0 and view.max() <= 1
    bright = view[:, :, 2:4, 2:4].mean()
    assert bright > view[:, :, 5:, 5:].mean() + 0.3  # the bright square stays where it was
    again = photometric_view(images, torch.Generator().manual_seed(0))
    torch.testing.assert_close(view, again)


# ---------------------------------------------------------------- real smoke runs
@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("data") / "qata-synth")


def _cfg(data_root: str, out: Path, **kw):
    return make_config("smoke", data_root=data_root, out_dir=str(out), num_threads=1, **kw)


def test_pretrain_command_learns_and_writes_a_loadable_checkpoint(data_root, tmp_path):
    out = tmp_path / "run"
    argv = ["pretrain", "--profile", "smoke", "--data-root", data_root, "--out", str(out),
            "--set", "num_threads=1", "--set", "vlm_epochs=3"]
    assert cli_main(argv) == 0
    for name in ("vlm.pt", "last.pt", "history.csv", "metrics.json", "config.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["last_loss"] < metrics["first_loss"]
    for key in ("test_dice", "test_pointing", "test_i2t_r1", "test_t2i_r5", "test_ref_zones_dice"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["n_labelled_masks"] == 12  # 25 % of the 48 smoke training images
    header = (out / "history.csv").read_text().splitlines()[0].split(",")
    for term in ("loss", "cmc", "imc", "imc_image", "imc_text", "tg", "ground_sup", "tau", "val_dice"):
        assert term in header, term
    model = load_vlm(out / "vlm.pt", "cpu")
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert model.text_guided_logits(images, [A, B]).shape == (2, 1, 64, 64)
    # a completed run is read back, not retrained
    start = time.perf_counter()
    again = pretrain(make_config("smoke", data_root=data_root, out_dir=str(out), num_threads=1, vlm_epochs=3))
    assert again == metrics and time.perf_counter() - start < 5.0


def test_interrupted_run_resumes_where_it_stopped(data_root, tmp_path, monkeypatch):
    full = pretrain(_cfg(data_root, tmp_path / "full"), progress=False)

    real_evaluate = pretrain_mod.evaluate_vlm
    calls = {"n": 0}

    def interrupt_in_epoch_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(pretrain_mod, "evaluate_vlm", interrupt_in_epoch_two)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        pretrain(_cfg(data_root, out), progress=False)
    assert load_checkpoint(out / "last.pt")["epoch"] == 1 and not (out / "metrics.json").exists()
    monkeypatch.setattr(pretrain_mod, "evaluate_vlm", real_evaluate)
    resumed = pretrain(_cfg(data_root, out), progress=False)
    rows = (out / "history.csv").read_text().splitlines()
    assert len(rows) == 3  # header + epochs 1 and 2, epoch 1 not repeated
    # the resumed run ends where the uninterrupted one does (per-epoch seeding, optimiser restored)
    assert resumed["last_loss"] == pytest.approx(full["last_loss"], rel=1e-4)
    a = load_checkpoint(out / "vlm.pt")["model"]
    b = load_checkpoint(tmp_path / "full" / "vlm.pt")["model"]
    for key in ("mask_bias", "img_proj.weight"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_other_settings_in_the_same_folder_are_refused(data_root, tmp_path):
    out = tmp_path / "run"
    pretrain(_cfg(data_root, out, vlm_epochs=1), progress=False)
    with pytest.raises(ValueError, match="other settings .*use_sss"):
        pretrain(_cfg(data_root, out, vlm_epochs=1, use_sss=False), progress=False)


def test_loss_switches_give_the_ablation_variants(data_root, tmp_path):
    # CLIP-style (CMC only, no SSS) and text-guided loss only: the ablation issue needs both
    variants = {"clip": dict(use_sss=False, use_imc=False, use_tg=False, ground_sup=False),
                "tg_only": dict(use_cmc=False, use_imc=False, use_tg=True, ground_sup=False)}
    for name, kw in variants.items():
        metrics = pretrain(_cfg(data_root, tmp_path / name, vlm_epochs=1, **kw), progress=False)
        assert math.isfinite(metrics["last_loss"]) and metrics["n_labelled_masks"] == 0
    header = (tmp_path / "tg_only" / "history.csv").read_text().splitlines()
    row = dict(zip(header[0].split(","), header[1].split(",")))
    assert float(row["cmc"]) == 0.0 and float(row["tg"]) > 0.0


def test_a_step1_key_missing_from_an_older_run_counts_as_unchanged(data_root, tmp_path):
    # the rule shared with Step 2 (dusss.config.config_differences): a run written before a key existed
    # was made with that key's default behaviour, so it is reused; a key that really differs is refused
    out = tmp_path / "old"
    done = pretrain(_cfg(data_root, out, vlm_epochs=1), progress=False)
    saved = json.loads((out / "config.json").read_text())
    del saved["same_text_positive"]
    (out / "config.json").write_text(json.dumps(saved))
    assert pretrain(_cfg(data_root, out, vlm_epochs=1), progress=False) == done
    with pytest.raises(ValueError, match="use_imc"):
        pretrain(_cfg(data_root, out, vlm_epochs=1, use_imc=False), progress=False)


def test_bf16_autocast_runs_the_encoders_in_bf16_and_the_losses_in_float32(smoke_vlm):
    # amp="bf16" on the CPU exercises the path amp="auto" takes on CUDA
    from dusss.pretrain import _Objective

    cfg = make_config("smoke", amp="bf16")
    seen = []
    hook = smoke_vlm.img_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    images = torch.rand(4, 3, cfg.image_size, cfg.image_size)
    masks = (torch.rand(4, 1, cfg.image_size, cfg.image_size) > 0.9).float()
    labelled = torch.tensor([True, False, True, False])
    texts = [A, B, A, B]
    try:
        terms = _Objective(cfg)(smoke_vlm, images, texts, texts[::-1], masks, labelled, torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert seen and all(d == torch.bfloat16 for d in seen)
    for key, value in terms.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), key
    assert terms["cmc"] > 0 and terms["imc"] > 0 and terms["ground_sup"] > 0
    off = _Objective(cfg.replace(amp="off"))(smoke_vlm, images, texts, texts[::-1], masks, labelled,
                                              torch.Generator().manual_seed(0))
    # same maths, bf16 rounding only
    assert terms["loss"].item() == pytest.approx(off["loss"].item(), rel=0.1)
