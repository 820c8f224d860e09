"""The LViT-layout reader on a fixture of each real format, and a clear error for each bad input."""
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dusss.data import DataError, LViTDataset, read_text_table, scan_split

FIX = Path(__file__).parent / "fixtures"


def test_qata_fixture_reads_as_documented():
    ds = LViTDataset(FIX / "qata_lvit", "train", 16)
    assert len(ds) == 3 and ds.names == ["covid_1", "covid_2", "covid_3"]
    item = ds[1]
    assert set(item) >= {"image", "mask", "text", "name"}
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert torch.equal(item["image"][0], item["image"][2])  # gray replicated
    assert item["mask"].shape == (1, 16, 16) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert item["mask"].sum() > 0
    assert item["text"].endswith("lung.") and item["name"] == "covid_2"
    table = pd.read_excel(FIX / "qata_lvit" / "Train_Folder" / "Train_text.xlsx")
    assert item["text"] == table.set_index("Image").loc["mask_covid_2.png", "Description"]
    assert [len(LViTDataset(FIX / "qata_lvit", s, 16)) for s in ("val", "test")] == [2, 2]


def test_monuseg_fixture_with_tif_test_images_is_rgb():
    ds = LViTDataset(FIX / "monuseg_lvit", "test", 32, text_mode="monuseg")
    assert [s.image.suffix for s in ds.samples] == [".tif", ".tif"]
    item = ds[0]
    assert item["image"].shape == (3, 32, 32)
    assert not torch.equal(item["image"][0], item["image"][1])  # real colour
    assert item["text"].startswith("The nuclei")


def test_images_are_cached_after_the_first_read(tmp_path):
    root = shutil.copytree(FIX / "qata_lvit", tmp_path / "q")
    ds = LViTDataset(root, "train", 16)
    first = ds[0]["image"]
    (root / "Train_Folder" / "img" / "covid_1.png").unlink()  # the cache must not need the file again
    assert torch.equal(ds[0]["image"], first)


def test_subset_by_names_and_unknown_names():
    ds = LViTDataset(FIX / "qata_lvit", "train", 16)
    sub = ds.subset(["covid_3", "covid_1"])
    assert len(sub) == 2 and sub[0]["name"] == "covid_3"
    with pytest.raises(DataError, match="not in"):
        ds.subset(["covid_99"])


# ---------------------------------------------------------------- bad input: one test each
@pytest.fixture
def qata(tmp_path):
    return shutil.copytree(FIX / "qata_lvit", tmp_path / "qata")


def _train(root):
    return root / "Train_Folder"


def test_missing_split_folder(qata):
    shutil.rmtree(qata / "Val_Folder")
    with pytest.raises(DataError, match=r"Val_Folder is missing.*prepare"):
        LViTDataset(qata, "val", 16)


def test_image_without_mask(qata):
    (_train(qata) / "labelcol" / "mask_covid_2.png").unlink()
    with pytest.raises(DataError, match=r"covid_2.png has no mask.*mask_covid_2.png"):
        LViTDataset(qata, "train", 16)


def test_mask_without_image(qata):
    (_train(qata) / "img" / "covid_3.png").unlink()
    with pytest.raises(DataError, match=r"mask_covid_3.png has no image"):
        LViTDataset(qata, "train", 16)


def test_image_with_no_text_row(qata):
    xlsx = _train(qata) / "Train_text.xlsx"
    table = pd.read_excel(xlsx)
    table[table["Image"] != "mask_covid_1.png"].to_excel(xlsx, index=False)
    with pytest.raises(DataError, match=r"covid_1.png .*no row in .*Train_text.xlsx"):
        LViTDataset(qata, "train", 16)


def test_duplicate_text_rows(qata):
    xlsx = _train(qata) / "Train_text.xlsx"
    table = pd.read_excel(xlsx)
    pd.concat([table, table.iloc[[0]]]).to_excel(xlsx, index=False)
    with pytest.raises(DataError, match=r"lists mask_covid_1.png twice.*row 5"):
        read_text_table(xlsx)


def test_xlsx_without_the_expected_columns(qata):
    xlsx = _train(qata) / "Train_text.xlsx"
    pd.read_excel(xlsx).rename(columns={"Description": "Report"}).to_excel(xlsx, index=False)
    with pytest.raises(DataError, match=r"lacks column.*Description"):
        scan_split(qata, "train")


def test_unreadable_image(qata):
    (_train(qata) / "img" / "covid_1.png").write_bytes(b"not a png at all")
    ds = LViTDataset(qata, "train", 16)  # pairing is fine, pixels are read lazily
    with pytest.raises(DataError, match=r"cannot read image .*covid_1.png"):
        ds[0]
    with pytest.raises(DataError, match=r"covid_1.png"):
        LViTDataset(qata, "train", 16, preload=True)


def test_empty_image(qata):
    (_train(qata) / "img" / "covid_2.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"covid_2.png"):
        LViTDataset(qata, "train", 16)[1]


def test_mask_not_binary_after_thresholding(qata):
    grey = (np.arange(32 * 32).reshape(32, 32) % 256).astype(np.uint8)
    Image.fromarray(grey).save(_train(qata) / "labelcol" / "mask_covid_1.png")
    with pytest.raises(DataError, match=r"mask .*mask_covid_1.png is not binary"):
        LViTDataset(qata, "train", 16)[0]


def test_binary_masks_with_any_foreground_value_are_accepted(qata):
    m = np.zeros((32, 32), np.uint8)
    m[3:9, 3:9] = 1  # 0/1 masks as some exports write them
    Image.fromarray(m).save(_train(qata) / "labelcol" / "mask_covid_1.png")
    assert LViTDataset(qata, "train", 32)[0]["mask"].sum() == 36


def test_image_and_mask_of_different_sizes(qata):
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(_train(qata) / "labelcol" / "mask_covid_3.png")
    with pytest.raises(DataError, match=r"covid_3.png is 32x32 but its mask .* is 24x20"):
        LViTDataset(qata, "train", 16)[2]


def test_unknown_split_and_text_mode():
    with pytest.raises(DataError, match="unknown split"):
        LViTDataset(FIX / "qata_lvit", "training", 16)
    with pytest.raises(DataError, match="text_mode"):
        LViTDataset(FIX / "qata_lvit", "train", 16, text_mode="radiology")


def test_palette_images_give_colours_and_palette_masks_give_labels(qata):
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:, :16] = (200, 30, 30)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(_train(qata) / "img" / "covid_1.png")
    m = np.zeros((32, 32), np.uint8)
    m[2:10, 2:10] = 1
    pal = Image.fromarray(m, mode="L").convert("P")
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    pal.save(_train(qata) / "labelcol" / "mask_covid_1.png")
    item = LViTDataset(qata, "train", 32)[0]
    assert abs(item["image"][0, 0, 0].item() - 200 / 255) < 0.02 and item["image"][1, 0, 0] < 0.2
    assert item["mask"].sum() == 64
