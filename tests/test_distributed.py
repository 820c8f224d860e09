"""dusss.distributed: a real 2-process gloo job on the CPU, compared with the single-process run.

The two workers are started with ``torch.multiprocessing.spawn`` (no torchrun,
so the test is self-contained) and join through the same environment variables
torchrun sets. One spawn runs every distributed check and each rank saves a
report; the tests below assert on those reports:

1. gathered DCL (Eqs. 8-9, SSS on), ``L_tg`` (Eq. 11) and ``SSSInfoNCE`` over
   2 ranks x 4 items give the loss and (after DDP's averaging) the parameter
   gradients of the single-process loss over the 8 items, whose CMC term is
   checked against a plain-loop hand computation; a same-report positive pair
   that spans the two ranks is honoured;
2. a tiny DDP student + EMA teacher (with BatchNorm) trained 3 steps stays in
   sync across ranks, and without ``sync_buffers`` the teacher does not;
3. only rank 0 writes a checkpoint, logs INFO lines and shows progress bars.
"""
import copy
import logging
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, TensorDataset

from dusss.distributed import (
    all_gather_objects, assert_params_in_sync, cleanup_distributed, ddp_wrap, gather_with_grad, init_distributed,
    is_main_process, make_sampler, progress_disabled, quiet_non_main, rank_zero_only, reduce_mean, save_on_main,
    set_sampler_epoch, sync_buffers, unwrap_model,
)
from dusss.losses import DualContrastiveLoss, Embedding, SSSInfoNCE, TextGuidedLoss, ema_update
from dusss.utils import load_checkpoint
from test_losses import _hand_nce_rows, _hand_sim_hat

WORLD, B_LOCAL = 2, 4
B = WORLD * B_LOCAL
D, K, RAW = 6, 4, 5
# items 0/3 (same rank) and 1/5 (different ranks) share a report
TEXTS = ["left", "both", "right", "left", "upper", "both", "lower", "middle"]
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _same_text(texts):
    code = torch.tensor([sorted(set(texts)).index(t) for t in texts])
    return code[:, None] == code[None, :]  # (N, N)


def _contrastive_inputs():
    """Raw features of the 8 items (two image views, two text views, pooled visual)."""
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(B, RAW, generator=g, dtype=torch.float64) for k in ("img1", "img2", "txt1", "txt2", "vis")}


class _TwoTowers(nn.Module):
    """A linear image tower and a linear text tower; one forward, so DDP sees every parameter used."""

    def __init__(self):
        super().__init__()
        self.img, self.txt = nn.Linear(RAW, D + 2 * K), nn.Linear(RAW, D + 2 * K)

    def forward(self, data):
        return {k: (self.txt if k.startswith("txt") else self.img)(v) for k, v in data.items()}  # (N, D + 2K) each


def _encoders():
    torch.manual_seed(1)
    return _TwoTowers().double()


def _embed(h):
    return Embedding(F.normalize(h[:, :D], dim=-1), h[:, D:D + K], h[:, D + K:].exp())  # s (N, D), mu/sigma (N, K)


def _contrastive_step(enc, losses, data, mask):
    """DCL + L_tg on ``data`` through ``enc``; returns the terms, the loss, L_tg and the first image embedding."""
    dcl, tg = losses
    h = enc(data)
    i1 = _embed(h["img1"])
    i1.s.retain_grad()
    out = dcl(i1, _embed(h["txt1"]), _embed(h["img2"]), _embed(h["txt2"]), positive_mask=mask)
    tg_loss = tg(h["vis"][:, :D], h["txt1"][:, :D], positive_mask=mask)
    return out, out["loss"] + tg_loss, tg_loss, i1


def _tiny_net():
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 1))


def _tiny_data():
    g = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(16, 1, 6, 6, generator=g), torch.rand(16, 1, 6, 6, generator=g))


