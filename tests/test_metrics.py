"""Dice and IoU per image against hand computations, including the stated empty-mask cases."""
import pytest
import torch

from dusss.metrics import binarize, dice_iou_per_image, dice_of_masks, summarize_scores


def _mask(rows):
    return torch.tensor(rows, dtype=torch.float32)[None, None]  # (1, 1, H, W)


def test_dice_and_iou_match_a_hand_computation():
    pred = _mask([[1, 1, 0], [0, 1, 0], [0, 0, 0]])
    gt = _mask([[1, 0, 0], [0, 1, 1], [0, 0, 1]])
    dice, iou = dice_of_masks(pred, gt)
    # |P|=3, |Y|=4, |P and Y|=2, |P or Y|=5
    assert dice.item() == pytest.approx(2 * 2 / 7)
    assert iou.item() == pytest.approx(2 / 5)


def test_empty_mask_cases_are_the_stated_choice():
    empty, full = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    assert dice_of_masks(empty, empty)[0].item() == 1.0 and dice_of_masks(empty, empty)[1].item() == 1.0
    assert dice_of_masks(full, empty)[0].item() == 0.0 and dice_of_masks(empty, full)[1].item() == 0.0


def test_threshold_is_applied_to_probabilities_not_logits():
    logits = torch.tensor([-2.0, -0.1, 0.1, 0.5, 2.0]).view(1, 1, 1, 5)
    assert binarize(logits, 0.5).flatten().tolist() == [False, False, True, True, True]
    # sigmoid(0.5) = 0.62 < 0.7 < sigmoid(2) = 0.88
    assert binarize(logits, 0.7).flatten().tolist() == [False, False, False, False, True]
    with pytest.raises(ValueError, match="threshold"):
        binarize(logits, 1.0)


def test_scores_are_per_image_then_averaged_not_pooled():
    gt = torch.zeros(2, 1, 4, 4)
    gt[0, 0, :2] = 1  # 8 pixels
    gt[1, 0, 0, 0] = 1  # 1 pixel
    logits = torch.where(gt > 0, 5.0, -5.0)
    logits[1, 0, 0, 0] = -5.0  # miss the small lesion entirely
    dice, iou = dice_iou_per_image(logits, gt)
    assert dice.tolist() == [1.0, 0.0]
    summary = summarize_scores(dice.tolist(), iou.tolist())
    assert summary["dice"] == pytest.approx(0.5)  # pooled Dice would be 16/17
    assert summary["n"] == 2 and summary["dice_std"] == pytest.approx(0.5)


def test_shape_mismatch_and_empty_split_raise():
    with pytest.raises(ValueError, match="shape"):
        dice_of_masks(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="no images"):
        summarize_scores([], [])
