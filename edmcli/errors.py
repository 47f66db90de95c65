"""The one exception type that the CLI turns into a one-line message and a non-zero exit.

Every stage raises :class:`EchoSynthError` (or a subclass) for bad input: a missing file, a wrong
shape, a corrupt checkpoint. The message is one sentence that names the file or option and what is
wrong with it. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class EchoSynthError(Exception):
    """A user-facing error: one sentence naming the file/option and the problem."""

    exit_code = 2


class Interrupted(EchoSynthError):
    """Stopped by SIGINT/SIGTERM after saving what can be resumed: exit code 130."""

    exit_code = 130


class DataError(EchoSynthError):
    """Bad or missing input data (files, stores, label maps)."""
