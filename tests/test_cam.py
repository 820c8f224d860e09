"""Activation maps (Fig. 5) and their measures: library maps against a hand computation, limits, hand-made maps."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from dusss.cam import (CAM_METHODS, activation_maps, activation_share, cam_target_layer, measure_maps,
                       paired_difference, pairwise_correlation, pairwise_iou, plot_paraphrase_maps,
                       plot_qualitative_grid, reports_for, select_by_quantiles, summarize_measures,
                       vit_reshape_transform)
from dusss.config import make_config
from conftest import SMOKE_REPORTS
from dusss.vlm import DuSSSVLM

TEXTS = SMOKE_REPORTS


@pytest.fixture(scope="module")
def vlm(smoke_vlm) -> DuSSSVLM:
    return smoke_vlm.requires_grad_(False)


def _images(n: int = 2, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", CAM_METHODS)
def test_maps_have_image_shape_and_unit_range(vlm, method):
    maps = activation_maps(vlm, _images(), TEXTS, method)
    assert maps.shape == (2, 64, 64)
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1 + 1e-6
    assert (maps.flatten(1).max(1).values > 0.99).all()  # min-max scaled, not flat
    # the frozen VLM stays frozen: no parameter was switched to training
    assert not any(p.requires_grad for p in vlm.parameters())


def test_gradcam_equals_hand_computation(vlm):
    """Grad-CAM by hand: gradient of s_I . s_T at the target layer, channel weights = spatial mean, ReLU, resize."""
    import cv2

    images = _images()
    with torch.no_grad():
        text_s = vlm.encode_text(TEXTS)[0].s  # (2, E)
    store = {}
    handle = cam_target_layer(vlm).register_forward_hook(lambda m, i, o: store.__setitem__("act", o))
    x = images.clone().requires_grad_(True)
    sim = (vlm.encode_image(x, ground=False)[0].s * text_s).sum()
    handle.remove()
    grad = torch.autograd.grad(sim, store["act"])[0]  # (2, 1 + 16, W)
    act = store["act"][:, 1:].detach().reshape(2, 4, 4, -1)  # (2, 4, 4, W)
    weights = grad[:, 1:].reshape(2, 4, 4, -1).mean((1, 2))  # (2, W)
    cam = torch.relu((act * weights[:, None, None, :]).sum(-1)).numpy()  # (2, 4, 4)
    def minmax(c):
        c = c - c.min()
        return c / (1e-7 + c.max())

    # the library scales each map to [0, 1], resizes it bilinearly, and scales the resized map again
    expected = [minmax(cv2.resize(np.float32(minmax(c)), (64, 64))) for c in cam]
    got = activation_maps(vlm, images, TEXTS, "gradcam")
    torch.testing.assert_close(got, torch.from_numpy(np.stack(expected)), atol=1e-4, rtol=1e-4)


def test_gradcam_depends_on_the_report_eigencam_does_not(vlm):
    image = _images(1).expand(2, -1, -1, -1)
    grad = activation_maps(vlm, image, TEXTS, "gradcam")
    eig = activation_maps(vlm, image, TEXTS, "eigencam")
    assert (grad[0] - grad[1]).abs().max() > 1e-3
    torch.testing.assert_close(eig[0], eig[1])
    assert pairwise_correlation(eig) == pytest.approx(1.0) and pairwise_iou(eig) == pytest.approx(1.0)


def test_image_embedding_that_ignores_the_image_gives_flat_maps():
    """If s_I does not depend on the encoder's tokens, no pixel moves the similarity: the map is all zero."""
    torch.manual_seed(0)
    model = DuSSSVLM.from_config(make_config("smoke")).eval().requires_grad_(False)
    with torch.no_grad():
        model.img_proj.weight.zero_()
        model.img_proj.bias.normal_()
    maps = activation_maps(model, _images(), TEXTS, "gradcam")
    assert maps.abs().max() == 0
    assert math.isnan(pairwise_correlation(maps)) and math.isnan(pairwise_iou(maps))
    assert torch.isnan(activation_share(maps, torch.ones(2, 1, 64, 64))).all()
    # in the per-image table a flat map counts as flat and plays no pointing game (its arg-max would be pixel 0)
    mask = torch.zeros(1, 64, 64)
    mask[:, :8, :8] = 1.0
    table = measure_maps(model, [{"image": _images(1)[0], "mask": mask, "text": TEXTS[0], "name": "a"}],
                         n_paraphrases=1, methods=("gradcam",), progress=False)
    assert table["flat"].tolist() == [1.0] and table[["share", "pointing"]].isna().all(axis=None)


def test_reshape_transform_puts_tokens_on_their_grid():
    tokens = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3)  # (B, 1 + 2*3, W)
    grid = vit_reshape_transform((2, 3))(tokens)
    assert grid.shape == (2, 3, 2, 3)
    torch.testing.assert_close(grid[1, :, 1, 2], tokens[1, 1 + 1 * 3 + 2])
    with pytest.raises(ValueError, match="grid"):
        vit_reshape_transform((3, 3))(tokens)


def test_unknown_method_and_mismatched_reports_raise(vlm):
    with pytest.raises(ValueError, match="scorecam"):
        activation_maps(vlm, _images(), TEXTS, "scorecam")
    with pytest.raises(ValueError, match="one report per image"):
        activation_maps(vlm, _images(3), TEXTS, "gradcam")


