"""Raw downloads -> LViT layout, the nuclei-real set, and `python -m dusss data` on good and bad folders."""
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dusss.cli import main as cli_main
from dusss.config import make_config
from dusss.data import DataError, LViTDataset, describe_bmseg, describe_monuseg, ensure_dataset, scan_split
from dusss.data.nuclei import rasterize_wkb_polygons
from dusss.data.prepare import MARKER, check_dataset, prepare_bmseg, prepare_qata

FIX = Path(__file__).parent / "fixtures"


def test_prepare_qata_keeps_lvit_text_and_lvit_val_images(tmp_path):
    counts = prepare_qata(FIX / "qata_raw", tmp_path / "q", FIX / "qata_raw" / "text")
    assert counts == {"train": 4, "val": 1, "test": 2}
    assert [s.name for s in scan_split(tmp_path / "q", "val")] == ["covid_tr4"]  # the rows of Val_text.xlsx
    lvit = pd.read_excel(FIX / "qata_raw" / "text" / "Test_text.xlsx").set_index("Image")["Description"]
    ds = LViTDataset(tmp_path / "q", "test", 16)
    assert [s.text for s in ds.samples] == [lvit[f"mask_{s.image.name}"] for s in ds.samples]
    assert check_dataset(tmp_path / "q")["train"]["images"] == 4


def test_prepare_qata_without_text_writes_reports_from_masks_and_a_seeded_val(tmp_path):
    a = prepare_qata(FIX / "qata_raw", tmp_path / "a", None, seed=1)
    prepare_qata(FIX / "qata_raw", tmp_path / "b", None, seed=1)
    assert a == {"train": 4, "val": 1, "test": 2}
    assert [s.name for s in scan_split(tmp_path / "a", "val")] == [s.name for s in scan_split(tmp_path / "b", "val")]
    assert all("pulmonary infection" in s.text for s in scan_split(tmp_path / "a", "train"))


