"""Table 1's CLIP and ViLT rows (dusss.textseg, dusss.methods.clipseg / vilt): segmenters that read each image's report.

Their defining piece first: the report conditions the prediction, and evaluation hands each image its own report.
Then each method trains for real through :func:`dusss.ssmis.train_ssmis` on smoke data (32 px) and its checkpoint
is rebuilt by :func:`dusss.evaluate.load_student` and scored again.
"""
import pandas as pd
import pytest
import torch

from conftest import SMOKE_REPORTS, check_text_conditions
from dusss.config import ConfigError, make_config
from dusss.evaluate import evaluate_model
from dusss.experiments.grid import GRIDS
from dusss.methods import METHODS, Models, StepBatch
from dusss.runs import ROWS, TABLE1_ROWS, needs_vlm, run_name
from dusss.textseg import (CLIPSegStudent, ViLTStudent, build_student, extract_layers, needs_text, paper_size_config)
from dusss.unet import UNet, count_parameters

SIZE = 32
KINDS = {"clipseg": CLIPSegStudent, "vilt": ViLTStudent}


def _cfg(method, **kw):
    return make_config("smoke", image_size=SIZE, method=method, **kw)


def _model(kind, seed=0):
    torch.manual_seed(seed)
    return build_student(_cfg(kind), kind).eval()


def test_methods_rows_and_configs():
    for kind, cls in KINDS.items():
        method = METHODS[kind]
        assert method.student == kind and not method.uses_unlabelled and not method.uses_teacher
        assert not method.uses_text and not needs_vlm(kind)  # the student reads the reports; no Step-1 VLM
        assert isinstance(build_student(_cfg(kind), kind), cls)
        assert ROWS[kind].ratio == 1.0 and ROWS[kind].method == kind and kind in TABLE1_ROWS
        assert run_name(kind, 0.25, 666) == f"{kind}-r1-s666" and (kind, 1.0) in GRIDS["table1"]
    assert {ROWS["clipseg"].paper1, ROWS["vilt"].paper1} == {"CLIP", "ViLT"}
    assert isinstance(build_student(_cfg("supervised")), UNet) and not needs_text(build_student(_cfg("supervised")))
    assert extract_layers(12) == [3, 6, 9] and extract_layers(1) == [0]  # CLIPSeg's layers at ViT-B depth
    with pytest.raises(ConfigError, match="clipseg_patch.*= 7.*image_size = 32"):
        build_student(_cfg("clipseg", clipseg_patch=7), "clipseg")
    with pytest.raises(ConfigError, match="textseg_width"):
        make_config("smoke", textseg_width=30, textseg_heads=4)
    with pytest.raises(ConfigError, match="'transformer'"):
        build_student(_cfg("clipseg"), "transformer")


def test_paper_size_models_build_at_224():
    counts = {}
    for kind in KINDS:
        cfg = paper_size_config(kind)
        assert (cfg.image_size, cfg.textseg_width, cfg.textseg_depth, cfg.textseg_heads) == (224, 768, 12, 12)
        model = build_student(cfg, kind)
        counts[kind] = count_parameters(model) / 1e6
        del model
    assert (paper_size_config("clipseg").clipseg_patch, paper_size_config("vilt").vilt_patch) == (16, 32)
    # CLIPSeg: CLIP ViT-B/16 image tower + rd64 decoder + the text projection = the paper's 87.00 M to 0.1 %
    assert counts["clipseg"] == pytest.approx(87.0, rel=2e-3)
    # ViLT-B/32: without BERT's 30,522 x 768 word-embedding table (23.4 M) within 1 % of the paper's 87.4 M
    assert counts["vilt"] - 30522 * 768 / 1e6 == pytest.approx(87.4, rel=1e-2)


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_report_conditions_the_prediction(kind):
    model = _model(kind)
    x = check_text_conditions(model, SIZE)
    with pytest.raises(ValueError, match="one report per image.*1 for 2 images"):
        model(x, SMOKE_REPORTS[:1])
    with pytest.raises(ValueError, match="got none"):
        model(x, None)


@pytest.mark.parametrize("kind", list(KINDS))
def test_evaluation_reads_each_images_own_report(kind):
    model = _model(kind)
    g = torch.Generator().manual_seed(1)
    reports = [SMOKE_REPORTS[i % 2] for i in range(5)]
    items = [{"image": torch.rand(3, SIZE, SIZE, generator=g), "mask": (torch.rand(1, SIZE, SIZE, generator=g) > 0.7)
              .float(), "text": t, "name": f"im{i}"} for i, t in enumerate(reports)]
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.extend(args[1]))
    x = torch.stack([it["image"] for it in items])
    with torch.no_grad():
        own, other = torch.sigmoid(model(x, reports)), torch.sigmoid(model(x, [SMOKE_REPORTS[(i + 1) % 2] for i in range(5)]))
    threshold = float(own.median())  # a threshold that splits the random model's map, so the counts tell reports apart
    seen.clear()
    _, table = evaluate_model(model, items, threshold=threshold, batch_size=2)
    assert seen == reports  # every image reached the model with its own report, in order, over three batches
    assert table["pred_pixels"].tolist() == (own > threshold).flatten(1).sum(1).tolist()
    assert table["pred_pixels"].tolist() != (other > threshold).flatten(1).sum(1).tolist()


@pytest.mark.parametrize("kind", list(KINDS))
def test_step_trains_on_the_labelled_reports(kind):
    model = _model(kind).train()
    method = METHODS[kind](_cfg(kind))
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(2, 3, SIZE, SIZE, generator=g), (torch.rand(2, 1, SIZE, SIZE, generator=g) > 0.8).float()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(8):
        out = method.step(Models(model, model, None), StepBatch(x, y, None, None, step, 8, step / 8, SMOKE_REPORTS))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] and out.weight == 0.0 and torch.equal(out.loss, out.sup)
    with pytest.raises(ValueError, match="texts_l"):
        method.step(Models(model, model, None), StepBatch(x, y, None, None, 0, 8, 0.0))


# ------------------------------------------------------------------------------------------------------ the real loop
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("text-data") / "qata-synth")


@pytest.mark.parametrize("kind", list(KINDS))
def test_method_trains_in_the_loop_and_its_checkpoint_is_rebuilt(kind, data_root, tmp_path):
    from dusss.evaluate import evaluate_checkpoint, load_student
    from dusss.ssmis import train_ssmis

    cfg = make_config("smoke", method=kind, ratio=1.0, image_size=SIZE, epochs=3, num_threads=1,
                      lr_schedule="constant", data_root=data_root, out_dir=str(tmp_path))
    metrics = train_ssmis(cfg, progress=False)
    history = pd.read_csv(tmp_path / "history.csv")
    assert metrics["method"] == kind and metrics["epochs_run"] == 3 and 0.0 <= metrics["test_dice"] <= 1.0
    assert metrics["n_labelled"] == cfg.synth_train and history["loss"].iloc[-1] < history["loss"].iloc[0]
    model, saved, ckpt = load_student(tmp_path / "best.pt")
    assert isinstance(model, KINDS[kind]) and saved == cfg and not model.training
    assert not any("backbone" in k or "text_model" in k for k in ckpt["student"])  # the frozen encoder is not saved
    with torch.no_grad():
        assert model(torch.rand(2, 3, SIZE, SIZE), SMOKE_REPORTS).shape == (2, 1, SIZE, SIZE)
    again = evaluate_checkpoint(tmp_path / "best.pt", split="test", device="cpu", out_dir=tmp_path / "eval")
    assert again["dice"] == pytest.approx(metrics["test_dice"], abs=1e-6) and again["n"] == metrics["n_test"]
