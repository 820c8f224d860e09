"""Errors the user caused reach them as one line with exit status 2; own data in the LViT layout just works.

The CLI is run for real: in a subprocess (``python -m dusss``, as a user types
it) where the one-line stderr matters, and through ``main([...])`` for the
smoke pre-training on the LViT fixture.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dusss.cli import main as cli_main
from dusss.config import ConfigError, make_config
from dusss.data import DataError
from dusss.errors import CheckpointError, DusssError, MissingCheckpointError
from dusss.utils import atomic_torch_save, load_checkpoint, repo_root
from dusss.vlm import load_vlm

FIX = Path(__file__).parent / "fixtures"


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def _dusss(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo_root()), DUSSS_RUNS=str(cwd / "runs"))
    return subprocess.run([sys.executable, "-m", "dusss", *argv], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single stderr line of a user error (nothing else on stderr, no traceback)."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "error: " in lines[0]
    return lines[0]


def test_the_error_classes_share_one_user_error_base():
    for cls in (ConfigError, DataError, CheckpointError, MissingCheckpointError):
        assert issubclass(cls, DusssError) and issubclass(cls, ValueError)
    assert issubclass(MissingCheckpointError, FileNotFoundError)  # what a missing checkpoint raised before
    assert not issubclass(RuntimeError, DusssError)


def test_a_gpu_asked_for_on_a_machine_without_one_is_a_config_error(monkeypatch):
    from dusss.utils import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="'cuda:0' was requested but CUDA is not available"):
        resolve_device("cuda:0")
    assert resolve_device("auto") == torch.device("cpu")


def test_own_data_in_the_lvit_layout_trains_without_naming_the_dataset(tmp_path, caplog):
    data = shutil.copytree(FIX / "qata_lvit", tmp_path / "mine")
    before = _files(data)
    out = tmp_path / "run"
    argv = ["pretrain", "--profile", "smoke", "--data-root", str(data), "--out", str(out), "--device", "cpu",
            "--set", "num_threads=1", "--set", "vlm_epochs=1"]
    with caplog.at_level(logging.INFO, logger="dusss"):
        assert cli_main(argv) == 0
    said = [r.getMessage() for r in caplog.records if "reading it as dataset=lvit" in r.getMessage()]
    assert len(said) == 1 and "--set dataset=qata|monuseg|bmseg" in said[0]  # logged once, with the way out
    saved = json.loads((out / "config.json").read_text())
    assert saved["dataset"] == "lvit" and saved["data_root"] == str(data)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_train"] == 3  # the fixture's Train_Folder, not a generated set
    assert load_vlm(out / "vlm.pt").cfg.dataset == "lvit"
    assert _files(data) == before  # read, never written to
    assert not (tmp_path / ".mine.lock").exists()


def test_every_command_reads_its_config_from_what_data_root_holds(tmp_path):
    from dusss.cli import build_parser, config_from_args

    data = shutil.copytree(FIX / "qata_lvit", tmp_path / "mine")
    for command in (["pretrain"], ["ssmis"], ["data", "gallery"], ["bench"]):
        cfg = config_from_args(build_parser().parse_args([*command, "--profile", "smoke", "--data-root", str(data)]))
        assert cfg.dataset == "lvit", command
    kept = config_from_args(build_parser().parse_args(["ssmis", "--data-root", str(data), "--set", "dataset=qata"]))
    assert kept.dataset == "qata"


def test_missing_data_root_is_one_line_naming_it(tmp_path):
    missing = tmp_path / "no such folder"
    proc = _dusss("pretrain", "--profile", "smoke", "--data-root", str(missing), "--set", "dataset=lvit",
                  "--out", str(tmp_path / "run"), cwd=tmp_path)
    line = _one_error_line(proc)
    assert str(missing) in line and "does not exist" in line
    assert not (tmp_path / "run").exists()  # stopped before writing anything


def test_raw_qata_download_names_the_prepare_command(tmp_path):
    raw = shutil.copytree(FIX / "qata_raw", tmp_path / "raw")
    before = _files(raw)
    proc = _dusss("pretrain", "--profile", "smoke", "--data-root", str(raw), "--out", str(tmp_path / "run"),
                  cwd=tmp_path)
    line = _one_error_line(proc)
    assert f"python -m dusss data prepare-qata {raw}" in line and "delete" not in line
    assert _files(raw) == before and not (tmp_path / ".raw.lock").exists() and not (tmp_path / "run").exists()


def test_config_typo_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["pretrain", "--profile", "smoke", "--set", "vlm_epochz=1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: unknown config key 'vlm_epochz'" in err[0]


def test_missing_and_foreign_checkpoints_are_checkpoint_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["evaluate", "--profile", "smoke", "--checkpoint", str(tmp_path / "best.pt")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"checkpoint {tmp_path / 'best.pt'} does not exist" in err[0]
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*notes.pt"):
        load_checkpoint(tmp_path / "notes.pt")
    atomic_torch_save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a DuSSS VLM checkpoint"):
        load_vlm(tmp_path / "other.pt")


def test_a_bug_keeps_its_traceback(monkeypatch):
    import dusss.commands

    def broken(args, cfg):
        raise RuntimeError("a bug")

    monkeypatch.setattr(dusss.commands, "run_pretrain", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli_main(["pretrain", "--profile", "smoke"])


def test_ipython_shows_a_user_error_as_one_line_and_fails_the_cell(capsys):
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    try:
        result = shell.run_cell("from dusss.data import DataError\n"
                                "def open_it():\n    raise DataError('data folder /x does not exist')\nopen_it()")
        shown = capsys.readouterr().out.strip().splitlines()
        assert isinstance(result.error_in_exec, DataError)  # the cell failed (papermill, nbval stop here)
        assert shown == ["DataError: data folder /x does not exist"]
        result = shell.run_cell("def broken():\n    raise RuntimeError('a bug')\nbroken()")
        shown = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)  # without IPython's colours
        assert isinstance(result.error_in_exec, RuntimeError) and "----> 3 broken()" in shown  # a bug: full traceback
    finally:
        InteractiveShell.clear_instance()


def test_folders_dusss_did_not_write_are_refused_untouched_and_without_advice_to_delete(tmp_path):
    from dusss.data import ensure_dataset

    foreign = tmp_path / "mine"
    (foreign / "notes").mkdir(parents=True)
    raw = shutil.copytree(FIX / "bmseg_raw", tmp_path / "bm")
    for root, expected in ((foreign, "not a data set generated by dusss"), (raw, "prepare-bmseg")):
        before = _files(root)
        with pytest.raises(DataError, match=expected) as exc:
            ensure_dataset(make_config("smoke", data_root=str(root)))
        assert "delete" not in str(exc.value) and "remove" not in str(exc.value)
        assert _files(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bm", "mine"]  # no lock or temporary folder beside them
