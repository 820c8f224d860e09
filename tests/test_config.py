"""The one config mechanism: profiles, overrides, type and key checking, save/load."""
import json
import subprocess
import sys

import pytest

from dusss.cli import main as cli_main
from dusss.config import PROFILES, Config, ConfigError, make_config, parse_overrides


def test_profile_plus_overrides_resolve_in_documented_order():
    cfg = make_config("smoke", {"epochs": "7", "use_sss": "false"}, lr=1e-3)
    assert cfg.profile == "smoke"
    assert cfg.image_size == PROFILES["smoke"]["image_size"]  # from the profile
    assert cfg.epochs == 7 and isinstance(cfg.epochs, int)  # --set text parsed to int
    assert cfg.use_sss is False
    assert cfg.lr == 1e-3
    assert cfg.seed == Config().seed  # untouched default
    # kwargs win over the overrides mapping
    assert make_config("demo", {"ratio": "0.25"}, ratio=0.5).ratio == 0.5


def test_demo_profile_is_the_dataclass_default():
    assert make_config("demo") == Config()


def test_paper_profile_has_the_paper_settings():
    cfg = make_config("paper")
    assert (cfg.image_size, cfg.unet_base, cfg.labelled_bs + cfg.unlabelled_bs, cfg.lr, cfg.patience) == (224, 64, 32, 3e-4, 20)


def test_env_selects_profile(monkeypatch):
    monkeypatch.setenv("DUSSS_PROFILE", "smoke")
    assert make_config().profile == "smoke"


@pytest.mark.parametrize("bad", [{"epochz": 3}, {"Ratio": 0.5}])
def test_unknown_key_is_rejected_with_its_name(bad):
    key = next(iter(bad))
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        make_config("demo", bad)


@pytest.mark.parametrize("key,value", [("epochs", 2.5), ("epochs", "two"), ("use_sss", "maybe"),
                                       ("use_sss", 1), ("lr", "fast"), ("dataset", 3), ("epochs", True)])
def test_wrongly_typed_value_is_rejected_with_its_name(key, value):
    with pytest.raises(ConfigError, match=f"config key '{key}' expects"):
        make_config("demo", **{key: value})


def test_int_is_accepted_for_a_float_key():
    cfg = make_config("demo", lr=1)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)


@pytest.mark.parametrize("key,value", [("ratio", 0.0), ("ratio", 1.5), ("sss_a", -1.0), ("method", "fancy"),
                                       ("image_size", 100), ("data_seed", -2)])
def test_out_of_range_values_are_rejected(key, value):
    with pytest.raises(ConfigError, match=key):
        make_config("demo", **{key: value})


def test_unknown_profile_is_rejected():
    with pytest.raises(ConfigError, match="unknown profile 'fast'"):
        make_config("fast")


def test_config_is_frozen():
    with pytest.raises(Exception):
        make_config("demo").epochs = 3  # type: ignore[misc]


def test_save_and_load_round_trip(tmp_path):
    cfg = make_config("smoke", ratio=0.5, method="mt")
    path = cfg.save(tmp_path / "config.json")
    assert json.loads(path.read_text())["ratio"] == 0.5
    assert Config.load(path) == cfg


def test_replace_validates():
    cfg = make_config("smoke")
    assert cfg.replace(epochs=3).epochs == 3 and cfg.replace(epochs=3).profile == "smoke"
    with pytest.raises(ConfigError):
        cfg.replace(epochs="x")


def test_parse_overrides():
    assert parse_overrides(["a=1", "b=x=y"]) == {"a": "1", "b": "x=y"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])


def test_cli_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "dusss", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("data", "pretrain", "ssmis", "evaluate", "bench"):
        assert command in out


def test_cli_rejects_bad_override_naming_the_key(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["ssmis", "--profile", "smoke", "--set", "epochz=3"])
    assert exc.value.code == 2
    assert "epochz" in capsys.readouterr().err


def test_atomic_writes_make_ordinary_readable_files(tmp_path):
    import os
    import stat

    from dusss.utils import atomic_write_json

    umask = os.umask(0o022)
    try:
        path = atomic_write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind


def test_amp_auto_means_bf16_on_cuda_only_and_bad_values_are_rejected():
    import torch

    from dusss.config import config_differences
    from dusss.utils import amp_enabled

    assert not amp_enabled("auto", "cpu") and amp_enabled("bf16", "cpu") and not amp_enabled("off", "cpu")
    assert amp_enabled("auto", "cuda") == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    with pytest.raises(ConfigError, match="'amp'"):
        make_config("smoke", amp="fp8")
    # the resume rule of both loops: keys a saved run lacks count as unchanged, others are compared
    cfg = make_config("smoke")
    saved = {k: v for k, v in cfg.to_dict().items() if k != "amp"}
    assert config_differences(saved, cfg, ["amp", "ratio"]) == []
    assert config_differences({**saved, "ratio": 0.5}, cfg, ["amp", "ratio"]) == ["ratio"]


def test_every_field_declares_which_step_it_changes_and_step_keys_read_those_declarations():
    from dataclasses import fields

    from dusss.config import step_keys

    undeclared = [f.name for f in fields(Config) if "steps" not in f.metadata]
    assert not undeclared, f"declare these fields with _shared/_step1/_step2/_ops: {undeclared}"
    one, two = step_keys(1), step_keys(2)
    assert {"seed", "data_seed", "dataset", "ratio", "text_model", "use_sss", "vlm_epochs"} <= one
    assert {"seed", "data_seed", "dataset", "ratio", "method", "lr", "cons_weight", "epochs"} <= two
    assert not one & {"method", "lr", "device", "out_dir"} and not two & {"text_model", "use_sss", "device"}
    # resume=True leaves out only what a resumed run may change: its length
    assert one - step_keys(1, resume=True) == {"vlm_epochs"}
    assert two - step_keys(2, resume=True) == {"epochs", "patience", "min_epochs", "guard_epochs"}
    with pytest.raises(ValueError, match="step"):
        step_keys(3)


def test_one_resume_rule_for_both_steps_counts_the_data_seed(tmp_path):
    from dusss import pretrain, ssmis
    from dusss.config import resume_differences

    saved = make_config("smoke").to_dict()
    assert resume_differences(saved, make_config("smoke", vlm_epochs=9, epochs=9, device="cpu"), 1) == []
    assert resume_differences(saved, make_config("smoke", epochs=9, patience=9, num_threads=1), 2) == []
    for step, check in ((1, pretrain._check_resumable), (2, ssmis._check_resumable)):
        other = make_config("smoke", data_seed=5)
        assert resume_differences(saved, other, step) == ["data_seed"]
        with pytest.raises(ConfigError, match="data_seed"):
            check(saved, other, tmp_path)
    # a key the saved run does not know yet (added to Config later) counts as unchanged
    old = {k: v for k, v in saved.items() if k != "bn_batch"}
    assert resume_differences(old, make_config("smoke"), 2) == []


def test_keys_renamed_to_the_one_spelling_still_read_from_old_configs_and_old_commands(tmp_path):
    from dusss.config import config_differences, step_keys

    assert make_config("smoke", {"labeled_bs": "3"}, unlabeled_bs=5).labelled_bs == 3  # --set with the old name
    old = {("labeled_bs" if k == "labelled_bs" else k): v for k, v in make_config("smoke").to_dict().items()}
    old.pop("profile")
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"profile": "smoke", **old}))
    assert Config.load(path) == make_config("smoke")  # a config saved before the rename
    assert config_differences(old, make_config("smoke", labelled_bs=7), step_keys(2)) == ["labelled_bs"]
