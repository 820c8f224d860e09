"""Multi-process training under ``torchrun``: process group, DDP, samplers, gathering, rank-0 output.

One process per device (``torchrun --nproc_per_node N -m dusss <command> ...``).
``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`init_distributed` reads them and returns a
:class:`DistInfo`. Without them every helper here is the identity of a
single-process run, so training code calls them unconditionally.

What has to be distributed, and how:

- gradients: :func:`ddp_wrap` (``DistributedDataParallel`` averages them, so
  the student's parameters are identical on every rank after each step);
- data: :func:`make_sampler` gives each rank its own shard (call
  :func:`set_sampler_epoch` every epoch so the shuffle changes);
- contrastive negatives: :func:`gather_with_grad` concatenates the embeddings of
  all ranks, with the gradient flowing back to each rank's own rows (open_clip's
  ``gather_features(..., gather_with_grad=True, local_loss=False)``). The losses
  in :mod:`dusss.losses` take ``gather=True`` and then score the **full global**
  ``(B·W, B·W)`` similarity matrix on every rank; :func:`all_gather_objects`
  gathers the reports so a same-text positive mask covers the global batch;
- the EMA teacher (Eq. 12): a local :func:`dusss.losses.ema_update` keeps the
  teachers' *parameters* in step because the students' are; BatchNorm running
  statistics are per rank, so :func:`sync_buffers` averages them after each step
  (timm's ``distribute_bn``); :func:`assert_params_in_sync` checks it;
- output: logging, progress bars and checkpoints on rank 0 only
  (:func:`quiet_non_main`, :func:`progress_disabled`, :func:`save_on_main`,
  :func:`rank_zero_only`); metrics averaged with :func:`reduce_mean`.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset, DistributedSampler, RandomSampler, Sampler, SequentialSampler

from .utils import atomic_torch_save, get_logger, resolve_device

__all__ = [
    "DistInfo", "init_distributed", "cleanup_distributed", "is_distributed", "is_main_process", "get_rank",
    "get_world_size", "barrier", "gather_with_grad", "all_gather_objects", "reduce_mean", "ddp_wrap",
    "unwrap_model", "make_sampler", "set_sampler_epoch", "sync_buffers", "assert_params_in_sync",
    "quiet_non_main", "progress_disabled", "rank_zero_only", "save_on_main",
]

log = get_logger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node, its ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part (a process group exists)."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    """Integer environment variable ``name``, with an error that names it when it is not an integer."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer; torchrun sets it, "
                         "unset it to run a single process") from None


def init_distributed(device_str: str = "auto", *, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group ``torchrun`` describes, or describe a single process when there is none.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. With ``WORLD_SIZE > 1``
    it initialises ``torch.distributed`` from the environment (``MASTER_ADDR``,
    ``MASTER_PORT``) with the ``nccl`` backend when ``device_str`` resolves to
    CUDA and ``gloo`` on the CPU; on CUDA each process uses device
    ``cuda:LOCAL_RANK`` (an explicit index in ``device_str`` is overridden, one
    process per GPU) and makes it the current device. Without those variables, or
    with ``WORLD_SIZE=1``, no process group is made and the result is rank 0 of 1
    on ``resolve_device(device_str)``. Calling it again in a process that has
    already joined returns the same description. ``timeout_s`` bounds every
    collective (a crashed rank then fails the others instead of hanging them).
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank if world_size > 1 else 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world_size} are inconsistent; launch with torchrun, "
                         "which sets both")
    device = resolve_device(device_str)
    if device.type == "cuda":
        if "LOCAL_RANK" in os.environ or world_size > 1:
            if local_rank >= torch.cuda.device_count():
                raise RuntimeError(
                    f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} CUDA device(s); "
                    "start at most one process per GPU (torchrun --nproc_per_node <number of GPUs>)")
            if device.index is not None and device.index != local_rank:
                log.warning("device %s ignored under torchrun: rank %d uses cuda:%d (LOCAL_RANK)",
                            device_str, rank, local_rank)
            device = torch.device("cuda", local_rank)
        if device.index is not None:
            torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(var):
                raise RuntimeError(f"WORLD_SIZE={world_size} but {var} is not set; launch with torchrun "
                                   "(it sets MASTER_ADDR and MASTER_PORT) or set both yourself")
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        log.info("rank %d/%d joined the %s process group on %s", rank, world_size, backend, device)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, is_main=rank == 0)


