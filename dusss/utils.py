"""Run plumbing shared by every command: seeding, devices, atomic writes, logging."""
from __future__ import annotations

import json
import logging
import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ConfigError
from .errors import CheckpointError, MissingCheckpointError

__all__ = [
    "seed_everything", "resolve_device", "amp_enabled", "autocast", "to_float32", "atomic_write_text", "atomic_write_json",
    "atomic_torch_save", "load_checkpoint", "get_logger", "repo_root",
]


def seed_everything(seed: int, *, deterministic: bool = True) -> None:
    """Seed python, numpy and torch (all devices); called at the top of every run.

    With ``deterministic`` the CPU path gives bit-identical numbers for the same
    seed and settings; on CUDA, cuDNN autotuning is disabled for the same reason.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> the first CUDA device if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was requested but CUDA is not available; use device=cpu or auto")
    return dev


def amp_enabled(amp: str, device: torch.device | str) -> bool:
    """Whether ``Config.amp`` turns bfloat16 autocast on for ``device``.

    ``"auto"``: on for CUDA devices that support bfloat16, off on the CPU (where
    bf16 is emulated, and slower, unless the CPU has AVX-512 BF16 / AMX: docs/speed.md);
    ``"bf16"``: always; ``"off"``: never.
    """
    device = torch.device(device)
    if amp == "off":
        return False
    if amp == "bf16":
        return True
    if amp != "auto":
        raise ValueError(f"amp = {amp!r}; use 'auto', 'bf16' or 'off'")
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast(amp: str, device: torch.device | str) -> torch.autocast:
    """The ``torch.autocast`` context of a training forward pass under ``Config.amp`` (bfloat16, no loss scaling)."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp_enabled(amp, device))


def to_float32(tree: Any) -> Any:
    """``tree`` (tensors in tuples, lists, dicts, named tuples) with every floating tensor cast to float32."""
    from torch.utils import _pytree

    return _pytree.tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, tree)


def _atomic_replace(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results and checkpoints are ordinary files
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` so that a crash leaves either the old file or the new one."""
    return _atomic_replace(Path(path), lambda fh: fh.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON with sorted keys."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through a temporary file and ``os.replace``: never a torn checkpoint."""
    return _atomic_replace(Path(path), lambda fh: torch.save(obj, fh))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint written by :func:`atomic_torch_save` with ``weights_only=True``.

    A missing path raises :class:`dusss.errors.MissingCheckpointError`, a file
    that is not a readable torch checkpoint (truncated, another format, objects
    a weights-only load refuses) :class:`dusss.errors.CheckpointError`; both
    name the file.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingCheckpointError(f"checkpoint {path} does not exist; train one first or fix the path")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:  # what torch.load raises for a foreign or torn file
        why = str(exc).strip().split("\n")[0]
        raise CheckpointError(f"cannot read checkpoint {path} ({type(exc).__name__}: {why}); "
                              f"point to a .pt file written by dusss, or train it again") from exc


def get_logger(name: str = "dusss") -> logging.Logger:
    """The package logger; a handler is attached once so notebooks show INFO lines."""
    logger = logging.getLogger(name if name.startswith("dusss") else f"dusss.{name}")
    root = logging.getLogger("dusss")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    return logger


def repo_root() -> Path:
    """The project checkout (parent of the package folder)."""
    return Path(__file__).resolve().parent.parent
