"""The experiment harness: grid jobs, seeds, the pre-training share rule, the grid run for real (smoke), the study's
summary and choice on made-up runs."""
import json

import pandas as pd
import pytest

from dusss.config import make_config
from dusss.experiments import grid, study
from dusss.runs import default_vlm_checkpoint, pretrain_dir, pretrain_ratio, run_file, run_name


def test_parse_seeds_ranges_and_lists():
    assert grid.parse_seeds("666-668") == [666, 667, 668]
    assert grid.parse_seeds("1,3, 5-6") == [1, 3, 5, 6]


def test_grid_jobs_are_distinct_runs_with_seeds_outermost():
    jobs = grid.grid_jobs("demo", ["sweep", "mt"], ["qata-synth"], [1, 2])
    names = [run_name(r, q, s) for _, r, q, s in jobs]
    assert len(names) == len(set(names))  # the labelled-only cells both grids hold are one run
    assert [s for *_, s in jobs] == sorted(s for *_, s in jobs)  # a grid stopped halfway has whole seeds
    assert ("qata-synth", "mt", grid.LOWEST_SHARE, 1) in jobs and ("qata-synth", "unet100", 1.0, 2) in jobs
    with pytest.raises(ValueError, match="unknown grid"):
        grid.grid_jobs("demo", ["tabel1"], ["qata-synth"], [1])


def test_vlm_of_a_share_below_the_pretraining_share_has_its_own_folder():
    assert pretrain_ratio(0.5) == 0.25 and pretrain_ratio(0.05) == 0.05
    at = {q: default_vlm_checkpoint(make_config("smoke", method="dusss", ratio=q)) for q in (0.05, 0.25, 0.5)}
    assert at[0.25] == at[0.5] != at[0.05]
    # the pre-training run writes where the Step-2 run looks
    assert pretrain_dir(make_config("smoke", ratio=0.05)) / "vlm.pt" == at[0.05]
    assert pretrain_dir(make_config("smoke", ratio=0.25)) / "vlm.pt" == at[0.25]


def test_grid_runs_missing_runs_and_skips_finished_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("DUSSS_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("DUSSS_RUNS", str(tmp_path / "runs"))
    overrides = {"data_root": str(tmp_path / "data"), "epochs": 1}
    jobs = [("qata-synth", "unet", 0.5, 5), ("qata-synth", "unet100", 1.0, 5)]
    done = grid.run_jobs("smoke", jobs, workers=1, overrides=overrides, progress=False)
    assert len(done) == 2
    for job in jobs:
        result = json.loads(run_file("smoke", *job).read_text())
        assert 0.0 <= result["test_dice"] <= 1.0 and not result["out_dir"].startswith("/work")
    assert grid.run_jobs("smoke", jobs, workers=1, overrides=overrides, progress=False) == []  # nothing left to do


def _study_frame():
    rows = []
    for seed, base in zip((1, 2, 3), (0.60, 0.62, 0.58)):
        rows.append(("qata-synth", "labelled-only", seed, base))
        rows.append(("qata-synth", "good", seed, base + 0.02 + 0.001 * seed))
        rows.append(("qata-synth", "bad", seed, base - 0.03))
    frame = pd.DataFrame(rows, columns=["dataset", "recipe", "seed", "val_dice"])
    return frame.assign(best_epoch=10, decline=False, curve_val_dice=None, curve_teacher_dice=None,
                        test_dice=frame["val_dice"] - 0.01 * (frame["recipe"] == "good"))


def test_study_summary_pairs_by_seed_and_chooses_the_best_validation_gain():
    summary = study.summarise(_study_frame()).set_index("recipe")
    assert summary.loc["good", "minus_labelled_only"] == pytest.approx(2.2)
    assert summary.loc["good", "ci_low"] > 0 and summary.loc["bad", "ci_high"] < 0  # paired: seed effects cancel
    assert summary.loc["bad", "minus_labelled_only"] == pytest.approx(-3.0)
    assert study.choose(study.summarise(_study_frame())) == "good"
    with pytest.raises(ValueError, match="no recipe runs"):
        study.choose(study.summarise(_study_frame().iloc[:0]))


def test_study_markdown_lists_every_recipe_best_first_with_its_interval():
    text = study.summary_markdown(study.summarise(_study_frame()))
    rows = [line for line in text.splitlines() if line.startswith("| qata-synth")]
    assert [r.split("|")[2].strip() for r in rows] == ["`good`", "`bad`"]
    assert "+2.20 [" in rows[0] and "-3.00 [" in rows[1] and rows[0].rstrip().endswith("| 3 | 0 |")


def test_confirm_reads_test_dice_of_the_chosen_recipe_only_paired_by_seed():
    frame = _study_frame()
    row = study.confirm(frame, "good").iloc[0]
    assert row["minus_labelled_only"] == pytest.approx(1.2) and row["n_pairs"] == 3 and row["seeds"] == "1,2,3"
    assert row["test_dice"] == pytest.approx(100 * frame[frame["recipe"] == "good"]["test_dice"].mean())
    assert study.confirm(frame, "absent").empty


def test_run_study_puts_missing_baselines_and_recipes_in_one_pool_and_skips_done_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("DUSSS_RESULTS", str(tmp_path))
    done = study.study_file("smoke", "qata-synth", "previous", 2)
    done.parent.mkdir(parents=True)
    done.write_text("{}")
    calls = []
    monkeypatch.setattr(study, "_study_job", lambda profile, *item: calls.append(item[:3]))
    study.run_study("smoke", ["qata-synth"], [1, 2], ["previous"], workers=1)
    assert calls == [("qata-synth", "labelled-only", 1), ("qata-synth", "labelled-only", 2),
                     ("qata-synth", "previous", 1)]


def test_every_recipe_is_a_valid_config():
    for name in study.RECIPES:
        cfg = study._recipe_config("smoke", "qata-synth", name, 1, {})
        assert cfg.method == "mt" and cfg.ratio == grid.LOWEST_SHARE


def test_grid_jobs_keep_only_the_asked_rows_and_shares_and_refuse_cells_no_grid_has():
    jobs = grid.grid_jobs("demo", ["table1"], ["nuclei-real"], [1, 2], rows=["cct", "mcnet"], shares=[0.05])
    assert sorted({(r, q) for _, r, q, _ in jobs}) == [("cct", 0.05), ("mcnet", 0.05)] and len(jobs) == 4
    with pytest.raises(ValueError, match="row.*ucmtt.*none of the grids"):
        grid.grid_jobs("demo", ["mt"], ["nuclei-real"], [1], rows=["ucmtt"])
    with pytest.raises(ValueError, match="share.*0.3.*none of the grids"):
        grid.grid_jobs("demo", ["mt"], ["nuclei-real"], [1], shares=[0.3])
