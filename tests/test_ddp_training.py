"""Step 1 and Step 2 under DistributedDataParallel: a real 2-process gloo job on the CPU.

Two workers are started with ``torch.multiprocessing.spawn`` and join through
the environment variables torchrun sets (``torchrun --nproc_per_node 2 -m dusss
...`` runs the same code). In one job they pre-train the VLM for one epoch
(contrastive losses gathered over both ranks), then train ``mt`` and ``dusss``
for one epoch each at the smoke profile. The tests check that every run
completes, that rank 0 alone wrote one set of checkpoints, and that both ranks
ended with the same models (metrics each rank computed from its own model
agree).
"""
import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from dusss.config import make_config
from dusss.distributed import cleanup_distributed, init_distributed
from dusss.utils import load_checkpoint
from test_distributed import TORCHRUN_VARS, _free_port

WORLD = 2


def _cfgs(root):
    common = dict(data_root=str(root / "data"), num_threads=1, device="cpu")
    vlm = make_config("smoke", out_dir=str(root / "vlm"), vlm_epochs=1, **common)
    mt = make_config("smoke", method="mt", bn_batch="separate", epochs=1, out_dir=str(root / "mt"), **common)
    dusss = make_config("smoke", method="dusss", epochs=1, out_dir=str(root / "dusss"),
                        vlm_checkpoint=str(root / "vlm" / "vlm.pt"), **common)
    return vlm, mt, dusss


def _worker(rank, world, port, root):
    from pathlib import Path

    from dusss.pretrain import pretrain
    from dusss.ssmis import train_ssmis

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    root = Path(root)
    init_distributed("cpu", timeout_s=300)
    try:
        vlm_cfg, mt_cfg, dusss_cfg = _cfgs(root)
        report = {"pretrain": pretrain(vlm_cfg, progress=False), "mt": train_ssmis(mt_cfg, progress=False),
                  "dusss": train_ssmis(dusss_cfg, progress=False)}
        (root / f"report{rank}.json").write_text(json.dumps(report, default=str))
    finally:
        cleanup_distributed()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    from dusss.data import ensure_dataset

    root = tmp_path_factory.mktemp("ddp_training")
    for var in TORCHRUN_VARS:
        assert var not in os.environ, f"unset {var} before running the tests"
    ensure_dataset(_cfgs(root)[1])  # generated once here, not by two ranks at the same time
    mp.spawn(_worker, args=(WORLD, _free_port(), str(root)), nprocs=WORLD, join=True)
    reports = [json.loads((root / f"report{r}.json").read_text()) for r in range(WORLD)]
    return root, reports


def test_two_process_ssmis_completes_and_rank0_writes_one_checkpoint(job):
    root, reports = job
    for method in ("mt", "dusss"):
        out = root / method
        assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "last.pt"], method
        assert not list(out.glob(".*.tmp")), "no torn temporary files"
        last = load_checkpoint(out / "last.pt")
        assert last["finished"] and last["epoch"] == 1
        assert not any(k.startswith("module.") for k in last["student"]), "the unwrapped student is saved"
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["epochs_run"] == 1 and 0.0 <= metrics["test_dice"] <= 1.0
        # each rank reads half of the labelled and unlabelled images per epoch
        cfg = _cfgs(root)[1]
        shard = -(-metrics["n_unlabelled"] // WORLD)
        assert metrics["steps_per_epoch"] == max(-(-shard // cfg.unlabelled_bs),
                                                 -(-(-(-metrics["n_labelled"] // WORLD)) // cfg.labelled_bs))


def test_two_process_ranks_end_with_the_same_models(job):
    _, (r0, r1) = job
    for method in ("mt", "dusss"):
        # pseudo-label diagnostics are computed by each rank from its own teacher: equal teachers, equal numbers
        assert r0[method]["diag_last"] == pytest.approx(r1[method]["diag_last"], nan_ok=True), method
        assert r0[method]["val_dice"] == pytest.approx(r1[method]["val_dice"])
    for key in ("val_dice", "val_i2t_r1", "val_t2i_r1", "test_dice"):  # losses are of each rank's own batch
        assert r0["pretrain"][key] == pytest.approx(r1["pretrain"][key], rel=1e-5, abs=1e-6), key


def test_two_process_pretrain_writes_one_vlm_that_loads(job):
    from dusss.vlm import load_vlm

    root, (r0, _) = job
    assert sorted(p.name for p in (root / "vlm").glob("*.pt")) == ["last.pt", "vlm.pt"]
    vlm = load_vlm(root / "vlm" / "vlm.pt")
    assert vlm.cfg.vlm_epochs == 1
    history = (root / "vlm" / "history.csv").read_text().strip().splitlines()
    assert len(history) == 2  # header + one epoch, written once
    assert r0["pretrain"]["epochs"] == 1 and r0["pretrain"]["first_loss"] > 0
