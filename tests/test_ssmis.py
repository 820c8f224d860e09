"""Step 2 run for real at the smoke profile: outputs, determinism, resume, baselines, CLI, text-map augmentation.

The ``dusss`` runs use a VLM really pre-trained at the smoke profile (never a
mock); everything lives in temporary folders.
"""
import json
import os

import pandas as pd
import pytest
import torch

from dusss.cli import main as cli_main
from dusss.config import make_config
from dusss.data import JointAugment, LViTDataset
from dusss.ssmis import FLAT_TEXT_LOGIT, TensorSplit, _Augmenter, load_student, train_ssmis

SMOKE = dict(num_threads=1, epochs=3)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Smoke data and a smoke-pre-trained VLM in a temporary folder (both made for real)."""
    from dusss.pretrain import pretrain

    root = tmp_path_factory.mktemp("ssmis")
    data = root / "qata-synth"
    vlm_dir = root / "vlm"
    pretrain(make_config("smoke", data_root=str(data), out_dir=str(vlm_dir), num_threads=1), progress=False)
    assert (vlm_dir / "vlm.pt").is_file()
    return {"root": root, "data": str(data), "vlm": str(vlm_dir / "vlm.pt")}


def _cfg(env, name, **kw):
    opts = dict(SMOKE, data_root=env["data"], vlm_checkpoint=env["vlm"], out_dir=str(env["root"] / name))
    opts.update(kw)
    return make_config("smoke", **opts)


@pytest.fixture(scope="module")
def dusss_run(env):
    cfg = _cfg(env, "dusss-a")
    return cfg, train_ssmis(cfg, progress=False)


def test_dusss_run_writes_checkpoints_history_metrics_and_per_image_scores(env, dusss_run):
    cfg, metrics = dusss_run
    out = env["root"] / "dusss-a"
    for name in ("config.json", "history.csv", "best.pt", "last.pt", "metrics.json", "test_per_image.csv", "split.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text()) == metrics
    for key in ("val_dice", "val_miou", "test_dice", "test_miou"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["n_labelled"] + metrics["n_unlabelled"] == cfg.synth_train
    assert metrics["n_labelled"] == round(cfg.ratio * cfg.synth_train)

    # checkpoints load with weights_only=True and hold a student whose test score is the reported one
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert best["epoch"] == metrics["best_epoch"]
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert last["finished"] and last["epoch"] == metrics["epochs_run"]
    model, saved_cfg, _ = load_student(out / "best.pt")
    assert saved_cfg == cfg and not model.training

    per_image = pd.read_csv(out / "test_per_image.csv")
    assert len(per_image) == metrics["n_test"] == cfg.synth_test
    assert per_image["dice"].mean() == pytest.approx(metrics["test_dice"])
    assert per_image["dice"].between(0, 1).all() and per_image["iou"].le(per_image["dice"] + 1e-12).all()

    # the history: one row per epoch, the supervised loss goes down, the teacher follows the student by EMA
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == list(range(1, metrics["epochs_run"] + 1))
    assert history["loss_sup"].iloc[-1] < history["loss_sup"].iloc[0]
    assert (history["loss_text"] > 0).all() and (history["loss_merged"] > 0).all()
    # Eq. 12 with the ramp: alpha at the last step t = global_step - 1 is min(1 - 1/(t + 1), ema_alpha)
    expected = [min(1.0 - 1.0 / s, cfg.ema_alpha) for s in history["steps"]]
    assert history["ema_alpha"].tolist() == pytest.approx(expected)
    t_w, s_w = last["teacher"]["outc.weight"], last["student"]["outc.weight"]
    assert not torch.equal(t_w, s_w) and torch.allclose(t_w, s_w, atol=0.5)


def test_pseudo_label_diagnostics_are_scores_and_a_flat_text_map_leaves_the_teacher_unchanged(env, dusss_run):
    history = pd.read_csv(env["root"] / "dusss-a" / "history.csv")
    for key in ("diag_teacher_dice", "diag_text_dice", "diag_merged_dice", "diag_flat_frac"):
        assert history[key].between(0, 1).all(), key
    flat = history[history["diag_flat_frac"] > 0]
    # merging adds logits: |z_text| < tol moves the probability by at most tol / 4 ...
    assert (flat["diag_flat_shift"] <= FLAT_TEXT_LOGIT / 4 + 1e-6).all()
    # ... so the label changes only where the teacher itself is within tol of 0.5
    assert (flat["diag_flat_agree"] > 0.9).all()


def test_same_seed_and_settings_give_identical_numbers(env, dusss_run):
    _, first = dusss_run
    second = train_ssmis(_cfg(env, "dusss-b"), progress=False)
    for key in ("val_dice", "test_dice", "test_miou", "best_epoch"):
        assert second[key] == first[key], key
    h1 = pd.read_csv(env["root"] / "dusss-a" / "history.csv")
    h2 = pd.read_csv(env["root"] / "dusss-b" / "history.csv")
    pd.testing.assert_frame_equal(h1.drop(columns="seconds"), h2.drop(columns="seconds"))


def test_an_interrupted_run_resumes_to_the_same_numbers_and_a_finished_one_is_reused(env, dusss_run):
    _, full = dusss_run
    train_ssmis(_cfg(env, "dusss-resume", epochs=1), progress=False)  # "interrupted" after one epoch
    resumed = train_ssmis(_cfg(env, "dusss-resume"), progress=False)
    assert resumed["epochs_run"] == full["epochs_run"]
    assert resumed["test_dice"] == full["test_dice"] and resumed["val_dice"] == full["val_dice"]

    last = env["root"] / "dusss-a" / "last.pt"
    stamp = os.stat(last).st_mtime_ns
    again = train_ssmis(_cfg(env, "dusss-a"), progress=False)
    assert again == full and os.stat(last).st_mtime_ns == stamp  # returned, not retrained


def test_resume_refuses_a_folder_of_other_settings(env, dusss_run):
    with pytest.raises(ValueError, match="other settings.*ratio"):
        train_ssmis(_cfg(env, "dusss-a", ratio=0.5), progress=False)


def test_a_run_of_another_method_revision_is_trained_afresh_not_resumed(env, monkeypatch):
    from dusss.methods.supervised import Supervised
    cfg = _cfg(env, "revision", method="supervised", vlm_checkpoint="", epochs=1)
    first = train_ssmis(cfg, progress=False)
    last = env["root"] / "revision" / "last.pt"
    stamp = os.stat(last).st_mtime_ns
    reused = train_ssmis(cfg, progress=False)  # returned as it is
    assert first["method_revision"] == reused["method_revision"] == 1 and reused["test_dice"] == first["test_dice"]
    assert os.stat(last).st_mtime_ns == stamp
    monkeypatch.setattr(Supervised, "revision", 2, raising=False)  # the method's training changed
    again = train_ssmis(cfg, progress=False)
    assert again["method_revision"] == 2 and os.stat(last).st_mtime_ns != stamp


@pytest.mark.parametrize("method", ["mt", "supervised"])
def test_baselines_share_the_loop(env, method):
    metrics = train_ssmis(_cfg(env, method, method=method, vlm_checkpoint=""), progress=False)
    history = pd.read_csv(env["root"] / method / "history.csv")
    assert 0.0 <= metrics["test_dice"] <= 1.0
    assert history["diag_text_dice"].isna().all() and (history["loss_text"] == 0).all()
    if method == "mt":
        assert history["diag_teacher_dice"].between(0, 1).all() and (history["loss_semi"] > 0).all()
    else:
        assert history["diag_teacher_dice"].isna().all() and (history["loss_semi"] == 0).all()


def test_dusss_without_a_vlm_checkpoint_says_how_to_make_one(env):
    with pytest.raises(FileNotFoundError, match="pretrain"):
        train_ssmis(_cfg(env, "no-vlm", vlm_checkpoint=str(env["root"] / "missing.pt")), progress=False)


def test_a_vlm_grounded_on_masks_unlabelled_here_is_refused(env):
    """Leakage guard: the VLM's mask supervision must come from inside this run's labelled split."""
    from dusss.ssmis import _load_guidance

    vlm_ratio = torch.load(env["vlm"], weights_only=True)["config"]["ratio"]
    cpu = torch.device("cpu")
    assert _load_guidance(_cfg(env, "g"), cpu) is not None
    with pytest.raises(ValueError, match="includes images that are unlabelled"):
        _load_guidance(_cfg(env, "g", ratio=vlm_ratio / 2), cpu)  # a smaller labelled split than the VLM's
    with pytest.raises(ValueError, match="data seed 666 labelled split.*data seed 667"):
        _load_guidance(_cfg(env, "g", seed=667), cpu)  # another seed draws another labelled subset
    assert _load_guidance(_cfg(env, "g", seed=667, data_seed=666), cpu) is not None  # same data, new training


def test_cli_evaluate_reproduces_the_test_score_of_the_best_checkpoint(env, dusss_run, capsys):
    _, metrics = dusss_run
    out = env["root"] / "eval"
    rc = cli_main(["evaluate", "--profile", "smoke", "--checkpoint", str(env["root"] / "dusss-a" / "best.pt"),
                   "--data-root", env["data"], "--split", "test", "--out", str(out)])
    assert rc == 0 and "Dice" in capsys.readouterr().out
    result = json.loads((out / "eval_test.json").read_text())
    assert result["dice"] == pytest.approx(metrics["test_dice"]) and result["miou"] == pytest.approx(metrics["test_miou"])
    assert len(pd.read_csv(out / "eval_test_per_image.csv")) == metrics["n_test"]


def test_cached_text_map_gets_the_same_geometric_transform_as_its_image(env, dusss_run):
    ds = LViTDataset(env["data"], "train", 64)
    split = TensorSplit(ds, [0, 1, 2, 3])
    x, y = split.batch(torch.arange(4))  # (4, 3, H, W), (4, 1, H, W)
    # a "map" that is a copy of each image's first channel must stay one under flip + rotation
    maps = x[:, :1].clone()
    aug = _Augmenter(JointAugment("report-safe", p_flip=1.0, p_rotate=1.0, max_angle=10.0, seed=0), "qata")
    x_a, y_a, maps_a, texts = aug(x, y, maps, list(split.texts))
    assert not torch.allclose(x_a, x)  # it did transform
    assert torch.allclose(maps_a, x_a[:, :1], atol=1e-5)
    assert set(y_a.unique().tolist()) <= {0.0, 1.0}  # masks stay binary (nearest)
    for new, old in zip(texts, split.texts):
        assert ("left" in new) == ("right" in old)  # the report was flipped too


def test_a_run_is_not_reused_after_its_vlm_was_retrained(env):
    from dusss.utils import atomic_torch_save

    vlm = env["root"] / "vlm-copy.pt"
    ckpt = torch.load(env["vlm"], map_location="cpu", weights_only=True)
    atomic_torch_save(ckpt, vlm)
    cfg = _cfg(env, "digest", epochs=1, vlm_checkpoint=str(vlm))
    first = train_ssmis(cfg, progress=False)
    ckpt["model"]["mask_bias"] = ckpt["model"]["mask_bias"] + 3.0  # a different VLM at the same path
    atomic_torch_save(ckpt, vlm)
    second = train_ssmis(cfg, progress=False)
    assert second["vlm_digest"] != first["vlm_digest"]
    assert second["diag_best"]["diag_text_dice"] != first["diag_best"]["diag_text_dice"]


def test_bf16_autocast_trains_the_unet_in_bf16(env, monkeypatch):
    # amp="bf16" on the CPU takes the path amp="auto" takes on CUDA: bf16 forward passes of the training steps
    # (those with gradients; the no-grad diagnostics and evaluation stay in float32), float32 losses
    from dusss.textseg import STUDENTS

    dtypes = []
    real_build = STUDENTS["unet"]  # the loop builds its student through this registry

    def build_and_watch(cfg):
        model = real_build(cfg)
        model.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype) if torch.is_grad_enabled() else None)
        return model

    monkeypatch.setitem(STUDENTS, "unet", build_and_watch)
    metrics = train_ssmis(_cfg(env, "mt-bf16", method="mt", vlm_checkpoint="", amp="bf16", epochs=1), progress=False)
    history = pd.read_csv(env["root"] / "mt-bf16" / "history.csv")
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert history["loss"].notna().all() and (history["loss"] > 0).all()
    assert 0.0 <= metrics["test_dice"] <= 1.0


def test_results_files_hold_paths_relative_to_the_checkout_or_to_the_runs_root(tmp_path, monkeypatch):
    from dusss.ssmis import _portable
    from dusss.utils import repo_root
    monkeypatch.setenv("DUSSS_RUNS", str(tmp_path / "other" / "runs"))  # a grid run from a frozen copy
    assert _portable(tmp_path / "other" / "runs" / "ssmis" / "a") == "runs/ssmis/a"
    assert _portable(repo_root() / "runs" / "ssmis" / "b") == "runs/ssmis/b"
    assert _portable(tmp_path / "elsewhere") == str(tmp_path / "elsewhere")