def test_pairwise_measures_on_hand_made_maps():
    a = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    # pairs (a, a) = 1, (a, -a) = -1 twice -> -1/3
    assert pairwise_correlation(torch.stack([a, a, -a])) == pytest.approx(-1 / 3)
    # a flat map is left out; with no pair left the answer is NaN
    assert pairwise_correlation(torch.stack([a, a, torch.zeros(2, 2)])) == pytest.approx(1.0)
    assert math.isnan(pairwise_correlation(torch.stack([a, torch.ones(2, 2)])))
    # thresholded at half range: a -> {2, 3}; b -> {1, 3}; c -> {3}
    b = torch.tensor([[0.0, 1.0], [0.2, 1.0]])
    c = torch.tensor([[0.0, 0.0], [0.0, 5.0]])
    # IoU(a, b) = 1/3, IoU(a, c) = 1/2, IoU(b, c) = 1/2
    assert pairwise_iou(torch.stack([a, b, c])) == pytest.approx((1 / 3 + 0.5 + 0.5) / 3)


def test_activation_share_and_its_empty_cases():
    maps = torch.tensor([[[1.0, 2.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])
    masks = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])
    share = activation_share(maps, masks.unsqueeze(1))
    assert share[0].item() == pytest.approx(0.75)
    assert torch.isnan(share[1]) and torch.isnan(share[2])  # empty mask, all-zero map


def test_reports_for_starts_with_the_report_and_adds_distinct_paraphrases():
    reports = reports_for(TEXTS[1], 3, seed=5)
    assert reports[0] == TEXTS[1] and len(reports) == 4
    assert len(set(reports)) == 4
    assert reports == reports_for(TEXTS[1], 3, seed=5)


def test_measure_maps_table_and_summary(vlm):
    masks = torch.zeros(3, 1, 64, 64)
    masks[:2, :, 8:40, 8:40] = 1.0
    items = [{"image": img, "mask": m, "text": TEXTS[i % 2], "name": f"img{i}"}
             for i, (img, m) in enumerate(zip(_images(3, seed=3), masks))]
    table = measure_maps(vlm, items, n_paraphrases=2, methods=("gradcam", "eigencam"), batch_size=2, progress=False)
    assert list(table["method"]) == ["gradcam"] * 2 + ["eigencam"] * 2 + ["gradcam", "eigencam"]
    eig = table[table["method"] == "eigencam"]
    assert np.allclose(eig["corr"], 1.0) and np.allclose(eig["iou"], 1.0)  # text-free: stable by construction
    assert table.loc[table["name"] == "img2", "pointing"].isna().all()  # no lesion -> no pointing game
    scored = table.dropna(subset=["share"])
    assert ((scored["share"] >= 0) & (scored["share"] <= 1)).all() and len(scored) == 4
    assert table["gt_pixels"].tolist()[:2] == [32 * 32, 32 * 32]
    summary = summarize_measures({"A": table, "B": table})
    assert len(summary) == 4 and (summary["n_pointing"] == 2).all()
    same = paired_difference(table, table, "corr", "gradcam")
    assert same["mean_diff"] == 0 and same["n"] == 3 and math.isnan(same["p_wilcoxon"])


def test_paired_difference_matches_hand_mean():
    a = pd.DataFrame({"name": list("abcd"), "method": "gradcam", "corr": [0.9, 0.8, 0.7, np.nan]})
    b = pd.DataFrame({"name": list("dcba"), "method": "gradcam", "corr": [0.1, 0.5, 0.6, 0.4]})
    out = paired_difference(a, b, "corr", "gradcam", n_boot=500)
    assert out["n"] == 3
    assert out["mean_diff"] == pytest.approx(((0.9 - 0.4) + (0.8 - 0.6) + (0.7 - 0.5)) / 3)
    assert out["ci_low"] <= out["mean_diff"] <= out["ci_high"]


def test_select_by_quantiles_takes_one_image_per_quartile():
    scores = pd.Series(np.linspace(0.0, 1.0, 9), index=[f"n{i}" for i in range(9)])
    assert select_by_quantiles(scores) == ["n1", "n3", "n5", "n7"]
    # ties never pick the same image twice
    assert len(set(select_by_quantiles(pd.Series([0.5] * 4, index=list("abcd"))))) == 4
    with pytest.raises(ValueError, match="quantiles"):
        select_by_quantiles(pd.Series([0.1, np.nan], index=["a", "b"]))


def test_figures_have_one_panel_per_report_and_model():
    image, mask = torch.rand(3, 16, 16), torch.zeros(1, 16, 16)
    mask[:, 4:8, 4:8] = 1
    maps = {"DuSSS": torch.rand(3, 16, 16), "CLIP": torch.rand(3, 16, 16)}
    fig = plot_paraphrase_maps(image, mask, ["a", "b", "c"], maps)
    assert len(fig.axes) == 2 * (1 + 3)  # per model: the image, then one map per report
    preds = {"MT": torch.zeros(2, 1, 16, 16, dtype=torch.bool), "DuSSS": torch.ones(2, 1, 16, 16, dtype=torch.bool)}
    fig = plot_qualitative_grid(torch.rand(2, 3, 16, 16), mask.expand(2, -1, -1, -1), preds,
                                {"MT": [0.0, 0.0], "DuSSS": [0.4, 0.5]})
    assert len(fig.axes) == 2 * 4
    import matplotlib.pyplot as plt

    plt.close("all")
