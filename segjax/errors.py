"""User-facing errors: one line that says what is wrong and how to fix it.

The command-line programs print these without a traceback (`exit_on_user_error`); anything else
is a bug and keeps its traceback.
"""

import contextlib
import sys

from absl import logging


class SegjaxError(ValueError):
    """Bad input (config, data, checkpoint, workdir) that the user can fix."""


class ConfigError(SegjaxError):
    """A config field is unknown, has the wrong type, or conflicts with another field."""


class DataError(SegjaxError):
    """A dataset file or array is missing, corrupt, or holds values the config does not allow."""


class CheckpointError(SegjaxError):
    """A checkpoint is missing, incomplete, or does not match the configured model."""


class WorkdirError(SegjaxError):
    """The workdir holds a run that this run would silently change or overwrite."""


class BusyError(SegjaxError):
    """Another process holds the lock on a workdir (or file) that this run needs for itself."""


class NonFiniteLossError(SegjaxError):
    """Training produced a NaN/Inf loss or gradient."""


@contextlib.contextmanager
def exit_on_user_error():
    """Around a command-line program's work: a SegjaxError ends it with one line `error: ...` on
    stderr (after the log lines so far) and exit status 2."""
    try:
        yield
    except SegjaxError as err:
        logging.flush()
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