def test_prepare_qata_errors_name_the_problem(tmp_path):
    raw = shutil.copytree(FIX / "qata_raw", tmp_path / "raw")
    (raw / "QaTa-COV19-v2" / "Test Set" / "Ground-truths" / "mask_covid_te1.png").unlink()
    with pytest.raises(DataError, match=r"covid_te1.png has no mask"):
        prepare_qata(raw, tmp_path / "o1", raw / "text")
    with pytest.raises(DataError, match=r"no 'Train Set' folder"):
        prepare_qata(tmp_path / "raw" / "text", tmp_path / "o2")
    with pytest.raises(DataError, match="Train_text.xlsx is missing"):
        prepare_qata(raw, tmp_path / "o3", tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        prepare_qata(FIX / "qata_raw", tmp_path / "full", FIX / "qata_raw" / "text")


def test_prepare_bmseg_splits_by_patient_with_reports_from_lesion_masks(tmp_path):
    counts = prepare_bmseg(FIX / "bmseg_raw", tmp_path / "b", seed=0)
    assert sum(counts.values()) == 8 and min(counts.values()) >= 1
    patients = {split: {s.name.split("_")[0] for s in scan_split(tmp_path / "b", split)} for split in counts}
    assert not (patients["train"] & patients["test"]) and not (patients["val"] & patients["test"])
    ds = LViTDataset(tmp_path / "b", "train", 32, text_mode="bmseg")
    for sample in ds.samples:
        lesion = np.asarray(Image.open(FIX / "bmseg_raw" / "lesion mask" / sample.image.name)) > 0
        assert sample.text == describe_bmseg(lesion)


def test_wkb_polygons_are_filled_in_pixel_xy():
    square = [(2.0, 1.0), (6.0, 1.0), (6.0, 3.0), (2.0, 3.0), (2.0, 1.0)]  # x from 2 to 6, y from 1 to 3
    wkb = struct.pack("<BII", 1, 3, 1) + struct.pack("<I", len(square)) + b"".join(struct.pack("<dd", *p) for p in square)
    mask = rasterize_wkb_polygons([wkb], (8, 8))
    rows, cols = np.nonzero(mask)
    assert rows.min() >= 1 and rows.max() <= 3 and cols.min() >= 2 and cols.max() <= 6 and cols.max() - cols.min() >= 3


def test_nuclei_real_is_split_by_region_with_monuseg_reports(tmp_path):
    cfg = make_config("smoke", dataset="nuclei-real", data_root=str(tmp_path / "n"), nuclei_patch=64)
    root = ensure_dataset(cfg)
    boxes = {}
    for split in ("train", "val", "test"):
        samples = scan_split(root, split)
        assert len(samples) >= 8
        boxes[split] = [tuple(int(v) if v.isdigit() else v for v in re.match(
            r"nuclei_(\w+?)_b(\d)(\d)_(\d+)_(\d+)$", s.name).groups()) for s in samples]
    # no test or val pixel is inside any training patch of the same tile
    for held_out in ("val", "test"):
        for tile, _, _, y, x in boxes[held_out]:
            for t2, _, _, y2, x2 in boxes["train"]:
                assert t2 != tile or abs(y - y2) >= 64 or abs(x - x2) >= 64
    sample = scan_split(root, "test")[0]
    mask = np.asarray(Image.open(sample.mask)) > 0
    assert mask.any() and sample.text == describe_monuseg(mask)
    image = np.asarray(Image.open(sample.image))
    assert image.shape == (64, 64, 3)
    assert cli_main(["data", "check", str(root)]) == 0  # `data check` passes on the generated set


def test_data_check_cli_passes_on_generated_sets_and_fails_clearly(tmp_path, capsys):
    out = tmp_path / "qs"
    assert cli_main(["data", "make-synth", str(out), "--profile", "smoke", "--set", "synth_train=4",
                     "--set", "synth_val=2", "--set", "synth_test=2", "--set", "synth_size=48"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"train\s+4\s", printed) and re.search(r"test\s+2\s", printed)
    assert cli_main(["data", "check", str(out)]) == 0
    assert cli_main(["data", "check", str(FIX / "monuseg_lvit")]) == 0
    bad = shutil.copytree(FIX / "qata_lvit", tmp_path / "bad")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(bad / "Test_Folder" / "labelcol" / "mask_covid_7.png")
    for argv, expected in ((["data", "check", str(bad)], r"error: image .*covid_7.png is 32x32 but its mask"),
                           (["data", "prepare-qata"], "needs the QaTa-COV19-v2 download folder"),
                           (["data", "check", str(FIX / "qata_raw")], r"raw QaTa-COV19-v2 download.*prepare-qata"),
                           (["data", "make-synth", str(bad)], "new or empty folder")):
        with pytest.raises(SystemExit) as exit_:
            cli_main(argv)
        assert exit_.value.code == 2, argv
        assert re.search(expected, capsys.readouterr().err), argv
    assert not (bad / MARKER).exists()  # make-synth left the user's folder alone


# ---------------------------------------------------------------- what a data_root holds decides how it is read
def test_a_folder_in_the_lvit_layout_is_own_data_whatever_embedded_set_is_named(tmp_path, caplog):
    from dusss.data.prepare import default_augment, open_split, resolve_dataset

    data = shutil.copytree(FIX / "monuseg_lvit", tmp_path / "mine")
    caplog.set_level("INFO", logger="dusss")
    for named in ("qata-synth", "nuclei-real"):
        cfg = make_config("smoke", dataset=named, data_root=str(data))
        resolved = resolve_dataset(cfg)
        assert (resolved.dataset, resolved.data_root) == ("lvit", str(data))
        assert ensure_dataset(cfg) == data and not (data / MARKER).exists()  # read, not regenerated
        assert open_split(cfg, "train").text_mode == "none" and default_augment(cfg).p_flip == 0.0
    assert [r.getMessage().count("reading it as dataset=lvit") for r in caplog.records] == [1]  # once per folder
    named = make_config("smoke", dataset="monuseg", data_root=str(data))
    assert resolve_dataset(named) is named  # a grammar chosen explicitly is kept
    for untouched in (tmp_path / "new", FIX / "qata_raw"):  # generated there / refused by ensure_dataset
        cfg = make_config("smoke", data_root=str(untouched))
        assert resolve_dataset(cfg) is cfg


def test_a_folder_generated_for_the_other_embedded_set_is_read_as_that_set(tmp_path):
    from dusss.data.prepare import resolve_dataset

    nuclei = make_config("smoke", dataset="nuclei-real", data_root=str(tmp_path / "n"), nuclei_patch=64)
    root = ensure_dataset(nuclei)
    stamp = (root / MARKER).stat().st_mtime_ns
    resolved = resolve_dataset(nuclei.replace(dataset="qata-synth"))
    assert resolved.dataset == "nuclei-real" and resolved.data_root == str(root)
    assert ensure_dataset(nuclei.replace(dataset="qata-synth")) == root
    assert (root / MARKER).stat().st_mtime_ns == stamp  # not regenerated as qata-synth


def test_raw_downloads_name_the_command_that_converts_them(tmp_path):
    for raw, dataset, command in ((FIX / "qata_raw", "qata-synth", "prepare-qata"),
                                  (FIX / "qata_raw", "qata", "prepare-qata"),
                                  (FIX / "bmseg_raw", "qata-synth", "prepare-bmseg"),
                                  (FIX / "bmseg_raw", "bmseg", "prepare-bmseg")):
        with pytest.raises(DataError, match=rf"{re.escape(str(raw))} is a raw .*python -m dusss data {command} "):
            ensure_dataset(make_config("smoke", dataset=dataset, data_root=str(raw)))
        with pytest.raises(DataError, match=command):
            check_dataset(raw, decode=False)
    monuseg = tmp_path / "MoNuSeg 2018 Training Data"
    for sub in ("Tissue Images", "Annotations"):
        (monuseg / sub).mkdir(parents=True)
    with pytest.raises(DataError, match="raw MoNuSeg challenge download.*LViT's MoNuSeg folder"):
        ensure_dataset(make_config("smoke", dataset="monuseg", data_root=str(monuseg)))
    with pytest.raises(DataError, match=r"nope has no Train_Folder.*does not exist"):
        ensure_dataset(make_config("smoke", dataset="lvit", data_root=str(tmp_path / "nope")))
    assert sorted(p.name for p in tmp_path.iterdir()) == [monuseg.name]  # nothing written beside them
