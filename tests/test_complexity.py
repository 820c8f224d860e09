"""Params and FLOPs per table row (dusss.experiments.complexity), checked against hand counts; the CLI run for real."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch import nn

from dusss.cli import main as cli_main
from dusss.config import make_config
from dusss.experiments import complexity as C
from dusss.methods import METHODS
from dusss.runs import ROWS, TABLE1_ROWS, RowSpec
from dusss.textseg import STUDENTS
from dusss.unet import build_unet


def _conv_macs(h: int, w: int, c_in: int, c_out: int, k: int) -> int:
    """Multiply-adds of a stride-1, 'same'-padded k x k convolution producing an h x w map."""
    return h * w * c_out * c_in * k * k


def _unet_macs(b: int, s: int) -> int:
    """Closed form of LViT's U-Net (base b, side s, one output channel): its 3x3 convs, 2x2 transposed convs, 1x1 head."""
    macs = _conv_macs(s, s, 3, b, 3)  # inc
    for c_in, c_out, side in ((b, 2 * b, s // 2), (2 * b, 4 * b, s // 4), (4 * b, 8 * b, s // 8), (8 * b, 8 * b, s // 16)):
        macs += _conv_macs(side, side, c_in, c_out, 3) + _conv_macs(side, side, c_out, c_out, 3)  # down blocks
    for c_cat, c_out, side in ((16 * b, 4 * b, s // 8), (8 * b, 2 * b, s // 4), (4 * b, b, s // 2), (2 * b, b, s)):
        c = c_cat // 2
        macs += (side // 2) ** 2 * c * c * 4  # transposed conv: each input pixel feeds a 2x2 block of c outputs
        macs += _conv_macs(side, side, c_cat, c_out, 3) + _conv_macs(side, side, c_out, c_out, 3)
    return macs + s * s * b  # 1x1 output conv


def test_a_single_conv_counts_two_flops_per_multiply_add():
    conv = nn.Conv2d(3, 5, kernel_size=3, padding=1)
    params, flops = C.count_complexity(conv, (torch.zeros(1, 3, 16, 12),))
    assert params == 5 * 3 * 9 + 5
    assert flops == 2 * _conv_macs(16, 12, 3, 5, 3)  # the bias is not counted


def test_a_transposed_conv_is_counted_per_input_pixel():
    up = nn.ConvTranspose2d(4, 6, kernel_size=2, stride=2)
    _, flops = C.count_complexity(up, (torch.zeros(1, 4, 8, 8),))
    assert flops == 2 * 8 * 8 * 4 * 6 * 4  # not per output pixel (4x this), as ptflops-style counters charge it


def test_the_unet_count_is_its_parameters_and_the_closed_form():
    cfg = make_config("smoke")
    model = build_unet(cfg)
    params, flops = C.count_complexity(model, (torch.zeros(1, 3, 64, 64),))
    assert params == sum(p.numel() for p in model.parameters())
    assert flops == 2 * _unet_macs(cfg.unet_base, 64)
    assert model.training  # the count leaves the mode as it found it


def test_every_registered_row_yields_numbers_or_says_why_not():
    table = C.complexity_table(make_config("smoke"), size=32)
    assert list(table.columns) == C.COLUMNS
    assert list(table["row"]) == list(dict.fromkeys([*TABLE1_ROWS, *ROWS]))
    unet = C.count_complexity(build_unet(make_config("smoke")), (torch.zeros(1, 3, 32, 32),))
    for r in table.itertuples():
        assert r.status in ("measured", "not built"), r
        if r.status == "measured":
            assert r.counted.startswith("inference: "), r.counted
            assert r.params_m > 0 and r.gflops > 0 and r.gmacs == pytest.approx(r.gflops / 2)
        else:
            assert r.counted.startswith("not built: ") and math.isnan(r.params_m), r
    measured = table.set_index("row")
    for row in ("unet100", "mt", "dusss"):  # the current rows all test with the student U-Net
        assert measured.loc[row, "params_m"] == pytest.approx(unet[0] / 1e6)
        assert measured.loc[row, "gflops"] == pytest.approx(unet[1] / 1e9)
    assert measured.loc["unet100", "paper_params_m"] == 14.75 and measured.loc["dusss", "paper_flops_g"] == 25.19
    assert measured.loc["unet100", "train_only_params_m"] == 0
    assert measured.loc["dusss", "train_only_params_m"] > 1  # the VLM (with its frozen MiniLM) trains only
    assert "Step-1 VLM" in measured.loc["dusss", "counted"]
    assert measured.loc["cct", "train_only_params_m"] > 0 and "decoders" in measured.loc["cct", "counted"]


def test_rows_that_cannot_be_built_are_lines_not_crashes(monkeypatch):
    monkeypatch.setitem(ROWS, "typed", RowSpec("typed only", None, paper1="LViT"))
    monkeypatch.setitem(ROWS, "missing", RowSpec("method not written yet", "no-such-method"))
    monkeypatch.setitem(ROWS, "broken", RowSpec("student fails to build", "bcp"))

    def broken(cfg):
        raise RuntimeError("weights for the student are not shipped")

    monkeypatch.setitem(STUDENTS, "broken", broken)
    monkeypatch.setattr(METHODS["bcp"], "student", "broken", raising=False)
    table = C.complexity_table(make_config("smoke"), size=32, rows=["typed", "missing", "broken", "unet"]).set_index("row")
    assert table.loc["typed", "counted"].startswith("not built: no implementation")
    assert table.loc["typed", "paper_params_m"] == 29.72  # the paper's numbers stay beside the missing ones
    assert "'no-such-method' is not registered" in table.loc["missing", "counted"]
    assert "RuntimeError: weights for the student are not shipped" in table.loc["broken", "counted"]
    assert (table.loc[["typed", "missing", "broken"], "status"] == "not built").all()
    assert table.loc["unet", "status"] == "measured"


class _TextStudent(nn.Module):
    """A text-conditioned student holding a frozen encoder outside its parameters, as dusss.textseg's do."""

    needs_text = True

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        object.__setattr__(self, "_encoder", nn.Linear(7, 2))  # not a submodule

    def forward(self, x, texts):
        assert texts == [C.EXAMPLE_REPORT]
        return self.conv(x)


def test_a_student_from_the_registry_is_picked_up(monkeypatch):
    monkeypatch.setitem(STUDENTS, "toy", lambda cfg: _TextStudent())
    monkeypatch.setattr(METHODS["dusss"], "student", "toy", raising=False)  # uses_text: the VLM trains only
    line = C.row_complexity("dusss", make_config("smoke"), 32, vlm_params=lambda cfg: (10, 4))
    assert line["status"] == "measured" and "student toy (_TextStudent, reads the report at test)" in line["counted"]
    assert line["params_m"] == pytest.approx(4 / 1e6) and line["gflops"] == pytest.approx(2 * 32 * 32 * 3 / 1e9)
    assert "held outside its parameters (not in params_m): _encoder 1.6e-05 M" in line["counted"]
    assert line["train_only_params_m"] == pytest.approx(10 / 1e6)


def test_the_cli_writes_the_csv_and_refuses_a_bad_size(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DUSSS_RESULTS", str(tmp_path / "results"))
    assert cli_main(["complexity", "--profile", "smoke", "--size", "32"]) == 0
    table = pd.read_csv(tmp_path / "results" / "complexity_smoke.csv")
    assert list(table.columns) == C.COLUMNS and set(TABLE1_ROWS) <= set(table["row"])
    assert (table["image_size"] == 32).all() and (table["profile"] == "smoke").all()
    assert "| unet100 |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli_main(["complexity", "--profile", "smoke", "--size", "30"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--size 30 must be a positive multiple of 16" in err[0]
