"""The errors tl_devinterp raises on purpose: all are `TLDevinterpError`s.

A `TLDevinterpError` is a user's mistake or a fact about their files, data or machine, and its message names
the problem, the file or option, and the fix; the command line prints it as one line (exit status 2). Any
other exception is a bug and keeps its traceback. Each class also keeps the builtin exception it replaces
as its second parent, so `except ValueError` (or `TypeError`, `OSError`, ...) still catches it.
"""

from __future__ import annotations


class TLDevinterpError(Exception):
    """Base of every error tl_devinterp raises on purpose."""


class InvalidValueError(TLDevinterpError, ValueError):
    """An option, an argument or data holds a value that cannot be used."""


class InvalidTypeError(TLDevinterpError, TypeError):
    """An option or an argument is of the wrong type."""


class InvalidOptionError(TLDevinterpError, ValueError, TypeError):
    """A configuration option that is unknown, of the wrong type or out of its range (`tl_devinterp.options`)."""


class SeriesError(TLDevinterpError, ValueError):
    """A checkpoint series that cannot be used as given (the message names the file or step and the fix)."""


class UnknownKeyError(TLDevinterpError, KeyError):
    """A step that is not in the series, or a key a result does not hold, was asked for."""

    def __str__(self) -> str:  # KeyError quotes its message
        return str(self.args[0]) if self.args else ""


class QueryOutOfRangeError(TLDevinterpError, IndexError):
    """An index outside the computed queries or positions."""


class MissingFileError(TLDevinterpError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class NotAFolderError(TLDevinterpError, NotADirectoryError):
    """A path that must be a folder is a file."""


class WriteError(TLDevinterpError, OSError):
    """A file could not be written (full disk, read-only or unwritable folder); `errno` and `filename` say
    which and why."""


class FolderInUseError(TLDevinterpError, RuntimeError):
    """Another process holds the folder's lock."""


class LLCDivergenceError(TLDevinterpError, RuntimeError):
    """An SGLD chain's loss became NaN/inf or exploded."""


class TrainingDivergedError(TLDevinterpError, RuntimeError):
    """A training run's loss became NaN/inf or grew by an order of magnitude (the message names the step)."""


class WorkersLostError(TLDevinterpError, RuntimeError):
    """The executor's worker processes died; the message names the steps that were not computed."""


class MissingDependencyError(TLDevinterpError, ImportError):
    """An optional package is needed for what was asked (the message says how to install it)."""


class NotSupportedError(TLDevinterpError, NotImplementedError):
    """What was asked is outside what the library models (the message says what to do instead)."""
