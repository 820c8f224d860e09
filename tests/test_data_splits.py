"""Labelled subsets: deterministic, nested across ratios, at least one image, saved and checked."""
import json

import pytest

from dusss.data import DataError, load_split, save_split, split_labeled, split_path

NAMES = [f"img_{i:03d}" for i in range(40)]


def test_same_inputs_same_split_and_order_of_listing_does_not_matter():
    a = split_labeled(NAMES, 0.25, 666)
    assert a == split_labeled(list(reversed(NAMES)), 0.25, 666)
    assert len(a[0]) == 10 and len(a[1]) == 30
    assert set(a[0]).isdisjoint(a[1]) and sorted(a[0] + a[1]) == NAMES
    assert split_labeled(NAMES, 0.25, 1)[0] != a[0]  # another seed, another subset


@pytest.mark.parametrize("seed", [0, 666, 2024])
def test_quarter_is_inside_half(seed):
    quarter, _ = split_labeled(NAMES, 0.25, seed)
    half, _ = split_labeled(NAMES, 0.5, seed)
    assert set(quarter) < set(half)
    assert split_labeled(NAMES, 1.0, seed) == (sorted(NAMES), [])


def test_at_least_one_labelled_and_bad_ratios_rejected():
    assert len(split_labeled(NAMES[:3], 0.01, 0)[0]) == 1
    for bad in (0, 0.0, -0.5, 1.5, "0.5", True, float("nan")):
        with pytest.raises(DataError, match="ratio"):
            split_labeled(NAMES, bad, 0)
    with pytest.raises(DataError, match="no image names"):
        split_labeled([], 0.5, 0)
    with pytest.raises(DataError, match="twice"):
        split_labeled(["a", "b", "a"], 0.5, 0)


def test_save_and_load_round_trip(tmp_path):
    path = save_split("toy", NAMES, 0.25, 7, directory=tmp_path)
    assert path == tmp_path / "toy_r0.25_s7.json" == split_path("toy", 0.25, 7, tmp_path)
    data = json.loads(path.read_text())
    assert data["ratio"] == 0.25 and data["n_train"] == 40
    assert load_split("toy", 0.25, 7, tmp_path, names=NAMES) == split_labeled(NAMES, 0.25, 7)
    with pytest.raises(DataError, match="differ"):
        load_split("toy", 0.25, 7, tmp_path, names=NAMES[:-1])
    with pytest.raises(DataError, match="save_split"):
        load_split("toy", 0.5, 7, tmp_path)
