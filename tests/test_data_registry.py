"""The data-set registry: a set added from outside the package with one spec is checked, named, read and tabled.

A toy generated set (its own report grammar, standing in for the paper's
BM-Seg column) and a toy real set are registered the way a user's package
would; the config check, the folder name, the grammar and augmentation, the
generation by ``ensure_dataset`` and the paper columns of the tables must all
follow the registry without any other edit.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dusss.config import ConfigError, make_config
from dusss.data import open_split, text_mode_for
from dusss.data.augment import JointAugment
from dusss.data.layout import split_dir, text_file, write_text_table
from dusss.data.prepare import MARKER, default_augment, ensure_dataset
from dusss.data.registry import (DATASETS, GRAMMARS, PAPER_KEYS, PAPER_NAMES, PAPER_ONLY, DatasetSpec, Generator,
                                 GrammarSpec, RawDownload, dataset_for_action, get_dataset, register_dataset,
                                 register_grammar)
from dusss.data.text import flip_report
from dusss.errors import DusssError

CALLS: list[int] = []


def toy_generate(folder, n, seed):
    """A generator as a user would write one: ``n`` 32 px images per split, a square mask, a report naming its side."""
    CALLS.append(n)
    rng = np.random.default_rng(seed)
    for split in ("train", "val", "test"):
        rows = []
        for i in range(n):
            x = int(rng.integers(0, 16))
            mask = np.zeros((32, 32), np.uint8)
            mask[8:24, x:x + 16] = 255
            image = np.clip(rng.normal(60, 10, (32, 32)) + 0.6 * mask, 0, 255).astype(np.uint8)
            name = f"toy_{split}{i}.png"
            for sub, array in (("img", image), ("labelcol", mask)):
                (split_dir(folder, split) / sub).mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(split_dir(folder, split) / sub / name)
            rows.append((name, f"One square on the {'left' if x + 8 < 16 else 'right'}."))
        write_text_table(text_file(folder, split), rows)
    return {"images": 3 * n}


@pytest.fixture
def toy_sets():
    """Register a toy grammar, a generated and a real toy set; remove them again afterwards."""
    grammar = register_grammar(GrammarSpec("toy", "squares named by image side", flips=True))
    synth = register_dataset(DatasetSpec(
        "toy-synth", "generated squares", grammar="toy", paper="BM-Seg", action="make-toy",
        generator=Generator(toy_generate, 1, (("n", "synth_val"),), file_prefix="toy_")))
    real = register_dataset(DatasetSpec(
        "toy-real", "squares from a scanner", grammar="none", action="prepare-toy", action_args="{raw} --out {out}",
        raw=RawDownload("a raw toy download", ("scans",), "<toy folder>")))
    yield grammar, synth, real
    for name in (synth.name, real.name):
        DATASETS.pop(name)
    GRAMMARS.pop(grammar.name)


def test_builtin_registry_matches_the_tables_it_replaced():
    assert list(DATASETS) == ["qata-synth", "nuclei-real", "qata", "monuseg", "bmseg", "lvit"]
    assert [n for n, s in DATASETS.items() if s.generated] == ["qata-synth", "nuclei-real"]
    assert {n: s.grammar for n, s in DATASETS.items()} == {"qata-synth": "qata", "qata": "qata", "nuclei-real": "monuseg",
                                                          "monuseg": "monuseg", "bmseg": "bmseg", "lvit": "none"}
    assert dict(PAPER_NAMES) == {"qata-synth": "QaTa-COV19", "qata": "QaTa-COV19", "nuclei-real": "MoNuSeg",
                                 "monuseg": "MoNuSeg", "bmseg": "BM-Seg"}
    assert dict(PAPER_KEYS) == {"QaTa-COV19": "qata", "BM-Seg": "bmseg", "MoNuSeg": "monuseg"}
    assert PAPER_ONLY == ("BM-Seg",)
    assert [dataset_for_action(a).name for a in ("make-synth", "make-nuclei", "prepare-qata", "prepare-bmseg")] == [
        "qata-synth", "nuclei-real", "qata", "bmseg"]
    assert get_dataset("qata").prepare_command("R", "O") == (
        "python -m dusss data prepare-qata R --text-dir <LViT text folder> --data-root O")


def test_unknown_names_fail_with_the_valid_ones():
    with pytest.raises(ConfigError, match=r"'dataset' = 'qata2'.*qata-synth, nuclei-real, qata, monuseg, bmseg, lvit"):
        make_config("smoke", dataset="qata2")
    with pytest.raises(ConfigError, match="choose one of qata-synth, nuclei-real"):
        get_dataset("qata2")
    with pytest.raises(ValueError, match="grammar 'klingon'"):
        register_dataset(DatasetSpec("bad", "no grammar", grammar="klingon"))
    with pytest.raises(ValueError, match="already registered"):
        register_dataset(DatasetSpec("qata", "another qata", grammar="none"))
    assert "bad" not in DATASETS and get_dataset("qata").paper == "QaTa-COV19"


def test_a_registered_set_is_valid_named_and_read_by_its_grammar(toy_sets, tmp_path, monkeypatch):
    monkeypatch.setenv("DUSSS_DATA", str(tmp_path))
    with pytest.raises(ConfigError):
        make_config("smoke", dataset="toy-other")
    cfg = make_config("smoke", dataset="toy-synth", synth_val=3)  # accepted by the config check
    # folder naming: generated sets carry the profile and data seed, real ones do not
    assert cfg.resolved_data_root() == tmp_path / "toy-synth_smoke"
    assert cfg.replace(seed=7).resolved_data_root() == tmp_path / "toy-synth_smoke_s7"
    assert make_config("smoke", dataset="toy-real", seed=7).resolved_data_root() == tmp_path / "toy-real"
    # grammar and augmentation follow the grammar spec
    assert text_mode_for("toy-synth") == "toy" and text_mode_for("toy-real") == "none"
    assert flip_report("One square on the left.", "toy") == "One square on the right."
    assert default_augment(cfg).p_flip == 0.5 and default_augment(cfg.replace(dataset="toy-real")).p_flip == 0.0
    JointAugment("report-safe").check_grammar("toy")
    with pytest.raises(DusssError, match="quarter turns"):
        JointAugment("lvit").check_grammar("toy")
    # the generator runs once, with the config values its spec names, and its folder is then read as is
    ds = open_split(cfg, "train")
    assert CALLS == [3] and len(ds) == 3 and ds.text_mode == "toy"
    assert ds[0]["text"].startswith("One square on the") and ds[0]["mask"].shape[-1] == cfg.image_size
    assert ensure_dataset(cfg) == tmp_path / "toy-synth_smoke" and CALLS == [3]
    assert (tmp_path / "toy-synth_smoke" / MARKER).is_file()
    # a real set: missing folder and raw download both name its prepare action
    with pytest.raises(DusssError, match=r"toy-real has no Train_Folder.*python -m dusss data prepare-toy <toy folder>"):
        ensure_dataset(make_config("smoke", dataset="toy-real"))
    raw = tmp_path / "download"
    (raw / "scans").mkdir(parents=True)
    with pytest.raises(DusssError, match=r"is a raw toy download \(scans\).*prepare-toy .*download --out <new folder>"):
        ensure_dataset(make_config("smoke", dataset="toy-real", data_root=str(raw)))


def test_paper_columns_follow_the_registry(toy_sets):
    # the harness, imported here so that the data tests above do not depend on it
    from dusss.experiments import tables as T

    assert PAPER_NAMES["toy-synth"] == "BM-Seg" and "toy-real" not in PAPER_NAMES
    assert PAPER_KEYS["BM-Seg"] == "bmseg"  # the real BM-Seg keeps the column's numbers
    assert T.PAPER_ONLY == ()  # BM-Seg now has a generated stand-in: no paper-only column
    runs = T.load_runs("smoke", datasets=["toy-synth"])
    line = T.summarise(runs, ["mt"], [0.5], "table1", datasets=["toy-synth"]).iloc[0]
    assert line["paper_dataset"] == "BM-Seg" and line["paper_dice"] == pytest.approx(72.31)  # MT, 50 %, BM-Seg
    assert "paper_bmseg_dice" not in line.index