def cleanup_distributed() -> None:
    """Leave the process group if this process joined one (call at the end of a ``torchrun`` job)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's global rank: from the process group, else ``RANK`` (0 when unset)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def get_world_size() -> int:
    """Number of processes in the process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0, and in a single-process run: the process that logs and writes files."""
    return get_rank() == 0


def barrier() -> None:
    """Wait until every rank arrives here; a no-op without a process group."""
    if is_distributed():
        dist.barrier()


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` (B, ...) of every rank along dim 0 -> (W·B, ...), differentiable.

    Rank ``r``'s rows sit at ``[r·B, (r+1)·B)``. The backward pass sums, over all
    ranks, the gradients that reach each rank's rows and returns them to that rank
    (``torch.distributed.nn.functional.all_gather``, as open_clip's
    ``gather_with_grad``). When every rank computes the same loss on the gathered
    tensor, a rank's own rows therefore receive ``W`` times the single-process
    gradient, which DDP's averaging over ``W`` ranks turns back into exactly the
    single-process parameter gradient. Every rank must pass the same shape
    (equal shards from :func:`make_sampler`, ``drop_last=True`` when the last
    batch could be short). Identity without a process group.
    """
    if not is_distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)  # (W·B, ...)


def all_gather_objects(items: Sequence[Any]) -> list[Any]:
    """Concatenate a picklable list of every rank in rank order (e.g. the reports of the global batch).

    The global same-text positive mask of a gathered contrastive loss is built
    from these, so it lines up with :func:`gather_with_grad`'s rows. Returns a
    plain copy of ``items`` without a process group.
    """
    if not is_distributed():
        return list(items)
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, list(items))
    return [item for part in out for item in part]


def reduce_mean(tensor: Tensor) -> Tensor:
    """Mean of ``tensor`` over ranks (a new tensor, no gradient): for logging metrics of the global batch.

    Each rank's value has equal weight, which is the global mean when the ranks
    see equal shards. A detached copy without a process group.
    """
    out = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out = out / dist.get_world_size()
    return out


def ddp_wrap(model: nn.Module, info: DistInfo, **ddp_kwargs: Any) -> nn.Module:
    """``DistributedDataParallel(model)`` when ``info`` is distributed, else ``model`` itself.

    The model must already be on ``info.device``. On CUDA the wrapper is bound
    to that one device (``device_ids``); on the CPU it is not. Extra keyword
    arguments go to DDP (e.g. ``find_unused_parameters=True`` when a loss term is
    switched off and some parameters get no gradient). Use :func:`unwrap_model`
    for ``state_dict``, EMA and evaluation.
    """
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if info.device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [info.device.index])
        ddp_kwargs.setdefault("output_device", info.device.index)
    return DistributedDataParallel(model, **ddp_kwargs)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or ``torch.compile``'s), or ``model`` itself."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def make_sampler(dataset: Dataset, info: DistInfo, *, shuffle: bool, seed: int, drop_last: bool = False) -> Sampler:
    """Sampler for ``DataLoader(dataset, sampler=...)``: this rank's shard, or the whole set.

    Distributed: a ``DistributedSampler`` whose shards are disjoint and of equal
    length (padded by repeating items unless ``drop_last``), shuffled with
    ``seed + epoch``. Single process: a ``RandomSampler`` drawing from its own
    generator seeded with ``seed`` (``shuffle=True``) or a ``SequentialSampler``.
    Call :func:`set_sampler_epoch` at the start of every epoch in both cases.
    """
    if info.distributed:
        return DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=shuffle,
                                  seed=seed, drop_last=drop_last)
    if shuffle:
        return RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    return SequentialSampler(dataset)


