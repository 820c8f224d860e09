"""Grid runner (real tiny smoke runs), table renderer (mean ± std), paired differences (95 % t-interval),
label-efficiency figure, complexity, cost and the generated tables page."""
import json

import numpy as np
import pandas as pd
import pytest

from dusss.experiments import tables as T
from dusss.paper_tables import paper_table1, paper_table2
from dusss.paths import runs_dir
from dusss.runs import ROWS, TABLE1_ROWS, run_config, run_file, run_name


@pytest.fixture
def tmp_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("DUSSS_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("DUSSS_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("DUSSS_FIGURES", str(tmp_path / "figures"))  # never overwrite the committed demo chart
    return tmp_path


def _fake_run(profile, dataset, row, ratio, seed, dice, miou):
    path = run_file(profile, dataset, row, ratio, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = ROWS[row]
    path.write_text(json.dumps({"dataset": dataset, "method": spec.method, "ratio": spec.ratio or ratio,
                                "seed": seed, "test_dice": dice, "test_miou": miou, "val_dice": dice,
                                "epochs_run": 1, "train_seconds": 1.0}))


def test_grid_runs_for_real_at_smoke_writes_one_file_per_run_and_reuses_them(tmp_outputs):
    kw = dict(table1_rows=["unet", "bcp", "ucmt"], table1_ratios=[0.25], table2_rows=["mt"],
              overrides={"epochs": 1, "num_threads": 1}, progress=False)
    runs = T.run_grid("smoke", ["qata-synth"], [7], **kw)
    assert sorted(runs["run"]) == ["bcp-r0.25-s7", "mt-r0.5-s7", "supervised-r0.25-s7", "ucmt-r0.25-s7"]
    assert runs["test_dice"].between(0, 1).all() and runs["test_miou"].between(0, 1).all()
    files = sorted((tmp_outputs / "results" / "runs" / "qata-synth-smoke").glob("*.json"))
    assert len(files) == 4
    saved = json.loads(files[0].read_text())
    assert saved["epochs_run"] == 1 and saved["profile"] == "smoke" and "ssmis_seconds" in saved
    stamps = [f.stat().st_mtime_ns for f in files]
    again = T.run_grid("smoke", ["qata-synth"], [7], **kw)  # reuse: nothing retrained, same numbers
    assert [f.stat().st_mtime_ns for f in files] == stamps
    pd.testing.assert_frame_equal(runs, again)
    with pytest.raises(ValueError, match="unknown table row"):
        T.run_one("smoke", "qata-synth", "ucmt2", 0.25, 7)


def test_renderer_mean_and_std_over_seeds_and_paper_numbers(tmp_outputs):
    dices = {1: 0.70, 2: 0.74, 3: 0.75}
    for seed, d in dices.items():
        _fake_run("demo", "qata-synth", "mt", 0.5, seed, d, d - 0.1)
        _fake_run("demo", "nuclei-real", "mt", 0.5, seed, d / 2, d / 3)
    _fake_run("demo", "qata-synth", "dusss", 0.5, 1, 0.8, 0.7)
    _fake_run("demo", "qata-synth", "unet100", 0.25, 1, 0.9, 0.8)  # fixed ratio 1.0 whatever is asked
    runs = T.load_runs("demo")
    t = T.render_tables(runs, table1_rows=["unet100", "mt"], table1_ratios=[0.5],
                        table2_rows=["mt", "sss", "dusss"])
    t2 = t["table2"].set_index(["row", "dataset"])
    vals = np.array(list(dices.values()))
    r = t2.loc[("mt", "qata-synth")]
    assert r["n_seeds"] == 3
    assert r["dice_mean"] == pytest.approx(100 * vals.mean())
    assert r["dice_std"] == pytest.approx(100 * vals.std(ddof=1))
    assert r["miou_mean"] == pytest.approx(100 * (vals - 0.1).mean())
    assert t2.loc[("mt", "nuclei-real")]["dice_mean"] == pytest.approx(50 * vals.mean())
    assert r["paper_dice"] == 79.64 and t2.loc[("mt", "nuclei-real")]["paper_dice"] == 75.15  # MoNuSeg column
    d = t2.loc[("dusss", "qata-synth")]
    assert d["n_seeds"] == 1 and d["dice_std"] == 0.0 and d["paper_dice"] == 82.52
    assert t2.loc[("sss", "qata-synth")]["n_seeds"] == 0 and np.isnan(t2.loc[("sss", "qata-synth")]["dice_mean"])
    t1 = t["table1"].set_index(["row", "dataset"])
    assert t1.loc[("unet100", "qata-synth")]["ratio"] == 1.0 and t1.loc[("unet100", "qata-synth")]["paper_dice"] == 79.02
    md = t["table2_md"]
    assert f"{100 * vals.mean():.2f} ± {100 * vals.std(ddof=1):.2f}" in md
    assert "80.00 (1 seed)" in md and "| 82.52 | 70.00 (1 seed) | 75.87 | 1 | 1 / 1 |" in md  # DuSSS first in both
    paths = T.write_outputs(t, "smoke", T.complexity())
    assert pd.read_csv(paths["table2_csv"])["n_seeds"].sum() == 3 + 3 + 1


def test_table2_rank_column_orders_rows_by_dice(tmp_outputs):
    _fake_run("demo", "qata-synth", "mt", 0.5, 1, 0.6, 0.5)
    _fake_run("demo", "qata-synth", "dusss", 0.5, 1, 0.8, 0.7)
    md = T.render_tables(T.load_runs("demo"), table1_rows=[], table2_rows=["mt", "dusss"])["table2_md"]
    head = [c.strip() for c in md.splitlines()[0].split("|")]
    rank = head.index("qata-synth rank ours / paper")
    lines = {ln.split("|")[2].strip(): [c.strip() for c in ln.split("|")] for ln in md.splitlines()[2:]}
    assert lines["Mean Teacher"][rank] == "2 / 2" and lines["DuSSS (SSS + DCL + L_tg)"][rank] == "1 / 1"
    # the paper's BM-Seg numbers (no stand-in here) close every line; Table 2's DuSSS row as printed there
    assert head[-3:-1] == ["BM-Seg (paper only) Dice", "BM-Seg mIoU"]
    assert lines["DuSSS (SSS + DCL + L_tg)"][-3:-1] == ["76.41", "61.08"]


T975 = {1: 12.706204736174707, 2: 4.302652729749464}  # Student t quantile 0.975 at 1 and 2 d.f., from printed tables


def test_paired_difference_is_the_t_interval_of_the_per_seed_differences_computed_by_hand():
    from dusss.stats import paired_difference

    a = pd.Series({1: 11.0, 2: 12.0, 3: 14.0, 4: 50.0})  # seed 4 only here, seed 5 only in b: both dropped
    b = pd.Series({1: 10.0, 2: 10.0, 3: 10.0, 5: 7.0})
    d = paired_difference(a, b)
    # differences 1, 2, 4: mean 7/3, sd sqrt(((1 - 7/3)^2 + (2 - 7/3)^2 + (4 - 7/3)^2) / 2) = sqrt(7/3) = 1.5275
    half = T975[2] * (7 / 3) ** 0.5 / 3 ** 0.5
    assert half == pytest.approx(3.795, abs=1e-3)
    assert d["mean"] == pytest.approx(7 / 3) and d["half_width"] == pytest.approx(half)
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((7 / 3 - half, 7 / 3 + half))
    assert d["n_pairs"] == 3 and d["seeds"] == [1, 2, 3]
    # rows of load_runs (test_dice in [0, 1]) are taken in points; identical rows: zero difference, zero width
    runs = pd.DataFrame({"seed": [3, 1, 2], "test_dice": [0.14, 0.11, 0.12]})
    assert paired_difference(runs, b)["mean"] == pytest.approx(7 / 3)
    same = paired_difference(runs, runs)
    assert same["mean"] == 0 and same["half_width"] == 0 and same["n_pairs"] == 3


def test_paired_difference_below_two_pairs_has_no_interval_and_a_seed_twice_is_refused():
    from dusss.stats import paired_difference

    one = paired_difference(pd.Series({1: 5.0, 2: 9.0}), pd.Series({2: 4.0, 3: 1.0}))
    assert one["mean"] == pytest.approx(5.0) and one["n_pairs"] == 1 and one["seeds"] == [2]
    assert np.isnan(one["half_width"]) and np.isnan(one["ci_low"]) and np.isnan(one["ci_high"])
    none = paired_difference(pd.Series({1: 5.0}), pd.Series({2: 4.0}))
    assert none["n_pairs"] == 0 and np.isnan(none["mean"]) and none["seeds"] == []
    with pytest.raises(ValueError, match=r"seeds \[1\] appear more than once"):
        paired_difference(pd.Series([5.0, 6.0], index=[1, 1]), pd.Series({1: 4.0}))


def test_differences_are_paired_by_seed_so_a_shared_seed_effect_cancels(tmp_outputs):
    # the seeds move both rows together by 10 points; DuSSS is 1 point above Mean Teacher at every seed
    for seed, base in {1: 0.60, 2: 0.70, 3: 0.80}.items():
        _fake_run("demo", "qata-synth", "mt", 0.5, seed, base, base - 0.1)
        _fake_run("demo", "qata-synth", "dusss", 0.5, seed, base + 0.01, base - 0.1)
    c = T.row_contrasts(T.load_runs("demo"), [("dusss", "mt")]).iloc[0]
    assert c["ours"] == pytest.approx(1.0) and c["half_width"] == pytest.approx(0.0, abs=1e-9)
    assert c["verdict"] == "a > b" and c["n_pairs"] == 3 and c["seeds"] == "1 2 3"
    # an unpaired interval (std 10 in each row) would cover 0 by far; the paired one does not


def test_component_effects_pair_rows_that_differ_in_one_switch_and_compare_signs_with_the_paper(tmp_outputs):
    for row, dice in {"mt": 0.60, "sss": 0.65, "dcl": 0.58, "dusss": 0.70}.items():
        _fake_run("demo", "qata-synth", row, 0.5, 1, dice, dice - 0.1)
    t = T.render_tables(T.load_runs("demo"), table1_rows=[])
    e = t["effects"]
    assert len(e) == 9 and (e.groupby("component").size() == 3).all()  # 7 rows of 8 combinations: 3 pairs each
    pair = e.set_index(["component", "row_off", "row_on"])
    up = pair.loc[("SSS", "Mean Teacher", "SSS")]
    assert up["ours"] == pytest.approx(5.0) and up["paper"] == pytest.approx(80.86 - 79.64) and up["same_sign"]
    down = pair.loc[("DCL", "Mean Teacher", "DCL")]
    assert down["ours"] == pytest.approx(-2.0) and down["paper"] == pytest.approx(80.13 - 79.64)
    assert down["same_sign"] is not None and not down["same_sign"]
    missing = pair.loc[("L_tg", "SSS + DCL", "DuSSS (SSS + DCL + L_tg)")]  # SSS + DCL was not run
    assert np.isnan(missing["ours"]) and missing["same_sign"] is None and missing["n_pairs"] == 0
    assert missing["paper"] == pytest.approx(82.52 - 81.10) and missing["verdict"] == "–"
    assert np.isnan(up["half_width"]) and up["n_pairs"] == 1 and up["verdict"] == "no interval (1 seed)"
    _fake_run("demo", "qata-synth", "mt", 0.5, 2, 0.64, 0.54)
    _fake_run("demo", "qata-synth", "sss", 0.5, 2, 0.65, 0.55)
    two = T.render_tables(T.load_runs("demo"), table1_rows=[])
    eff = two["effects"].set_index(["component", "row_off", "row_on"])
    ci = eff.loc[("SSS", "Mean Teacher", "SSS")]
    # per-seed differences 65 - 60 = 5 and 65 - 64 = 1: mean 3, sd 2 sqrt(2), half-width t(0.975, 1) * 2
    assert ci["ours"] == pytest.approx(3.0) and ci["half_width"] == pytest.approx(2 * T975[1])
    assert ci["ci_low"] < 0 < ci["ci_high"] and ci["verdict"] == "no difference shown" and ci["seeds"] == "1 2"
    assert (f"| qata-synth | SSS | Mean Teacher → SSS | +3.00 [{3 - 2 * T975[1]:+.2f}, {3 + 2 * T975[1]:+.2f}] (2) "
            f"| +1.22 | yes | no difference shown |") in two["effects_md"]
    md = t["effects_md"]
    assert "| qata-synth | SSS | Mean Teacher → SSS | +5.00 (1) | +1.22 | yes | no interval (1 seed) |" in md
    assert "| qata-synth | DCL | Mean Teacher → DCL | -2.00 (1) | +0.49 | **no** | no interval (1 seed) |" in md
    assert "SE" not in md.split("\n")[0]
    T.write_outputs(t, "demo")
    page = tmp_outputs / "docs" / "tables_generated.md"
    text = T.write_results_page("demo", page)
    assert page.read_text() == text
    assert "Does each component help?" in text and "95 % t-interval" in text
    assert "standard error" not in text and "SE)" not in text


def test_component_effects_say_helps_or_hurts_only_when_the_interval_excludes_zero(tmp_outputs):
    for seed, (mt, sss, dcl) in {1: (0.60, 0.63, 0.55), 2: (0.64, 0.66, 0.60), 3: (0.62, 0.66, 0.56)}.items():
        for row, dice in (("mt", mt), ("sss", sss), ("dcl", dcl)):
            _fake_run("demo", "qata-synth", row, 0.5, seed, dice, dice - 0.1)
    e = T.component_effects(T.load_runs("demo"), rows=["mt", "sss", "dcl"]).set_index("row_on")
    assert list(e["row_off"]) == ["Mean Teacher", "Mean Teacher"]  # only the two one-switch pairs among these rows
    assert e.loc["SSS", "verdict"] == "helps" and e.loc["SSS", "ci_low"] > 0  # +3, +2, +4
    assert e.loc["DCL", "verdict"] == "hurts" and e.loc["DCL", "ci_high"] < 0  # -5, -4, -6


def test_row_contrasts_pair_seeds_at_the_same_label_share_and_match_the_full_label_unet_to_every_share(tmp_outputs):
    for seed, (mt, du) in {1: (0.70, 0.66), 2: (0.74, 0.71)}.items():
        _fake_run("demo", "qata-synth", "mt", 0.5, seed, mt, mt - 0.1)
        _fake_run("demo", "qata-synth", "dusss", 0.5, seed, du, du - 0.1)
    _fake_run("demo", "qata-synth", "mt", 0.25, 1, 0.65, 0.55)
    _fake_run("demo", "qata-synth", "unet100", 1.0, 1, 0.80, 0.70)
    t = T.render_tables(T.load_runs("demo"), table2_rows=[])
    c = t["contrasts"].set_index(["row_a", "row_b", "ratio"])
    # the shares the runs have; 1.0 only for the pairs of two 100 % rows (CLIP / ViLT - U-Net 100 %)
    assert set(c.index.get_level_values("ratio")) == {0.25, 0.5, 1.0}
    assert {(a, b) for a, b, q in c.index if q == 1.0} == {("clipseg", "unet100"), ("vilt", "unet100")}
    half = c.loc[("dusss", "mt", 0.5)]
    # per-seed differences -4 and -3: mean -3.5, sd 1 / sqrt(2), half-width t(0.975, 1) * 0.5
    assert half["ours"] == pytest.approx(-3.5) and half["paper"] == pytest.approx(82.52 - 79.64)
    assert half["half_width"] == pytest.approx(0.5 * T975[1]) and half["n_pairs"] == 2
    assert half["same_sign"] is False and half["verdict"] == "no difference shown"
    quarter = c.loc[("dusss", "mt", 0.25)]  # DuSSS at 25 % was not run
    assert np.isnan(quarter["ours"]) and quarter["n_pairs"] == 0 and quarter["paper"] == pytest.approx(79.00 - 77.88)
    assert ("mt", "unet100") not in c.droplevel("ratio").index  # not one of the default pairs
    both = T.row_contrasts(T.load_runs("demo"), [("mt", "unet100")]).set_index("ratio")
    assert both.loc[0.25, "ours"] == pytest.approx(-15.0)
    assert both.loc[0.5, "ours"] == pytest.approx(-10.0) and both.loc[0.5, "seeds"] == "1"  # seed 2: no U-Net 100 %
    assert both.loc[0.5, "paper"] == pytest.approx(79.64 - 79.02)
    assert np.isnan(c.loc[("dusss", "clip", 0.5)]["paper"])  # the paper has no CLIP-guided SSMIS row
    md = t["contrasts_md"]
    assert "| qata-synth | DuSSS (SSS + DCL + L_tg) − Mean Teacher | – | +1.12 | – |" in md
    low, high = -3.5 - 0.5 * T975[1], -3.5 + 0.5 * T975[1]
    assert f"| -3.50 [{low:+.2f}, {high:+.2f}] (2) | +2.88 | no difference shown |" in md
    assert "SE" not in md
    with pytest.raises(ValueError, match="unknown table row 'nope'"):
        T.row_contrasts(T.load_runs("demo"), [("dusss", "nope")])
    paths = T.write_outputs(t, "demo")
    assert paths["contrasts_md"].read_text() == md
    assert paths["differences_figure"].is_file()  # the forest plot; Table 2 is empty here: one panel
    fig = T.plot_differences(t)
    (ax,) = fig.axes
    assert len(ax.get_yticklabels()) == int(t["contrasts"]["ours"].notna().sum())  # lines without ours left out
    bars = ax.containers[0].lines[2][0].get_segments()  # the whiskers, top line first: DuSSS − MT at 50 %
    assert any(seg[:, 0] == pytest.approx([half["ci_low"], half["ci_high"]]) for seg in bars)
    assert any("95 % t-interval" in text.get_text() for text in ax.get_legend().get_texts())
    text = T.write_results_page("demo", tmp_outputs / "docs" / "tables_generated.md")
    assert text.index("Table 1 (comparison)") < text.index("Table 1 as differences") < text.index("Table 2 (")
    assert "![paired differences" in text  # the forest plot, linked relative to the page


def test_headline_contrasts_cover_every_label_share_of_the_runs():
    assert {("dusss", "mt"), ("mt", "unet"), ("dusss", "clip")} <= set(T.CONTRASTS)
    assert set(TABLE1_ROWS) <= {r for pair in T.CONTRASTS for r in pair}  # every row of Table 1 is compared
    rows = []
    for ratio in (0.05, 0.1, 0.25, 0.5):
        for row in ("unet", "mt", "dusss", "clip"):
            rows.append({"dataset": "qata-synth", "run": run_name(row, ratio, 1), "ratio": ratio, "seed": 1,
                         "test_dice": 0.5})
    rows.append({"dataset": "qata-synth", "run": run_name("unet100", 1.0, 1), "ratio": 1.0, "seed": 1,
                 "test_dice": 0.9})
    c = T.row_contrasts(pd.DataFrame(rows), T.HEADLINE_CONTRASTS + (("dusss", "unet100"),))
    assert sorted(set(c["ratio"])) == [0.05, 0.1, 0.25, 0.5]  # 100 % is the U-Net's own share, not a share here
    assert len(c) == 4 * 4 and (c["n_pairs"] == 1).all()
    assert c[c["row_b"] == "unet100"]["ours"].tolist() == pytest.approx([-40.0] * 4)  # one U-Net 100 % run


def test_label_efficiency_figure_has_a_line_and_band_per_row_and_the_full_label_unet_as_reference(tmp_outputs):
    shares = (0.05, 0.1, 0.25, 0.5)
    for seed in (1, 2):
        for k, q in enumerate(shares):
            for row, base in (("unet", 0.50), ("mt", 0.55), ("dusss", 0.52)):  # no CLIP-style run: no line
                _fake_run("demo", "qata-synth", row, q, seed, base + 0.05 * k + 0.01 * seed, 0.4)
        _fake_run("demo", "qata-synth", "unet100", 1.0, seed, 0.80 + 0.02 * seed, 0.7)
    runs = T.load_runs("demo")
    eff = T.label_efficiency(runs).set_index(["row", "ratio"])
    cell = eff.loc[("mt", 0.1)]  # 61 and 62 points: mean 61.5, sd 1 / sqrt(2), half-width t(0.975, 1) * 0.5
    assert cell["mean"] == pytest.approx(61.5) and cell["half_width"] == pytest.approx(0.5 * T975[1])
    assert eff.loc[("unet100", 1.0), "mean"] == pytest.approx(83.0) and eff.loc[("unet100", 1.0), "n_seeds"] == 2
    fig = T.plot_label_efficiency(runs, "qata-synth")
    (ax,) = fig.axes
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["U-Net, labelled part only", "Mean Teacher", "DuSSS (SSS + DCL + L_tg)", "U-Net, 100 % labels"]
    from matplotlib.collections import PolyCollection

    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 3  # a 95 % band per row; the reference's interval is an error bar
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == ["5 %", "10 %", "25 %",
                                                                                       "50 %", "100 %"]
    line = ax.get_lines()[1]  # Mean Teacher: its mean at every share
    assert list(line.get_xdata()) == list(shares) and line.get_ydata()[1] == pytest.approx(61.5)
    two = T.plot_label_efficiency(runs.assign(dataset="nuclei-real").pipe(lambda r: pd.concat([runs, r])))
    assert len(two.axes) == 2  # one panel per data set
    t = T.render_tables(runs, table2_rows=[])
    paths = T.write_outputs(t, "demo")
    assert paths["efficiency_figure"] == tmp_outputs / "figures" / "04_label_efficiency.png"
    assert paths["efficiency_figure"].is_file()
    assert pd.read_csv(paths["efficiency_csv"])["n_seeds"].sum() == 2 * (3 * 4 + 1)


def test_coverage_names_every_cell_that_lacks_a_seed_and_opens_the_results_page(tmp_outputs):
    for seed in (1, 2):
        _fake_run("demo", "qata-synth", "mt", 0.5, seed, 0.7, 0.6)
        _fake_run("demo", "qata-synth", "dusss", 0.5, seed, 0.7, 0.6)
    _fake_run("demo", "qata-synth", "unet100", 1.0, 2, 0.8, 0.7)
    kw = dict(table1_rows=["unet100", "mt", "dusss"], table1_ratios=[0.5], table2_rows=["mt", "dusss"])
    t = T.render_tables(T.load_runs("demo"), seeds=[1, 2], **kw)
    assert t["table1"].set_index("row").loc["mt", "seeds"] == "1 2"
    text = t["coverage_md"]
    # MT and DuSSS at 50 % are one cell each although both tables show them: 3 cells, 5 runs
    assert text.startswith("**Coverage**: 5 runs fill 3 cells") and "1 cells lack a seed" in text
    assert "`qata-synth`: U-Net, 100 % labels (2)." in text and "Mean Teacher" not in text
    _fake_run("demo", "qata-synth", "unet100", 1.0, 1, 0.8, 0.7)
    full = T.render_tables(T.load_runs("demo"), seeds=[1, 2], **kw)
    assert full["coverage_md"].endswith("Every cell has a run at every one of these seeds.\n")
    three = T.coverage(full, [1, 2, 3])
    assert "3 cells lack a seed" in three and "Mean Teacher 50 % (1 2)" in three
    without = T.render_tables(T.load_runs("demo"), **kw)
    assert "coverage_md" not in without
    T.write_outputs(t, "demo")
    T.write_outputs(without, "demo")  # no coverage asked for: the older paragraph is removed, not left stale
    assert not (tmp_outputs / "results" / "04_coverage.md").exists()
    T.write_outputs(full, "demo")
    text = T.write_results_page("demo", tmp_outputs / "docs" / "tables_generated.md")
    coverage_line = next(line for line in text.splitlines() if line.startswith("**Coverage**"))
    assert coverage_line.startswith("**Coverage**: 6 runs") and text.index(coverage_line) < text.index("## Table 1")


def test_paper_tables_typed_as_printed():
    p1, p2 = paper_table1(), paper_table2()
    assert len(p1) == 25 and len(p2) == 7
    ours = p1[(p1["method"] == "DuSSS") & (p1["labels"] == 50)].iloc[0]
    assert (ours["qata_dice"], ours["bmseg_dice"], ours["monuseg_miou"]) == (82.52, 74.61, 66.93)
    assert p2.iloc[-1]["bmseg_dice"] == 76.41  # the paper's own inconsistency, kept
    base = p2[(p2[["sss", "dcl", "tg"]] == 0).all(axis=1)].iloc[0]
    mt50 = p1[(p1["method"] == "MT") & (p1["labels"] == 50)].iloc[0]
    assert base["qata_dice"] == mt50["qata_dice"]  # Table 2's baseline is MT at 50 %


def test_complexity_counts_the_paper_unet():
    cx = T.complexity()
    assert cx["params_m"] == pytest.approx(14.751873, abs=1e-6)
    assert cx["gflops"] == pytest.approx(2 * cx["gmacs"])
    assert 20 < cx["gmacs"] < 30 and cx["gflops"] > 40  # the paper's 25.19 G is of the MAC scale


def test_grid_cost_counts_distinct_runs():
    cost = T.grid_cost({"supervised": 10, "mt": 20, "bcp": 30, "dusss": 40, "pretrain": 50}, datasets=2, seeds=3)
    c = cost.set_index("kind")
    # per data set and seed: supervised at 25 %, 50 %, 100 %; clipseg, vilt at 100 %; mt, bcp, ucmt, cct, mcnet,
    # ssnet, lvit at 2 ratios; dusss 2 (clip) + 2 (cmitm) + 2 (asg) + 2 (mgca) + 2 + 5; 10 VLMs
    assert c.loc["supervised", "runs"] == 18 and c.loc["mt", "runs"] == 12 and c.loc["bcp", "runs"] == 12
    assert c.loc["ucmt", "runs"] == 12 and np.isnan(c.loc["ucmt", "seconds_each"])
    assert c.loc["clipseg", "runs"] == 6 and c.loc["vilt", "runs"] == 6 and c.loc["lvit", "runs"] == 12
    assert c.loc["dusss", "runs"] == 90 and c.loc["pretrain", "runs"] == 60
    assert np.isnan(c.loc["total", "hours"])  # a kind without a measurement makes the total unknown ...
    unpriced = ["ucmt", "cct", "mcnet", "ssnet", "lvit", "clipseg", "vilt"]
    assert c.loc["total", "unpriced_runs"] == c.loc[unpriced, "runs"].sum() == 5 * 12 + 2 * 6
    # ... and the priced kinds give its lower bound
    assert c.loc["total", "priced_hours"] == pytest.approx((18 * 10 + 12 * 20 + 12 * 30 + 90 * 40 + 60 * 50) / 3600)
    seconds = {"supervised": 10, "mt": 20, "bcp": 30, "ucmt": 35, "cct": 25, "mcnet": 26, "ssnet": 27, "dusss": 40,
               "pretrain": 50, "clipseg": 12, "vilt": 13, "lvit": 28}
    cost = T.grid_cost(seconds, datasets=2, seeds=3, parallel=2)
    total = cost.set_index("kind").loc["total"]
    assert total["hours"] == pytest.approx((18 * 10 + 12 * 20 + 12 * 30 + 12 * 35 + 12 * (25 + 26 + 27 + 28) + 90 * 40
                                            + 60 * 50 + 6 * (12 + 13)) / 3600)
    assert total["wall_hours"] == pytest.approx(total["hours"] / 2)  # two runs at a time
    assert total["priced_hours"] == pytest.approx(total["hours"]) and total["unpriced_runs"] == 0


def test_results_page_is_rebuilt_whole_in_docs_and_the_readme_is_never_touched(tmp_outputs, monkeypatch):
    monkeypatch.setattr(T, "repo_root", lambda: tmp_outputs)  # the default page: <checkout>/docs/tables_generated.md
    readme = tmp_outputs / "README.md"
    readme.write_text("# x\n## Tables 1 and 2\n<!-- section:tables -->\nhand text\n")
    with pytest.raises(FileNotFoundError, match="04_ablation"):  # no tables rendered yet
        T.write_results_page("demo")
    _fake_run("demo", "qata-synth", "mt", 0.5, 1, 0.6, 0.5)
    t = T.render_tables(T.load_runs("demo"), table1_rows=["mt"], table1_ratios=[0.5], table2_rows=["mt"])
    T.write_outputs(t, "demo")
    page = tmp_outputs / "docs" / "tables_generated.md"
    first = T.write_results_page("demo")
    assert page.read_text() == first and first.startswith("# Tables 1 and 2") and T.GENERATED_NOTE in first
    assert "60.00 (1 seed)" in first and "[results.md](results.md)" in first
    # every paper row without an implementation is named as typed only, and no implemented one is
    # every paper row is implemented; those without a run at this profile are named as not measured
    line = next(x for x in first.splitlines() if x.startswith("**Not measured here.**"))
    assert "have no implementation" not in line
    listed = line.split("The rows ", 1)[1].split(" are implemented but", 1)[0].split(", ")
    assert "MT" not in listed and "U-Net" in listed and {"CLIP", "ViLT", "LViT", "CMITM", "ASG", "MGCA"} <= set(listed)
    page.write_text(first + "hand edit\n")
    _fake_run("demo", "qata-synth", "mt", 0.5, 2, 0.7, 0.6)
    T.write_outputs(T.render_tables(T.load_runs("demo"), table1_rows=["mt"], table1_ratios=[0.5],
                                    table2_rows=["mt"]), "demo")
    second = T.write_results_page("demo", extra="a closing note")
    assert page.read_text() == second and "hand edit" not in second  # rewritten whole, never patched
    assert "65.00 ± 7.07" in second and "60.00 (1 seed)" not in second and second.endswith("a closing note\n")
    assert readme.read_text() == "# x\n## Tables 1 and 2\n<!-- section:tables -->\nhand text\n"
    assert sorted(p.name for p in (tmp_outputs / "docs").iterdir()) == ["tables_generated.md"]


def test_grid_adopts_runs_finished_outside_it_without_training(tmp_outputs):
    from dusss.config import make_config
    from dusss.ssmis import train_ssmis

    m = train_ssmis(make_config("smoke", method="supervised", ratio=0.25, seed=9, num_threads=1),  # the grid's budget
                    progress=False)
    saved = {p: p.stat().st_mtime_ns for p in runs_dir().rglob("*") if p.is_file()}  # the run's folder and more
    runs = T.run_grid("smoke", ["qata-synth"], [9], table1_rows=["unet", "mt"], table1_ratios=[0.25],
                      table2_rows=[], run_missing=False, progress=False)
    assert list(runs["run"]) == ["supervised-r0.25-s9"]  # adopted; mt was never run and is not trained
    assert runs["test_dice"].iloc[0] == pytest.approx(m["test_dice"])
    # not trained again: every file under the runs folder is untouched (no checkpoint, history or metrics rewritten)
    assert any(p.name == "best.pt" for p in saved) and {p: p.stat().st_mtime_ns for p in saved} == saved


def test_text_guided_rows_train_in_folders_of_their_own(tmp_outputs):
    # rows that differ only in their VLM must never share (and retrain over) one run folder
    folders = {row: run_config("smoke", "qata-synth", row, 0.5, 666, {}).out_dir for row in ("clip", "mgca", "cmitm", "asg", "sss", "dcl", "dusss")}
    assert len(set(folders.values())) == 7, folders
    assert all(f.endswith(run_name(row, 0.5, 666)) for row, f in folders.items())
    assert run_config("smoke", "qata-synth", "mt", 0.5, 666, {}).out_dir == ""  # other rows keep the default folder


def test_measured_seconds_take_the_wall_time_of_grid_runs_and_training_time_of_adopted_or_resumed_ones(
        tmp_path, monkeypatch):
    monkeypatch.setenv("DUSSS_RUNS", str(tmp_path))  # no pre-training runs to read
    # mt: adopted (0.2 s to copy a finished run), trained by the grid, resumed (the call did the last epochs)
    runs = pd.DataFrame({"method": ["mt", "mt", "mt", "dusss"], "ssmis_seconds": [0.2, 500.0, 300.0, 900.0],
                         "train_seconds": [450.0, 400.0, 600.0, 800.0]})
    assert T.measured_seconds("demo", runs) == {"mt": 500.0, "dusss": 900.0}


def test_grid_sets_aside_a_run_folder_trained_with_other_settings_and_keeps_a_resumable_one(tmp_outputs):
    cfg = run_config("smoke", "qata-synth", "mt", 0.25, 7, {})
    folder = T.ssmis_dir(cfg)
    folder.mkdir(parents=True)
    cfg.save(folder / "config.json")
    assert T.set_aside_stale(cfg) is None and folder.is_dir()  # same settings: left to resume
    cfg.replace(cons_weight=cfg.cons_weight * 3).save(folder / "config.json")
    (folder / "last.pt").write_bytes(b"old run")
    moved = T.set_aside_stale(cfg)
    assert moved is not None and not folder.exists()
    assert moved.parent == tmp_outputs / "runs" / "archive" / "stale" / folder.parent.name
    assert moved.name.startswith(folder.name + "-") and (moved / "last.pt").read_bytes() == b"old run"
    assert T.set_aside_stale(cfg) is None  # nothing left to move


def test_adopting_finished_runs_never_moves_a_folder_of_other_settings_but_the_grid_command_does(tmp_outputs):
    from dusss.experiments import grid
    cfg = run_config("smoke", "qata-synth", "unet", 0.25, 7, {"epochs": 1, "num_threads": 1})
    folder = T.ssmis_dir(cfg)
    T.train_ssmis(cfg.replace(lr=cfg.lr / 2), progress=False)  # a finished run of other settings in the row's folder
    before = (folder / "metrics.json").read_text()
    T.run_grid("smoke", ["qata-synth"], [7], table1_rows=["unet"], table1_ratios=[0.25], table2_rows=[],
               overrides={"epochs": 1, "num_threads": 1}, run_missing=False, progress=False)
    assert (folder / "metrics.json").read_text() == before  # left alone: not adopted, not moved
    assert not run_file("smoke", "qata-synth", "unet", 0.25, 7).is_file()
    result = grid._run_job("smoke", "qata-synth", "unet", 0.25, 7, {"epochs": 1}, 1)
    assert result["epochs_run"] == 1 and run_file("smoke", "qata-synth", "unet", 0.25, 7).is_file()
    moved = list((tmp_outputs / "runs" / "archive" / "stale" / folder.parent.name).iterdir())
    assert len(moved) == 1 and (moved[0] / "metrics.json").read_text() == before
