"""The one base class of the errors a user can cause, and how they are shown.

A :class:`DusssError` (a bad config key, a data folder that is missing or in no
known layout, a checkpoint that is missing or not one of ours) says in its
message what was wrong, which file or value, and what to do -- so it reaches
the user as that one line, never as a traceback: ``python -m dusss`` prints
``error: <message>`` and exits with status 2 (:func:`dusss.cli.main`), and
IPython (notebooks, papermill, nbval) prints ``<Class>: <message>`` while still
failing the cell. Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

__all__ = ["DusssError", "ConfigError", "CheckpointError", "MissingCheckpointError"]


class DusssError(ValueError):
    """A file, folder or value the user supplied is not usable; the message says which and what to do.

    Subclasses: :class:`ConfigError` (also ``dusss.config.ConfigError``), :class:`dusss.data.DataError`,
    :class:`CheckpointError` (:class:`MissingCheckpointError`). A ``ValueError``,
    so code that caught the narrower errors as ``ValueError`` keeps working.
    """

    def _render_traceback_(self) -> list[str]:
        # IPython asks an exception for this before formatting a traceback
        # (InteractiveShell.showtraceback): a notebook cell that raises one shows
        # this line and still fails, so papermill and nbval stop there.
        return [f"{type(self).__name__}: {self}"]


class ConfigError(DusssError):
    """A configuration key or value a user supplied is not valid (re-exported by :mod:`dusss.config`)."""


class CheckpointError(DusssError):
    """A checkpoint file that is not the checkpoint it should be (unreadable, another kind, another version)."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """A checkpoint path that does not exist; still a ``FileNotFoundError``, as it was before there was a base class."""