def set_sampler_epoch(sampler: Sampler, epoch: int) -> None:
    """Tell a ``DistributedSampler`` which epoch starts (new shuffle); nothing for other samplers."""
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


@torch.no_grad()
def sync_buffers(model: nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks, in place.

    DDP keeps parameters identical but each rank's BatchNorm updates its running
    statistics from its own batch (and an EMA teacher run in train mode updates
    its own). Averaging them after each step (timm's ``distribute_bn``) keeps the
    student and the EMA teacher identical on every rank, so the checkpoint rank 0
    writes is the model all ranks trained. Integer buffers (``num_batches_tracked``)
    are broadcast from rank 0. A no-op without a process group.
    """
    if not is_distributed():
        return
    world = dist.get_world_size()
    for buf in unwrap_model(model).buffers():
        if buf.dtype.is_floating_point:
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(world)
        else:
            dist.broadcast(buf, src=0)


@torch.no_grad()
def assert_params_in_sync(model: nn.Module, *, buffers: bool = True, atol: float = 0.0) -> None:
    """Raise ``AssertionError`` on every rank when any rank's parameters (or buffers) differ from rank 0's.

    A collective: every rank must call it. Each tensor is broadcast from rank 0
    and compared with the local one up to ``atol``; the verdict is then agreed by
    all ranks, so all raise together (a rank raising alone would leave the others
    waiting in the next collective). The message on a differing rank names the
    first tensor that differs. A no-op without a process group.
    """
    if not is_distributed():
        return
    module = unwrap_model(model)
    named = list(module.named_parameters())
    if buffers:
        named += list(module.named_buffers())
    bad: list[str] = []
    for name, tensor in named:
        reference = tensor.detach().clone()
        dist.broadcast(reference, src=0)
        diff = (tensor.detach().double() - reference.double()).abs().max().item() if tensor.numel() else 0.0
        if diff > atol:
            bad.append(f"{name} on rank {dist.get_rank()} differs from rank 0 by {diff:.3g} (> {atol})")
    flag = torch.tensor([float(bool(bad))], device=named[0][1].device if named else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() > 0:
        where = bad[0] if bad else f"rank {dist.get_rank()} matches rank 0 but another rank does not"
        raise AssertionError(f"{where}; ranks are out of step: wrap the student with ddp_wrap and call "
                             "sync_buffers after the EMA update")


@contextlib.contextmanager
def quiet_non_main(logger_name: str = "dusss", level: int = logging.WARNING) -> Iterator[None]:
    """Within the block, the ``dusss`` logger of ranks other than 0 shows only warnings and errors.

    Rank 0 logs as usual, so a ``torchrun`` job prints each INFO line once
    instead of once per process. The previous level is restored afterwards.
    """
    logger = logging.getLogger(logger_name)
    previous = logger.level
    if not is_main_process():
        logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def progress_disabled(progress: bool = True) -> bool:
    """``disable=`` for a ``tqdm.auto`` bar: off when ``progress`` is False or on ranks other than 0."""
    return not (progress and is_main_process())


def rank_zero_only(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: ``fn`` runs on rank 0 (and in single-process runs) and returns None elsewhere."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if is_main_process() else None

    return wrapper


def save_on_main(obj: Any, path: str | os.PathLike) -> Path | None:
    """Write ``obj`` with :func:`dusss.utils.atomic_torch_save` on rank 0 only, then wait for it on all ranks.

    Returns the path on rank 0 and None elsewhere. The barrier afterwards means
    every rank may read the file once this returns (e.g. to resume); every rank
    must therefore call it.
    """
    written = atomic_torch_save(obj, path) if is_main_process() else None
    barrier()
    return written
