"""The run registry (dusss.runs): run names that results files are named by, one VLM-variant rule, one pre-training
share rule."""
from __future__ import annotations

import pytest

from dusss.config import ConfigError, make_config
from dusss.paths import results_dir
from dusss.runs import (PRETRAIN_RATIO, ROWS, TABLE1_ROWS, TABLE2_ROWS, default_vlm_checkpoint, needs_vlm,
                        pretrain_config, pretrain_dir, pretrain_ratio, row_spec, run_file, run_name, vlm_variant)

# results/runs/**/<name>.json are named by these: a change orphans every committed results file
NAMES_AT_25_PERCENT_SEED_666 = {
    "unet100": "supervised-r1-s666", "unet": "supervised-r0.25-s666", "mt": "mt-r0.25-s666",
    "bcp": "bcp-r0.25-s666", "ucmt": "ucmt-r0.25-s666", "cct": "cct-r0.25-s666", "mcnet": "mcnet-r0.25-s666",
    "ssnet": "ssnet-r0.25-s666", "clip": "dusss-sss0-cmc1-imc0-tg0-r0.25-s666",
    "mgca": "dusss-mgca-tg0-r0.25-s666",
    "cmitm": "dusss-cmitm-tg0-r0.25-s666", "asg": "dusss-asg-tg0-r0.25-s666",
    "clipseg": "clipseg-r1-s666", "vilt": "vilt-r1-s666", "lvit": "lvit-r0.25-s666",
    "sss": "dusss-sss1-cmc1-imc0-tg0-r0.25-s666", "dcl": "dusss-sss0-cmc1-imc1-tg0-r0.25-s666",
    "sss+tg": "dusss-sss1-cmc1-imc0-tg1-r0.25-s666", "dcl+tg": "dusss-sss0-cmc1-imc1-tg1-r0.25-s666",
    "sss+dcl": "dusss-sss1-cmc1-imc1-tg0-r0.25-s666", "dusss": "dusss-sss1-cmc1-imc1-tg1-r0.25-s666",
}


def test_run_names_are_the_ones_results_files_carry():
    assert {row: run_name(row, 0.25, 666) for row in ROWS} == NAMES_AT_25_PERCENT_SEED_666
    assert run_name("unet", 0.05, 1) == "supervised-r0.05-s1" and run_name("unet100", 0.05, 1) == "supervised-r1-s1"
    assert run_file("demo", "nuclei-real", "mt", 0.5, 666) == results_dir() / "runs/nuclei-real-demo/mt-r0.5-s666.json"
    assert set(TABLE1_ROWS) | set(TABLE2_ROWS) <= set(ROWS)
    with pytest.raises(ConfigError, match=r"unknown table row 'dcl\+sss'"):
        run_name("dcl+sss", 0.5, 1)


def test_a_row_and_the_pretraining_run_of_its_switches_share_one_vlm_variant():
    for row in ROWS:
        spec = row_spec(row)
        assert needs_vlm(row) == bool(spec.switches)  # exactly the rows with VLM switches read a VLM
        if spec.switches:
            cfg = make_config("smoke", method=spec.method, ratio=0.5, **spec.switches)
            assert vlm_variant(cfg) == vlm_variant(spec.switches) and vlm_variant(cfg) in run_name(row, 0.5, 1)
            assert default_vlm_checkpoint(cfg).parent.name == f"{vlm_variant(cfg)}-s{cfg.seed}"


def test_the_pretraining_share_rule():
    assert PRETRAIN_RATIO == 0.25
    assert [pretrain_ratio(q) for q in (0.02, 0.25, 0.5, 1.0)] == [0.02, 0.25, 0.25, 0.25]
    cfg = make_config("smoke", method="dusss", ratio=0.5, out_dir="/elsewhere")
    pre = pretrain_config(cfg)
    assert pre.ratio == 0.25 and pre.out_dir == "" and pre.replace(ratio=0.5, out_dir="/elsewhere") == cfg
    assert pretrain_dir(pre) / "vlm.pt" == default_vlm_checkpoint(cfg)  # the run it trains is the VLM Step 2 reads
