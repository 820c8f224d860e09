"""Convergence curves from the per-run results files: history kept, back-filled, summarised, drawn."""
import json

import numpy as np
import pandas as pd
import pytest

from dusss.experiments import convergence as C
from dusss.runs import run_file


@pytest.fixture
def tmp_results(tmp_path, monkeypatch):
    monkeypatch.setenv("DUSSS_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("DUSSS_FIGURES", str(tmp_path / "figures"))
    return tmp_path


def _history_csv(folder, val, teacher=None):
    folder.mkdir(parents=True, exist_ok=True)
    n = len(val)
    frame = pd.DataFrame({"epoch": range(1, n + 1), "steps": [50 * (i + 1) for i in range(n)], "lr": np.linspace(1, 0, n),
                          "val_dice": val, "diag_teacher_dice": teacher if teacher is not None else [np.nan] * n})
    frame.to_csv(folder / "history.csv", index=False)


def _result(row, method, ratio, seed, folder, val, stopped_early):
    path = run_file("demo", "toy", row, ratio, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    best = int(np.argmax(val)) + 1
    path.write_text(json.dumps({"dataset": "toy", "method": method, "ratio": ratio, "seed": seed, "row": row,
                                "out_dir": str(folder), "epochs_run": len(val), "best_epoch": best,
                                "stopped_early": stopped_early, "test_dice": 0.5}))
    return path


def test_read_history_keeps_the_curve_columns_and_nan_for_a_method_without_teacher(tmp_path):
    _history_csv(tmp_path / "run", [0.1, 0.3, 0.2])
    h = C.read_history(tmp_path / "run")
    assert list(h) == list(C.HISTORY_COLUMNS) and h["epoch"] == [1.0, 2.0, 3.0] and h["val_dice"] == [0.1, 0.3, 0.2]
    assert all(np.isnan(h["diag_teacher_dice"])) and all(np.isnan(h["diag_text_dice"]))
    assert C.read_history(tmp_path / "absent") == {}


def test_attach_fills_missing_histories_once_and_summary_tells_plateau_from_still_improving(tmp_results):
    improving, plateau = [0.2, 0.4, 0.5, 0.6, 0.7], [0.5, 0.7, 0.69, 0.68, 0.66, 0.65]
    _history_csv(tmp_results / "r1", improving, [0.3, 0.4, 0.5, 0.5, 0.6])
    _history_csv(tmp_results / "r2", plateau)
    p1 = _result("mt", "mt", 0.05, 1, tmp_results / "r1", improving, False)
    _result("unet", "supervised", 0.05, 1, tmp_results / "r2", plateau, True)
    _result("unet", "supervised", 0.05, 2, tmp_results / "gone", plateau, True)  # no run folder here: left alone
    assert C.attach_histories("demo") == 2
    assert C.attach_histories("demo") == 0  # idempotent
    assert json.loads(p1.read_text())["history"]["val_dice"] == improving
    hist = C.load_histories("demo", "toy")
    assert set(hist["row"]) == {"mt", "unet"} and len(hist) == len(improving) + len(plateau)
    assert hist.loc[hist["row"] == "mt", "teacher_dice"].tolist() == pytest.approx([30, 40, 50, 50, 60])
    s = C.convergence_summary(hist).set_index("row")
    assert s.loc["mt", "best_at_last_epoch"] == 1 and s.loc["mt", "stopped_early"] == 0
    assert s.loc["mt", "gain_last3"] == pytest.approx(100 * (0.7 - 0.4))
    assert s.loc["unet", "stopped_early"] == 1 and s.loc["unet", "best_at_last_epoch"] == 0
    assert s.loc["unet", "gain_last3"] < 0
    pl = C.pseudo_label_summary(hist).set_index("row")  # at each run's best epoch
    assert pl.loc["mt", "teacher_dice"] == pytest.approx(60) and pl.loc["mt", "val_dice"] == pytest.approx(70)
    assert np.isnan(pl.loc["mt", "text_dice"]) and np.isnan(pl.loc["unet", "teacher_dice"])
    assert pl.loc["unet", "val_dice"] == pytest.approx(70) and pl.loc["unet", "runs"] == 1
    fig = C.plot_convergence(hist, "toy")
    assert len(fig.axes) == 2 and fig.axes[0].get_legend_handles_labels()[1]  # one share: two panels, a legend


def test_run_one_keeps_the_history_in_the_results_file(tmp_results, monkeypatch):
    from dusss.experiments import tables as T
    monkeypatch.setenv("DUSSS_RUNS", str(tmp_results / "runs"))
    result = T.run_one("smoke", "qata-synth", "unet", 0.25, 7, overrides={"epochs": 2, "num_threads": 1})
    saved = json.loads(run_file("smoke", "qata-synth", "unet", 0.25, 7).read_text())
    assert saved["history"]["epoch"] == result["history"]["epoch"] == [1.0, 2.0]
    assert saved["history"]["val_dice"] == result["history"]["val_dice"]
    assert len(saved["history"]["val_dice"]) == saved["epochs_run"]
