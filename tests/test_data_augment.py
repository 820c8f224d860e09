"""Joint augmentation: image, mask, report and a cached map move together; policies keep reports true."""
import numpy as np
import pytest
import torch

from dusss.data import DataError, JointAugment, apply_params, describe_monuseg, describe_qata, transform_text


def _pair():
    image = torch.zeros(3, 32, 32)
    mask = torch.zeros(1, 32, 32)
    mask[0, 4:12, 20:28] = 1.0  # a lesion in the image's upper right
    image[:, 4:12, 20:28] = 0.8
    return image, mask


def test_same_params_move_image_mask_and_cached_map_together():
    image, mask = _pair()
    aug = JointAugment("lvit", p_flip=1.0, p_rot90=1.0, p_rotate=0.0, seed=0)
    out_img, out_mask, params = aug(image, mask)
    assert params["k"] in (1, 2, 3) and params["hflip"]
    cached = mask[0].clone()  # e.g. a text-guided probability map (H, W)
    assert torch.equal(apply_params(cached, params), out_mask[0])
    assert torch.equal(out_img[0] > 0.4, out_mask[0] > 0.5)
    expected = torch.flip(torch.rot90(mask, params["k"], dims=(-2, -1)), dims=(-1,))
    assert torch.equal(out_mask, expected)


def test_rotation_keeps_mask_binary_and_follows_the_image():
    image, mask = _pair()
    aug = JointAugment("report-safe", p_flip=0.0, p_rotate=1.0, max_angle=10.0, seed=1)
    out_img, out_mask, params = aug(image, mask)
    assert params["k"] == 0 and 0 < abs(params["angle"]) <= 10
    assert set(out_mask.unique().tolist()) <= {0.0, 1.0}
    assert 0.8 < out_mask.sum() / mask.sum() < 1.2
    inside = (out_img[0] > 0.4).float()
    assert (inside * out_mask[0]).sum() / out_mask.sum() > 0.85


def test_report_safe_never_turns_and_flips_rewrite_qata_reports():
    image, mask = _pair()
    aug = JointAugment("report-safe", seed=0)
    seen_flip = False
    for _ in range(40):
        params = aug.sample()
        assert params["k"] == 0 and abs(params["angle"]) <= aug.max_angle
        seen_flip |= params["hflip"]
        m = apply_params(mask[0], {**params, "angle": 0.0}).numpy() > 0.5
        text = describe_qata(mask[0].numpy() > 0.5)
        assert transform_text(text, params, "qata") == describe_qata(m)
    assert seen_flip


def test_lvit_policy_rewrites_monuseg_and_refuses_qata():
    rng = np.random.default_rng(0)
    m = np.zeros((32, 32), bool)
    m[:16, 16:] = rng.random((16, 16)) < 0.7
    mask = torch.from_numpy(m).float()[None]
    params = {"k": 1, "hflip": True, "angle": 0.0}
    moved = apply_params(mask, params)[0].numpy() > 0.5
    assert transform_text(describe_monuseg(m), params, "monuseg") == describe_monuseg(moved)
    with pytest.raises(ValueError, match="report-safe"):
        transform_text("Unilateral pulmonary infection, one infected area, upper left lung.", params, "qata")


def test_seeded_draws_repeat_and_bad_settings_are_rejected():
    a = [JointAugment("lvit", seed=5).sample() for _ in range(1)]
    b = [JointAugment("lvit", seed=5).sample() for _ in range(1)]
    assert a == b
    assert JointAugment("none").sample() == {"k": 0, "hflip": False, "angle": 0.0}
    with pytest.raises(DataError, match="policy"):
        JointAugment("random")
    with pytest.raises(DataError, match="p_flip"):
        JointAugment(p_flip=2.0)


def test_new_tensors_stay_on_the_input_dtype():
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    out = apply_params(x, {"k": 2, "hflip": True, "angle": 5.0})
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device


def test_dataset_refuses_an_augmentation_its_reports_cannot_follow():
    from pathlib import Path

    from dusss.data import LViTDataset

    root = Path(__file__).parent / "fixtures" / "qata_lvit"
    with pytest.raises(DataError, match="quarter turns"):
        LViTDataset(root, "train", 16, augment=JointAugment("lvit"), text_mode="qata")
    with pytest.raises(DataError, match="p_flip=0"):
        LViTDataset(root, "train", 16, augment=JointAugment("report-safe"), text_mode="none")
    ds = LViTDataset(root, "train", 16, augment=JointAugment("report-safe", p_flip=1.0, p_rotate=0.0, seed=0))
    plain = LViTDataset(root, "train", 16)
    item, ref = ds[0], plain[0]
    assert torch.equal(item["mask"], torch.flip(ref["mask"], dims=(-1,)))
    assert item["text"] == transform_text(ref["text"], {"hflip": True}, "qata")
    assert item["text"] == describe_qata(item["mask"][0].numpy() > 0.5)  # the report follows the flipped mask


def test_batched_augmentation_matches_the_per_image_one():
    from dusss.data.augment import apply_params_batch

    torch.manual_seed(0)
    x = torch.nn.functional.avg_pool2d(torch.rand(4, 2, 40, 40), 9, 1)  # smooth (4, 2, 32, 32)
    params = [{"k": 0, "hflip": False, "angle": 0.0}, {"k": 1, "hflip": True, "angle": 0.0},
              {"k": 0, "hflip": False, "angle": 8.0}, {"k": 2, "hflip": True, "angle": -6.0}]
    batch = apply_params_batch(x, params)
    for i, p in enumerate(params):
        one = apply_params(x[i], p)
        assert torch.allclose(batch[i, :, 4:-4, 4:-4], one[:, 4:-4, 4:-4], atol=1e-5), p
    masks = (x[:, :1] > x[:, :1].mean()).float()
    out = apply_params_batch(masks, params, nearest=True)
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="parameter dicts"):
        apply_params_batch(x, params[:2])
