"""Errors that the CLI turns into one line on stderr and a non-zero exit code.

Every failure caused by the user's input (a model name, a file, a dataset, a recipe, a flag) raises
a subclass of `VitqError` whose message names the problem and, where there is one, the fix.
"""

from __future__ import annotations


class VitqError(Exception):
    """Base class: a problem with the user's input or environment, reported without a traceback."""

    exit_code = 1


class ModelError(VitqError):
    """A MODEL spec cannot be resolved, or the model family is not supported."""


class WeightsError(VitqError):
    """A weights file is missing, unreadable, or does not match the model (strict loading)."""


class DataError(VitqError):
    """A dataset spec cannot be resolved, is empty, or holds unreadable or mismatched samples."""


class RecipeError(VitqError):
    """A recipe or override file is missing, malformed, or holds unknown keys or bad values."""


class RunError(VitqError):
    """A training run folder is missing, belongs to another run, or cannot be resumed."""


class ExportFormatError(VitqError):
    """A file is not a vitqtool export, has a newer format version, or its tensors contradict its metadata."""


class WriteError(VitqError):
    """A file or folder cannot be written: full disk, read-only or missing permission, a path that is in the way."""


class BusyError(VitqError):
    """Another vitqtool process is writing to the same run folder."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived (CI, `timeout`, docker, schedulers); unwinds like Ctrl-C so files are cleaned up."""

    def __init__(self, signum: int) -> None:
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum
