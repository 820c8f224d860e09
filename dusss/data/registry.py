"""Every data set dusss knows, one :class:`DatasetSpec` each, and the report grammars they are written in.

Adding a data set is one :func:`register_dataset` call (plus its generator
module, for a generated set): the config's check of ``dataset``, the data-folder
name (:meth:`dusss.config.Config.resolved_data_root`), report grammar and
default augmentation (:mod:`dusss.data.prepare`), generation and the messages
naming the ``prepare`` command (:func:`dusss.data.ensure_dataset`) and the
paper columns of the tables (:mod:`dusss.experiments.tables`) all read
:data:`DATASETS`; :func:`dataset_for_action` names the set a ``python -m
dusss data`` action makes. Every set is read by :class:`dusss.data.LViTDataset`
from the LViT layout, so a spec says how its folder gets there, not how to
read it. A report grammar (:data:`GRAMMARS`) says
which geometric transforms a report survives once :mod:`dusss.data.text` has
rewritten it; :mod:`dusss.data.augment` checks augmentations against it.

This module imports nothing heavy (a generator is named as ``"module:attribute"``
and imported when a set is generated), so the config can check names against
it through :func:`dusss.config.register_choices`.

>>> from dusss.data.registry import DATASETS
>>> list(DATASETS)
['qata-synth', 'nuclei-real', 'qata', 'monuseg', 'bmseg', 'lvit']
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError, register_choices

__all__ = ["GrammarSpec", "Generator", "RawDownload", "DatasetSpec", "GRAMMARS", "DATASETS", "OWN_DATA",
           "register_grammar", "register_dataset", "get_dataset", "dataset_for_action", "PAPER_NAMES", "PAPER_KEYS",
           "PAPER_ONLY", "LiveMapping", "LiveTuple"]

OWN_DATA = "lvit"  # the set a folder in the LViT layout that dusss did not generate is read as


@dataclass(frozen=True)
class GrammarSpec:
    """A report grammar: which transforms keep its reports true once :mod:`dusss.data.text` rewrites them.

    ``flips``: a horizontal flip, with "left" and "right" swapped
    (:func:`dusss.data.text.flip_report`); ``turns``: quarter turns, with the
    region words turned (:func:`dusss.data.text.rotate_report`, which needs a
    rule for the grammar). A grammar with neither is text used as written.
    """

    name: str
    description: str
    flips: bool = False
    turns: bool = False


@dataclass(frozen=True)
class Generator:
    """How :func:`dusss.data.ensure_dataset` makes a generated set.

    ``function`` is called as ``function(folder, *values, seed)`` with the
    values of the config fields in ``settings`` (in that order) and the data
    seed, and returns the statistics kept in the completion marker;
    ``version`` is the generator's version. Both may be ``"module:attribute"``
    text, imported only when a set is generated. ``settings`` pairs each marker
    key with its config field: the marker (version, seed and these values)
    decides whether a folder is regenerated. ``file_prefix`` starts the name of
    every image it writes (how a folder it wrote is told from a user's).
    """

    function: str | Callable[..., dict]
    version: str | int
    settings: tuple[tuple[str, str], ...]
    file_prefix: str

    def load(self) -> tuple[Callable[..., dict], int]:
        """The generator function and its version, imported now."""
        return _resolve(self.function), _resolve(self.version)


@dataclass(frozen=True)
class RawDownload:
    """How a raw download of a set is recognised (all of ``folders``, at any depth up to three) and described."""

    what: str  # "a raw QaTa-COV19-v2 download"
    folders: tuple[str, ...]  # folder names that mark it
    placeholder: str = "<raw download folder>"  # stands for it in the prepare command a message shows
    advice: str = ""  # what to do with it when the set has no prepare command


@dataclass(frozen=True)
class DatasetSpec:
    """One data set: the value of ``Config.dataset``, its grammar, paper column and how its folder is made.

    ``paper`` is the column of the paper's tables this set is (a real set) or
    stands in for (a generated one); ``None`` for sets the paper does not have.
    ``generator`` makes a generated (embedded) set on first use; a set without
    one is read from ``data_root``. ``action`` is the ``python -m dusss data``
    action that makes it (``make-synth``) or converts its raw download
    (``prepare-qata``, with ``action_args`` holding ``{raw}`` and ``{out}``).
    ``missing`` says what to do when its folder is absent (``{root}``), when
    there is no prepare action to name.
    """

    name: str
    description: str
    grammar: str
    paper: str | None = None
    generator: Generator | None = None
    action: str | None = None
    action_args: str = ""
    raw: RawDownload | None = None
    missing: str = ""

    @property
    def generated(self) -> bool:
        """True for a set dusss generates (its folder name carries the profile and data seed)."""
        return self.generator is not None

    def prepare_command(self, raw: str, out: str) -> str | None:
        """The command converting a raw download at ``raw`` into the LViT layout at ``out`` (None: there is none)."""
        if self.generated or self.action is None:
            return None
        return f"python -m dusss data {self.action} {self.action_args.format(raw=raw, out=out)}"


class LiveMapping(Mapping):
    """A read-only mapping recomputed from the registry at each use, so later registrations count."""

    def __init__(self, build: Callable[[], dict], doc: str):
        self._build, self.__doc__ = build, doc

    def __getitem__(self, key: Any) -> Any:
        return self._build()[key]

    def __iter__(self) -> Iterator:
        return iter(self._build())

    def __len__(self) -> int:
        return len(self._build())

    def __repr__(self) -> str:
        return repr(self._build())


class LiveTuple(Sequence):
    """A read-only sequence recomputed from the registry at each use (compares equal to the same tuple)."""

    def __init__(self, build: Callable[[], tuple], doc: str):
        self._build, self.__doc__ = build, doc

    def __getitem__(self, index: Any) -> Any:
        return self._build()[index]

    def __len__(self) -> int:
        return len(self._build())

    def __eq__(self, other: object) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, Sequence) else other)

    def __add__(self, other: Sequence) -> tuple:
        return tuple(self) + tuple(other)

    def __repr__(self) -> str:
        return repr(self._build())


def _resolve(ref: Any) -> Any:
    """``ref`` itself, or the attribute a ``"module:attribute"`` text names (imported now)."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


GRAMMARS: dict[str, GrammarSpec] = {}  # report grammar name -> spec, in registration order
DATASETS: dict[str, DatasetSpec] = {}  # data set name (Config.dataset) -> spec, in registration order


def register_grammar(spec: GrammarSpec) -> GrammarSpec:
    """Add a report grammar to :data:`GRAMMARS` (a name taken by another spec: ``ValueError``); returns ``spec``."""
    if GRAMMARS.get(spec.name, spec) != spec:
        raise ValueError(f"report grammar {spec.name!r} is already registered as {GRAMMARS[spec.name]}")
    GRAMMARS[spec.name] = spec
    return spec


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add ``spec`` to :data:`DATASETS`, after which ``Config(dataset=spec.name)`` is valid; returns ``spec``.

    Its grammar must be registered; a name taken by another spec, or an
    ``action`` another set already has, raises ``ValueError``.
    """
    if spec.grammar not in GRAMMARS:
        raise ValueError(f"data set {spec.name!r} names report grammar {spec.grammar!r}, which is not registered; "
                         f"use one of {', '.join(GRAMMARS)} or register_grammar it first")
    if DATASETS.get(spec.name, spec) != spec:
        raise ValueError(f"data set name {spec.name!r} is already registered as {DATASETS[spec.name]}")
    taken = [s.name for s in DATASETS.values() if spec.action and s.action == spec.action and s.name != spec.name]
    if taken:
        raise ValueError(f"data action {spec.action!r} of {spec.name!r} already makes {taken[0]!r}")
    DATASETS[spec.name] = spec
    return spec


def get_dataset(name: str) -> DatasetSpec:
    """The spec of data set ``name`` (``ConfigError`` listing the registered names otherwise)."""
    if name not in DATASETS:
        raise ConfigError(f"config key 'dataset' = {name!r} is not a registered data set; choose one of "
                          f"{', '.join(DATASETS)} (or register_dataset a DatasetSpec, dusss.data.registry)")
    return DATASETS[name]


def dataset_for_action(action: str) -> DatasetSpec:
    """The spec of the set that ``python -m dusss data <action>`` makes or prepares (``KeyError`` if none)."""
    for spec in DATASETS.values():
        if spec.action == action:
            return spec
    raise KeyError(f"no registered data set is made by the data action {action!r}")


def _paper_keys() -> dict[str, str]:
    keys: dict[str, str] = {}
    for spec in DATASETS.values():
        if spec.paper and not spec.generated:
            keys.setdefault(spec.paper, spec.name)  # the first real set of a column (a built-in) keeps it
    return keys


PAPER_NAMES = LiveMapping(lambda: {s.name: s.paper for s in DATASETS.values() if s.paper},
                           "our data set -> the paper's column it is or stands in for")
PAPER_KEYS = LiveMapping(_paper_keys, "the paper's column -> the real set it is, whose name prefixes that column's "
                                       "numbers in dusss.paper_tables (qata_dice)")
PAPER_ONLY = LiveTuple(lambda: tuple(p for p in _paper_keys() if not any(s.generated and s.paper == p
                                                                         for s in DATASETS.values())),
                        "the paper's data sets with no generated stand-in here: shown as paper-only columns")


# ---------------------------------------------------------------- the built-in grammars and sets
for _grammar in (
    GrammarSpec("qata", "QaTa-COV19: lesion count and lung zones (dusss.data.text.describe_qata)", flips=True),
    GrammarSpec("monuseg", "MoNuSeg: nuclei count, size and image half/quadrant (describe_monuseg)",
                flips=True, turns=True),
    GrammarSpec("bmseg", "BM-Seg: metastasis count, size and 3 x 3 image region (describe_bmseg)",
                flips=True, turns=True),
    GrammarSpec("none", "free text, used as written: no transform is known to keep it true"),
):
    register_grammar(_grammar)

for _spec in (
    DatasetSpec("qata-synth", "procedural chest X-rays with COVID-like opacities and QaTa-grammar reports",
                grammar="qata", paper="QaTa-COV19", action="make-synth",
                generator=Generator("dusss.data.synth:generate_qata_synth", "dusss.data.synth:SYNTH_VERSION",
                                    (("train", "synth_train"), ("val", "synth_val"), ("test", "synth_test"),
                                     ("size", "synth_size")), file_prefix="synth_")),
    DatasetSpec("nuclei-real", "real nuclei tiles cut into MoNuSeg-style patches, reports from the masks",
                grammar="monuseg", paper="MoNuSeg", action="make-nuclei",
                generator=Generator("dusss.data.nuclei:generate_nuclei_real", "dusss.data.nuclei:NUCLEI_VERSION",
                                    (("patch", "nuclei_patch"),), file_prefix="nuclei_")),
    DatasetSpec("qata", "QaTa-COV19 with LViT's text", grammar="qata", paper="QaTa-COV19", action="prepare-qata",
                action_args="{raw} --text-dir <LViT text folder> --data-root {out}",
                raw=RawDownload("a raw QaTa-COV19-v2 download", ("Train Set", "Test Set"), "<QaTa-COV19-v2 folder>")),
    DatasetSpec("monuseg", "MoNuSeg with LViT's text", grammar="monuseg", paper="MoNuSeg",
                raw=RawDownload("the raw MoNuSeg challenge download", ("Tissue Images", "Annotations"),
                                advice="dusss reads MoNuSeg in the LViT layout with LViT's text: download LViT's "
                                       "MoNuSeg folder and use it as data_root"),
                missing="download LViT's MoNuSeg folder (already in the LViT layout) to {root}, or set data_root / "
                        "$DUSSS_DATA"),
    DatasetSpec("bmseg", "BM-Seg, reports written from the lesion masks", grammar="bmseg", paper="BM-Seg",
                action="prepare-bmseg", action_args="{raw} --data-root {out}",
                raw=RawDownload("a raw BM-Seg download", ("image", "lesion mask"), "<BM-Seg folder>")),
    DatasetSpec(OWN_DATA, "your own 2-D data in the LViT layout, reports used as written", grammar="none",
                missing="put your data in the LViT layout at {root} (README 'Your own data') or set data_root"),
):
    register_dataset(_spec)

register_choices("dataset", DATASETS)