# ---------------------------------------------------------------- worker (one per rank)
def _check_contrastive(info):
    sl = slice(info.rank * B_LOCAL, (info.rank + 1) * B_LOCAL)
    data = {k: v[sl] for k, v in _contrastive_inputs().items()}
    enc = ddp_wrap(_encoders(), info)
    losses = (DualContrastiveLoss(gather=True).double(), TextGuidedLoss(gather=True).double())
    mask = _same_text(all_gather_objects(TEXTS[sl]))  # global (8, 8)
    out, total, tg_loss, i1 = _contrastive_step(enc, losses, data, mask)
    total.backward()
    with torch.no_grad():
        h = unwrap_model(enc)(data)
        i1_again, t1 = _embed(h["img1"]), _embed(h["txt1"])
        nce = SSSInfoNCE(gather=True)(i1_again, t1, losses[0].temperature(), positive_mask=mask)
    try:
        losses[0](i1_again, t1, i1_again, t1, positive_mask=_same_text(TEXTS[sl]))
        local_mask_error = ""
    except ValueError as err:
        local_mask_error = str(err)
    return {
        "terms": {k: v.item() for k, v in out.items()}, "tg": tg_loss.item(), "total": total.item(), "nce": nce.item(),
        "emb_grad": i1.s.grad.clone(), "gathered_rows": gather_with_grad(data["img1"]).clone(),
        "param_grads": {n: p.grad.clone() for n, p in unwrap_model(enc).named_parameters()},
        "tau_grads": [m.temperature.log_logit_scale.grad.clone() for m in losses],
        "local_mask_error": local_mask_error,
    }


def _check_training(info, out_dir):
    student = _tiny_net()
    teacher = copy.deepcopy(student).requires_grad_(False)
    unsynced = copy.deepcopy(student).requires_grad_(False)  # the control: EMA without sync_buffers
    initial = copy.deepcopy(student.state_dict())
    student = ddp_wrap(student, info)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    sampler = make_sampler(_tiny_data(), info, shuffle=True, seed=0)
    set_sampler_epoch(sampler, 0)
    loader = DataLoader(_tiny_data(), batch_size=2, sampler=sampler)
    seen, local_losses, mean_losses = list(sampler), [], []
    for step, (x, y) in zip(range(3), loader):
        with torch.no_grad():
            target_t = teacher(x)  # teacher in train mode: batch-stat BN, updates its own running stats
            unsynced(x)
        pred = student(x)
        loss = F.mse_loss(pred, y) + 0.5 * F.mse_loss(pred, target_t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update(teacher, unwrap_model(student), 0.99, step)
        ema_update(unsynced, unwrap_model(student), 0.99, step)
        sync_buffers(student)
        sync_buffers(teacher)
        local_losses.append(loss.item())
        mean_losses.append(reduce_mean(loss).item())
    assert_params_in_sync(student)
    assert_params_in_sync(teacher)
    try:
        assert_params_in_sync(unsynced)
        unsynced_error = ""
    except AssertionError as err:
        unsynced_error = str(err)

    with quiet_non_main():
        logs_info = logging.getLogger("dusss.train").isEnabledFor(logging.INFO)
    state = {"rank": info.rank, "student": unwrap_model(student).state_dict()}
    shared = save_on_main(state, out_dir / "ckpt" / "student.pt")
    own = save_on_main(state, out_dir / "ckpt" / f"from_rank{info.rank}.pt")
    loaded = load_checkpoint(out_dir / "ckpt" / "student.pt")  # readable by every rank after the barrier
    return {
        "seen": seen, "local_losses": local_losses, "mean_losses": mean_losses, "unsynced_error": unsynced_error,
        "student": {k: v.clone() for k, v in unwrap_model(student).state_dict().items()},
        "teacher": {k: v.clone() for k, v in teacher.state_dict().items()}, "initial": initial,
        "saved": [shared is not None, own is not None], "loaded_rank": loaded["rank"], "logs_info": logs_info,
        "progress_disabled": progress_disabled(), "rank_zero_value": rank_zero_only(lambda: "written")(),
        "is_main": is_main_process(),
    }


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from pathlib import Path

    out_dir = Path(out_dir)
    info = init_distributed("cpu", timeout_s=60)
    try:
        report = {"info": (info.rank, info.world_size, info.local_rank, str(info.device), info.is_main)}
        report.update(_check_contrastive(info))
        report.update(_check_training(info, out_dir))
        (out_dir / "reports").mkdir(exist_ok=True)
        torch.save(report, out_dir / "reports" / f"rank{rank}.pt")
    finally:
        cleanup_distributed()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=True)
    reports = [torch.load(out / "reports" / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return out, reports


# ---------------------------------------------------------------- (1) gathered losses
def test_gathered_losses_equal_single_process_loss_and_gradients(job):
    _, reports = job
    assert [r["info"] for r in reports] == [(0, 2, 0, "cpu", True), (1, 2, 1, "cpu", False)]
    data = _contrastive_inputs()
    torch.testing.assert_close(reports[0]["gathered_rows"], data["img1"], rtol=0, atol=0)  # rank order
    enc = _encoders()
    losses = (DualContrastiveLoss().double(), TextGuidedLoss().double())
    mask = _same_text(TEXTS)
    assert mask[1, 5] and mask[0, 3] and mask.sum() == B + 4  # a positive pair across the two ranks
    ref, total, tg_loss, i1 = _contrastive_step(enc, losses, data, mask)
    total.backward()
    # hand check of the CMC term over all 8 items (plain loops, multi-positive InfoNCE)
    with torch.no_grad():
        h = enc(data)
        x, y = _embed(h["img1"]), _embed(h["txt1"])
        logits = _hand_sim_hat(x, y) * losses[0].temperature().item()
        cmc = 0.5 * (_hand_nce_rows(logits, mask.numpy()) + _hand_nce_rows(logits.T, mask.numpy().T))
        nce = SSSInfoNCE()(x, y, losses[0].temperature(), positive_mask=mask).item()
    assert ref["cmc"].item() == pytest.approx(cmc, rel=1e-9)
    for r, rep in enumerate(reports):
        for key in ("loss", "cmc", "imc", "imc_image", "imc_text"):
            assert rep["terms"][key] == pytest.approx(ref[key].item(), rel=1e-10), (r, key)
        assert rep["terms"]["cmc"] == pytest.approx(cmc, rel=1e-9)
        assert rep["tg"] == pytest.approx(tg_loss.item(), rel=1e-10)
        assert rep["total"] == pytest.approx(total.item(), rel=1e-10)
        assert rep["nce"] == pytest.approx(nce, rel=1e-10)
        # DDP-averaged parameter gradients are the single-process ones
        for name, p in enc.named_parameters():
            torch.testing.assert_close(rep["param_grads"][name], p.grad, rtol=1e-9, atol=1e-12)
        for got, m in zip(rep["tau_grads"], losses):
            torch.testing.assert_close(got, m.temperature.log_logit_scale.grad.double(), rtol=1e-9, atol=1e-12)
        # each rank's own rows receive W times the single-process gradient (summed over ranks' identical losses)
        local = i1.s.grad[r * B_LOCAL:(r + 1) * B_LOCAL]
        torch.testing.assert_close(rep["emb_grad"] / WORLD, local, rtol=1e-9, atol=1e-12)
        assert "global batch of 8 items (4 on this rank)" in rep["local_mask_error"]
    # the gathered loss differs from a loss over each rank's 4 items alone (the gathering does something)
    local_only = DualContrastiveLoss().double()
    with torch.no_grad():
        h = enc({k: v[:B_LOCAL] for k, v in data.items()})
        alone = local_only(*(_embed(h[k]) for k in ("img1", "txt1", "img2", "txt2")),
                           positive_mask=mask[:B_LOCAL, :B_LOCAL])["loss"].item()
    assert abs(alone - reports[0]["terms"]["loss"]) > 1e-3


# ---------------------------------------------------------------- (2) DDP + EMA teacher in sync
def test_ddp_student_and_ema_teacher_stay_in_sync(job):
    _, (r0, r1) = job
    assert len(r0["seen"]) == len(r1["seen"]) == 8 and set(r0["seen"]).isdisjoint(r1["seen"])  # disjoint shards
    for name in r0["student"]:
        torch.testing.assert_close(r0["student"][name], r1["student"][name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(r0["teacher"][name], r1["teacher"][name], rtol=0, atol=0, msg=name)
    moved = max((r0["student"][n].float() - r0["initial"][n].float()).abs().max().item() for n in r0["initial"])
    assert moved > 1e-3  # it did train
    assert r0["local_losses"] != r1["local_losses"]  # different shards, different local losses
    np.testing.assert_allclose(r0["mean_losses"], np.mean([r0["local_losses"], r1["local_losses"]], axis=0), rtol=1e-6)
    assert r0["mean_losses"] == r1["mean_losses"]
    # without sync_buffers the teachers' BatchNorm statistics drift apart, and the check says so
    assert "another rank does not" in r0["unsynced_error"]
    assert "running_" in r1["unsynced_error"] and "on rank 1 differs" in r1["unsynced_error"]


# ---------------------------------------------------------------- (3) rank-0 output
def test_only_rank_zero_writes_logs_and_shows_progress(job):
    out, (r0, r1) = job
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["from_rank0.pt", "student.pt"]
    ckpt = load_checkpoint(out / "ckpt" / "student.pt")
    assert ckpt["rank"] == 0 and r0["loaded_rank"] == r1["loaded_rank"] == 0
    for name, value in ckpt["student"].items():
        torch.testing.assert_close(value, r1["student"][name], rtol=0, atol=0)
    assert r0["saved"] == [True, True] and r1["saved"] == [False, False]
    assert (r0["logs_info"], r1["logs_info"]) == (True, False)
    assert (r0["progress_disabled"], r1["progress_disabled"]) == (False, True)
    assert (r0["rank_zero_value"], r1["rank_zero_value"]) == ("written", None)
    assert (r0["is_main"], r1["is_main"]) == (True, False)


# ---------------------------------------------------------------- single process
def test_single_process_is_the_identity(tmp_path, monkeypatch):
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    assert not torch.distributed.is_initialized()
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x and all_gather_objects(("a", "b")) == ["a", "b"]
    torch.testing.assert_close(reduce_mean(x), x)
    net = _tiny_net()
    assert ddp_wrap(net, info) is net and unwrap_model(net) is net
    ds = _tiny_data()
    first = list(make_sampler(ds, info, shuffle=True, seed=4))
    assert isinstance(make_sampler(ds, info, shuffle=True, seed=4), RandomSampler)
    assert first == list(make_sampler(ds, info, shuffle=True, seed=4)) and sorted(first) == list(range(16))
    assert first != list(range(16))
    assert isinstance(make_sampler(ds, info, shuffle=False, seed=4), SequentialSampler)
    assert save_on_main({"w": x}, tmp_path / "c.pt") == tmp_path / "c.pt"
    torch.testing.assert_close(load_checkpoint(tmp_path / "c.pt")["w"], x)
    data = {k: v[:B_LOCAL] for k, v in _contrastive_inputs().items()}
    enc = _encoders()
    h = enc(data)
    embs = [_embed(h[k]) for k in ("img1", "txt1", "img2", "txt2")]
    plain, gathered = DualContrastiveLoss().double()(*embs), DualContrastiveLoss(gather=True).double()(*embs)
    assert gathered["loss"].item() == plain["loss"].item()
    assert_params_in_sync(net)  # no process group: nothing to compare


def test_init_distributed_rejects_bad_environments(monkeypatch):
    for var in TORCHRUN_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        init_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="inconsistent"):
        init_distributed("cpu")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RuntimeError, match="MASTER_ADDR is not set"):
        init_distributed("cpu")
    assert not torch.distributed.is_initialized()
