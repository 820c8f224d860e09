"""Step-2 methods: one class per module behind one protocol (:class:`dusss.methods.base.Method`), one registry.

Adding a method is one module here (or anywhere: a package of your own) and one
:func:`register` call; the training loop, the CLI help, the config check of
``method`` and the table rows all read :data:`METHODS`.

>>> from dusss.methods import METHODS
>>> sorted(METHODS)
['bcp', 'cct', 'clipseg', 'dusss', 'lvit', 'mcnet', 'mt', 'ssnet', 'supervised', 'ucmt', 'vilt']
"""
from __future__ import annotations

from ..config import ConfigError, register_choices
from .base import Method, Models, StepBatch, StepOutput, method_parameters, method_revision, optimizer_groups
from .bcp import BCP
from .cct import CCT
from .clipseg import CLIPSeg
from .dusss import DuSSS
from .mcnet import MCNet
from .lvit import LViT
from .mean_teacher import MeanTeacher
from .ssnet import SSNet
from .supervised import Supervised
from .ucmt import UCMT
from .vilt import ViLT

__all__ = ["METHODS", "register", "get_method", "Method", "Models", "StepBatch", "StepOutput", "method_parameters",
           "method_revision", "optimizer_groups"]

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Add ``cls`` to :data:`METHODS` under ``cls.name`` (usable as a class decorator); returns ``cls``.

    The class must carry the attributes of :class:`Method`; a name already
    taken by another class raises ``ValueError``.
    """
    missing = [a for a in ("name", "label", "summary", "uses_unlabelled", "uses_teacher", "uses_text", "distributed",
                           "step", "state_dict", "load_state_dict") if not hasattr(cls, a)]
    if missing:
        raise TypeError(f"{cls.__name__} lacks {', '.join(missing)} of the Step-2 method protocol (dusss.methods.base)")
    if METHODS.get(cls.name, cls) is not cls:
        raise ValueError(f"method name {cls.name!r} is taken by {METHODS[cls.name].__name__}")
    METHODS[cls.name] = cls
    register_choices("method", METHODS)
    return cls


def get_method(name: str) -> type[Method]:
    """The registered class called ``name`` (``ConfigError`` naming the choices otherwise)."""
    if name not in METHODS:
        raise ConfigError(f"config key 'method' = {name!r} is not a registered Step-2 method; choose one of "
                          f"{', '.join(METHODS)}")
    return METHODS[name]


for _cls in (DuSSS, MeanTeacher, Supervised, BCP, UCMT, CCT, MCNet, SSNet, CLIPSeg, ViLT, LViT):
    register(_cls)
