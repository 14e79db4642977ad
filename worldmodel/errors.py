"""The exception types for user mistakes: the CLI prints them as one line and exits non-zero.

They are standard exceptions too, so Python callers (a notebook) can catch them without knowing
this module: every :class:`UserError` is a ``ValueError``, and :class:`RunNotFoundError` (a run
folder or file that does not exist) is also a ``FileNotFoundError``.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input (config, paths, data, shapes): a one-line message that says how to fix it.

    :param message: what is wrong and how to fix it, on one line.
    :param exit_code: the CLI's exit status (2 for usage/config errors, 1 for failed checks).
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(UserError):
    """An unknown key, a wrong type or an out-of-range value in a config or ``--set``."""


class RunNotFoundError(UserError, FileNotFoundError):
    """A run folder, dataset or file the command needs does not exist.

    Example:
        >>> e = RunNotFoundError("agent run 'runs/x' not found")
        >>> isinstance(e, FileNotFoundError), isinstance(e, ValueError), str(e)
        (True, True, "agent run 'runs/x' not found")
    """


class ConfigNotFoundError(ConfigError, RunNotFoundError):
    """A ``--config`` file that does not exist."""
