"""The runs behind Figs. 4 and 5 (dusss.experiments.figures): which models, which VLMs, shared with the Tables grid."""
from __future__ import annotations

from pathlib import Path

from dusss.config import make_config
from dusss.experiments import figures
from dusss.experiments.figures import comparison_configs, ensure_vlms
from dusss.methods import METHODS
from dusss.runs import default_vlm_checkpoint, run_config, run_name, ssmis_dir


def test_comparison_configs_name_the_runs_of_fig4():
    cfg = make_config("smoke", dataset="qata-synth", ratio=0.25)
    runs = comparison_configs(cfg)
    assert list(runs) == ["MT"] + (["BCP"] if "bcp" in METHODS else []) + ["CLIP", "DuSSS"]
    assert runs["CLIP"].method == runs["DuSSS"].method == "dusss"
    # each guided run reads the VLM of its own switches and trains in the Tables grid's folder of that row
    assert "sss0-cmc1-imc0-tg0" in str(default_vlm_checkpoint(runs["CLIP"]))
    assert "sss1-cmc1-imc1-tg1" in str(default_vlm_checkpoint(runs["DuSSS"]))
    for label, row in (("CLIP", "clip"), ("DuSSS", "dusss")):
        assert Path(runs[label].out_dir) == ssmis_dir(runs["MT"]).parent / run_name(row, 0.25, cfg.seed)
        assert Path(runs[label].out_dir) == Path(run_config("smoke", "qata-synth", row, 0.25, cfg.seed, {}).out_dir)
    assert all(c.ratio == 0.25 and c.dataset == "qata-synth" for c in runs.values())


def test_ensure_vlms_pretrains_the_vlms_the_fig4_runs_read(monkeypatch):
    # even for a config whose own switches differ from both rows, each guided run reads the VLM pre-trained for it
    trained = []
    monkeypatch.setattr(figures, "pretrain", lambda c, progress=True: trained.append(c))
    cfg = make_config("smoke", dataset="qata-synth", ratio=0.5, use_sss=False, use_tg=False)
    paths = ensure_vlms(cfg, progress=False)
    runs = comparison_configs(cfg)
    assert list(paths) == ["DuSSS", "CLIP"] and all(c.ratio == 0.25 for c in trained)
    for label in ("DuSSS", "CLIP"):
        assert paths[label] == default_vlm_checkpoint(runs[label])
        assert any(c.use_sss == runs[label].use_sss and c.use_imc == runs[label].use_imc for c in trained)
