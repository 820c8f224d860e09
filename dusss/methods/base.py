"""The Step-2 method protocol: what the training loop hands a method each step, and what it gets back.

The loop (:func:`dusss.ssmis.train_ssmis`) owns everything every method
shares: data streams and their augmentation, the student (the U-Net, or the
architecture a method names in ``student``) and its
optimiser and learning-rate schedule, the EMA teacher (Eq. 12) for methods that
declare one, the frozen VLM's text-guided logits for methods that read text,
validation, pseudo-label diagnostics, checkpoints, resume and early stopping.
A method owns only its loss: :meth:`Method.step` receives a :class:`StepBatch`
and the :class:`Models` and returns a :class:`StepOutput`; the loop then takes
the optimiser step and the EMA update. It never branches on a method's name:
what a method needs is read from its class attributes.

A method that trains modules of its own beside the student through the same
loss (CCT's auxiliary decoders, MC-Net's extra decoders, SS-Net's heads) may
define the one optional hook ``parameters()``; :func:`method_parameters` reads
it and the loop puts those parameters in its optimiser as a second parameter
group (same learning rate and schedule; the optimiser's state is saved with
the loop's), while the modules' weights travel in the method's
:meth:`Method.state_dict`. A method whose extra network has a loss of its own
can instead hold its own optimiser and step it inside :meth:`Method.step`
(UCMT's second student).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable, Iterable
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..config import Config

__all__ = ["StepBatch", "StepOutput", "Models", "Method", "method_parameters", "optimizer_groups", "build_owned",
           "bn_batches", "method_revision"]


@dataclass
class StepBatch:
    """One training step's inputs, already augmented and on the training device.

    ``x_l`` (Bl, 3, H, W) labelled images in [0, 1], ``y_l`` (Bl, 1, H, W) their
    masks; ``x_u`` (Bu, 3, H, W) unlabelled images (None for methods without
    ``uses_unlabelled``); ``text_logits`` (Bu, 1, H, W) the frozen VLM's
    ``z_text`` of each unlabelled image for its own report (Eq. 10; None unless
    ``uses_text``). ``step`` counts optimiser steps taken before this one,
    ``total_steps`` is the run's budget and ``epoch`` = ``step /
    steps_per_epoch`` as a float (ramp-ups are written in epochs).
    ``texts_l`` the reports of the labelled images, rewritten for their
    augmentation (None unless the student reads text: a method whose
    ``student`` is text-conditioned, :mod:`dusss.textseg`). For such a student
    and a method with ``uses_unlabelled``, also ``texts_u`` the unlabelled
    images' reports rewritten alike, ``idx_u`` (Bu,) each unlabelled image's
    position in the unlabelled split (a stable identity across epochs) and
    ``aug_u`` the augmentation parameter dict each was drawn with
    (:func:`dusss.data.augment.apply_params_batch` reads them); None otherwise.
    """

    x_l: Tensor
    y_l: Tensor
    x_u: Tensor | None
    text_logits: Tensor | None
    step: int
    total_steps: int
    epoch: float
    texts_l: list[str] | None = None
    texts_u: list[str] | None = None
    idx_u: Tensor | None = None
    aug_u: list[dict] | None = None


@dataclass
class StepOutput:
    """What a step returns: ``loss`` to back-propagate into the student, ``sup`` its supervised part (logged),
    ``terms`` further named scalars to log (``semi`` at least for semi-supervised methods) and ``weight`` the
    consistency weight in force (0 for none)."""

    loss: Tensor
    sup: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    weight: float = 0.0


@dataclass
class Models:
    """The networks of the loop: ``student`` (the network that is validated, saved and tested), ``forward``
    (the student, wrapped in DistributedDataParallel under torchrun: call it for gradients) and ``teacher``
    (the EMA copy in train mode, i.e. batch statistics; None unless the method ``uses_teacher``)."""

    student: nn.Module
    forward: nn.Module
    teacher: nn.Module | None


@runtime_checkable
class Method(Protocol):
    """A Step-2 training method: one class, registered in :mod:`dusss.methods` under its ``name``.

    Class attributes tell the loop what to provide: ``uses_unlabelled`` (an
    unlabelled stream), ``uses_teacher`` (an EMA teacher, Eq. 12),
    ``uses_text`` (the VLM's text-guided logits of each unlabelled image),
    ``distributed`` (safe under torchrun/DDP). ``label`` is the row name in
    tables and figures, ``summary`` one line for the CLI help. The constructor
    takes ``(cfg, device)``; :meth:`state_dict` / :meth:`load_state_dict` hold
    whatever the method keeps between steps (a second network, an RNG) so an
    interrupted run resumes exactly. Optional hook (not part of the runtime
    check): ``parameters() -> Iterable[nn.Parameter]``, the parameters of the
    method's own modules that the loop's optimiser trains with the student's
    (module docstring). Optional attribute: ``student``, the architecture the
    loop builds, validates, saves and :func:`dusss.evaluate.load_student`
    rebuilds (a key of :data:`dusss.textseg.STUDENTS`; absent = ``"unet"``);
    a text-conditioned student is called ``forward(x, texts)`` and the loop
    fills :attr:`StepBatch.texts_l` for it. Optional attribute: ``revision``
    (absent = 1), raised when a change to the method alters what it trains
    under the same settings; the loop saves it with every checkpoint and
    trains afresh rather than resume a run of another revision
    (:func:`method_revision`).
    """

    name: ClassVar[str]
    label: ClassVar[str]
    summary: ClassVar[str]
    uses_unlabelled: ClassVar[bool]
    uses_teacher: ClassVar[bool]
    uses_text: ClassVar[bool]
    distributed: ClassVar[bool]

    def __init__(self, cfg: Config, device: torch.device) -> None: ...

    def step(self, models: Models, batch: StepBatch) -> StepOutput: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def method_parameters(method: object) -> list[nn.Parameter]:
    """The trainable parameters of ``method``'s own modules: its optional ``parameters()`` hook, else none.

    Parameters that do not require gradients are left out; a parameter listed
    twice is kept once.
    """
    hook = getattr(method, "parameters", None)
    if hook is None:
        return []
    seen: dict[int, nn.Parameter] = {}
    for p in hook():
        if p.requires_grad:
            seen.setdefault(id(p), p)
    return list(seen.values())


def optimizer_groups(student: nn.Module, method: object) -> list[dict[str, Iterable[nn.Parameter]]]:
    """Parameter groups of the loop's optimiser: the student's, then the method's own (when it has any).

    With no method parameters this is the single group the loop always had,
    so optimiser states saved before the hook existed still load.
    """
    extra = method_parameters(method)
    student_params = list(student.parameters())
    clash = {id(p) for p in student_params} & {id(p) for p in extra}
    if clash:
        raise ValueError(f"{type(method).__name__}.parameters() returns {len(clash)} parameters of the student; "
                         "it must list only the method's own modules")
    return [{"params": student_params}] + ([{"params": extra}] if extra else [])


def build_owned(cfg: Config, device: torch.device | str, seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """A method's own module: ``build()`` initialised from ``seed`` without touching the loop's random state,
    on ``device``, in the loop's memory format (``cfg.channels_last``), in train mode."""
    with torch.random.fork_rng(devices=[]):  # its own initialisation, leaving the loop's RNG untouched
        torch.manual_seed(seed)
        module = build()
    memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
    return module.to(device).to(memory_format=memory).train()


def _cat(a, b):
    """Concatenate along the batch two outputs of one structure: tensors, or lists / tuples of them."""
    if isinstance(a, Tensor):
        return torch.cat([a, b])
    return type(a)(_cat(x, y) for x, y in zip(a, b))


def bn_batches(fn: Callable, first, second, separate: bool):
    """``fn`` of the labelled part ``first`` and the unlabelled part ``second`` as one BatchNorm batch or two.

    ``first`` and ``second`` are tensors (or lists of tensors, e.g. the
    encoder's skips) with the batch first; the result is ``fn`` of their
    concatenation (``separate=False``: one batch, as the methods' authors run
    them) or the concatenation of ``fn(first)`` and ``fn(second)``
    (``separate=True``: the config's ``bn_batch="separate"``, the Step-2
    default the consistency study chose; issue 20), outputs of the same
    structure as ``fn``'s (a tensor, or a list / tuple of them).
    """
    if separate:
        return _cat(fn(first), fn(second))
    return fn(_cat(first, second))


def method_revision(method: object) -> int:
    """The ``revision`` a method class (or instance) declares, 1 when it declares none."""
    return int(getattr(method, "revision", 1))
