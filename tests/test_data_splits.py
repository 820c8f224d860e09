"""Labelled subsets: deterministic, nested across ratios, at least one image, saved and checked."""
import json

import pytest

from dusss.data import DataError, load_split, save_split, split_labelled, split_path

NAMES = [f"img_{i:03d}" for i in range(40)]


def test_same_inputs_same_split_and_order_of_listing_does_not_matter():
    a = split_labelled(NAMES, 0.25, 666)
    assert a == split_labelled(list(reversed(NAMES)), 0.25, 666)
    assert len(a[0]) == 10 and len(a[1]) == 30
    assert set(a[0]).isdisjoint(a[1]) and sorted(a[0] + a[1]) == NAMES
    assert split_labelled(NAMES, 0.25, 1)[0] != a[0]  # another seed, another subset


@pytest.mark.parametrize("seed", [0, 666, 2024])
def test_quarter_is_inside_half(seed):
    quarter, _ = split_labelled(NAMES, 0.25, seed)
    half, _ = split_labelled(NAMES, 0.5, seed)
    assert set(quarter) < set(half)
    assert split_labelled(NAMES, 1.0, seed) == (sorted(NAMES), [])


def test_at_least_one_labelled_and_bad_ratios_rejected():
    assert len(split_labelled(NAMES[:3], 0.01, 0)[0]) == 1
    for bad in (0, 0.0, -0.5, 1.5, "0.5", True, float("nan")):
        with pytest.raises(DataError, match="ratio"):
            split_labelled(NAMES, bad, 0)
    with pytest.raises(DataError, match="no image names"):
        split_labelled([], 0.5, 0)
    with pytest.raises(DataError, match="twice"):
        split_labelled(["a", "b", "a"], 0.5, 0)


def test_save_and_load_round_trip(tmp_path):
    path = save_split("toy", NAMES, 0.25, 7, directory=tmp_path)
    assert path == tmp_path / "toy_r0.25_s7.json" == split_path("toy", 0.25, 7, tmp_path)
    data = json.loads(path.read_text())
    assert data["ratio"] == 0.25 and data["n_train"] == 40
    assert load_split("toy", 0.25, 7, tmp_path, names=NAMES) == split_labelled(NAMES, 0.25, 7)
    with pytest.raises(DataError, match="differ"):
        load_split("toy", 0.25, 7, tmp_path, names=NAMES[:-1])
    # a file written before the keys took the project's spelling ("labeled") reads the same
    path.write_text(json.dumps({("labeled" if k == "labelled" else "unlabeled" if k == "unlabelled" else k): v
                                for k, v in data.items()}))
    assert load_split("toy", 0.25, 7, tmp_path, names=NAMES) == split_labelled(NAMES, 0.25, 7)
    with pytest.raises(DataError, match="save_split"):
        load_split("toy", 0.5, 7, tmp_path)


def test_split_for_uses_the_published_file_and_checks_it(tmp_path, monkeypatch):
    from dusss.config import make_config
    from dusss.data import split_for

    monkeypatch.setenv("DUSSS_SPLITS", str(tmp_path))
    cfg = make_config("smoke", ratio=0.5, seed=3)
    assert split_for(cfg, NAMES) == split_labelled(NAMES, 0.5, 3)  # no file: computed, nothing written
    assert not list(tmp_path.iterdir())
    save_split("qata-synth_smoke", NAMES[:-2] + ["x1", "x2"], 0.5, 3, directory=tmp_path)
    with pytest.raises(DataError, match="differ"):
        split_for(cfg, NAMES)  # a published split for other data is never silently replaced


def test_committed_demo_splits_are_nested_and_cover_the_demo_training_sets():
    from pathlib import Path

    from dusss.config import Config

    root = Path(__file__).resolve().parent.parent / "splits"
    expected = {"qata-synth": Config().synth_train, "nuclei-real": None}
    for dataset, n_train in expected.items():
        q = json.loads((root / f"{dataset}_r0.25_s666.json").read_text())
        h = json.loads((root / f"{dataset}_r0.5_s666.json").read_text())
        full = json.loads((root / f"{dataset}_r1_s666.json").read_text())
        assert set(q["labelled"]) < set(h["labelled"]) < set(full["labelled"])
        assert sorted(full["labelled"]) == sorted(q["labelled"] + q["unlabelled"])
        assert (q["labelled"], q["unlabelled"]) == split_labelled(full["labelled"], 0.25, 666)
        if n_train is not None:
            assert q["n_train"] == n_train
