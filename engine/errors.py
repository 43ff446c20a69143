"""One root error class; every message says what was found, what was required, and the fix.

The CLI turns any ``BackfillError`` into one line on stderr and exit status 2.
"""


class BackfillError(Exception):
    """Root of every error that a user can cause and fix."""


class ConfigError(BackfillError):
    """A configuration file or option is invalid."""


class DataError(BackfillError):
    """Input data is unreadable, malformed or too short."""


class EmptySplitError(DataError):
    """A train / calibration / test split holds no complete window (a short history)."""


class NotFittedError(BackfillError):
    """A component was used before ``fit``."""


class StoreError(BackfillError):
    """A scenario store is missing, incompatible or corrupt."""


class CheckpointError(BackfillError):
    """A model checkpoint is missing or does not match the data."""


def not_fitted(obj: object) -> NotFittedError:
    """The one uniform error for calling ``sample``/``predict`` before ``fit``."""
    name = type(obj).__name__
    return NotFittedError(f"{name} is not fitted: call {name}.fit(panel, model) before sampling")


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its class name if it has none): what a
    one-line error quotes of a library's multi-line message."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
