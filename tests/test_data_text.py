"""Reports from masks: the QaTa grammar and its left/right convention, MoNuSeg/BM-Seg templates, flips, paraphrases."""
import numpy as np
import pytest

from dusss.data import (describe_bmseg, describe_monuseg, describe_qata, flip_report, paraphrase, parse_qata,
                        rotate_report)


def _box(m, r0, r1, c0, c1):
    m[r0:r1, c0:c1] = True
    return m


def test_radiological_convention_image_right_is_patient_left():
    m = _box(np.zeros((90, 90), bool), 20, 30, 60, 75)  # image right half, upper third of the band
    assert describe_qata(m) == "Unilateral pulmonary infection, one infected area, upper left lung."
    assert describe_qata(m[:, ::-1]) == "Unilateral pulmonary infection, one infected area, upper right lung."


def test_bilateral_count_thirds_and_left_first():
    m = np.zeros((100, 100), bool)
    _box(m, 40, 60, 10, 30)  # patient right lung, middle third (band rows 10..90 -> thirds 10/36.7/63.3/90)
    _box(m, 70, 85, 15, 30)  # patient right lung, lower
    _box(m, 15, 55, 60, 80)  # patient left lung, upper + middle
    assert describe_qata(m) == ("Bilateral pulmonary infection, three infected areas, "
                                "upper middle left lung and middle lower right lung.")


def test_one_lesion_spanning_the_lung_is_all_but_three_lesions_are_listed():
    tall = _box(np.zeros((100, 100), bool), 12, 88, 60, 70)
    assert describe_qata(tall).endswith("one infected area, all left lung.")
    three = np.zeros((100, 100), bool)
    for r in (15, 45, 75):
        _box(three, r, r + 8, 60, 70)
    assert describe_qata(three) == "Unilateral pulmonary infection, three infected areas, upper middle lower left lung."


def test_lung_mask_sets_the_thirds_and_empty_mask_has_a_report():
    lungs = np.zeros((100, 100), bool)
    lungs[40:100, :] = True  # lungs only in the bottom 60 rows: thirds 40/60/80/100
    m = _box(np.zeros((100, 100), bool), 45, 55, 10, 20)
    assert describe_qata(m, lungs).endswith("upper right lung.")
    assert describe_qata(m).endswith("middle right lung.")  # default band 10..90
    assert describe_qata(np.zeros((8, 8), bool)) == "No pulmonary infection."


def test_diagonal_pixels_are_one_lesion():
    m = np.eye(40, dtype=bool)[:, ::-1]
    m[:, :20] = False
    assert ", one infected area," in describe_qata(m)


def test_qata_reports_parse_and_flip_swaps_sides():
    m = np.zeros((100, 100), bool)
    _box(m, 15, 30, 10, 30)
    _box(m, 70, 85, 60, 80)
    text = describe_qata(m)
    assert parse_qata(text) == (2, {"left": "lower", "right": "upper"})
    assert flip_report(text, "qata") == describe_qata(m[:, ::-1])
    assert flip_report(flip_report(text, "qata"), "qata") == text
    with pytest.raises(ValueError, match="grammar"):
        flip_report(text, "none")


def test_monuseg_templates():
    rng = np.random.default_rng(0)
    even = rng.random((64, 64)) < 0.4
    assert describe_monuseg(even) == "The nuclei are evenly distributed."
    corner = np.zeros((64, 64), bool)
    corner[:32, 32:] = rng.random((32, 32)) < 0.6
    assert describe_monuseg(corner) == "The nuclei are irregularly distributed. The nuclei density in the upper right is high."
    assert describe_monuseg(corner[:, ::-1]).endswith("upper left is high.")
    assert flip_report(describe_monuseg(corner), "monuseg") == describe_monuseg(corner[:, ::-1])
    sparse = np.zeros((64, 64), bool)
    sparse[::16, ::16] = True
    assert describe_monuseg(sparse).startswith("The nuclei are sparsely distributed.")
    ring = np.ones((60, 60), bool)
    ring[10:50, 10:50] = rng.random((40, 40)) < 0.1
    assert describe_monuseg(ring).endswith("The nuclei density is higher around.")


def test_quarter_turn_rewrites_monuseg_and_bmseg_but_refuses_qata():
    rng = np.random.default_rng(1)
    for r0, c0 in ((0, 32), (32, 0), (32, 32), (0, 0)):
        m = np.zeros((64, 64), bool)
        m[r0:r0 + 32, c0:c0 + 32] = rng.random((32, 32)) < 0.6
        for k in range(4):
            assert rotate_report(describe_monuseg(m), k, "monuseg") == describe_monuseg(np.rot90(m, k))
    b = np.zeros((90, 90), bool)
    b[5:15, 40:50] = True  # upper middle
    b[70:80, 70:85] = True  # lower right
    for k in range(4):
        assert rotate_report(describe_bmseg(b), k, "bmseg") == describe_bmseg(np.rot90(b, k))
    with pytest.raises(ValueError, match="report-safe"):
        rotate_report("Unilateral pulmonary infection, one infected area, upper left lung.", 1, "qata")


def test_bmseg_grammar():
    assert describe_bmseg(np.zeros((10, 10), bool)) == "No bone metastasis."
    b = np.zeros((100, 100), bool)
    b[40:60, 40:60] = True  # 4 % of the image: large, centre
    b[5:8, 90:93] = True  # small, upper right
    assert describe_bmseg(b) == "Two bone metastases, large in the centre, small in the upper right."


def test_paraphrases_keep_the_meaning_and_differ():
    text = "Bilateral pulmonary infection, two infected areas, upper left lung and all right lung."
    out = paraphrase(text, 4, seed=3)
    assert len(out) == 4 and len(set(out)) == 4 and text not in out
    for p in out:
        low = p.lower()
        assert "two" in low and ("both lungs" in low or "bilateral" in low)
        assert "upper" in low and "left lung" in low and "right lung" in low
        assert "whole right lung" in low or "entire right lung" in low
    assert paraphrase(text, 4, seed=3) == out  # reproducible
    assert paraphrase(text, 4, seed=4) != out  # the seed chooses
    uni = paraphrase("Unilateral pulmonary infection, one infected area, lower right lung.", 2, seed=0)
    assert all("right lung" in p and "left" not in p and "one" in p.lower() for p in uni)
    other = paraphrase("The nuclei are evenly distributed.", 2, seed=0)
    assert len(other) == 2 and all(p != "The nuclei are evenly distributed." for p in other)
    with pytest.raises(ValueError):
        paraphrase(text, -1, seed=0)
