"""The one exception type for user mistakes: the CLI prints it as one line and exits non-zero."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (config, paths, data, shapes): a one-line message that says how to fix it.

    :param message: what is wrong and how to fix it, on one line.
    :param exit_code: the CLI's exit status (2 for usage/config errors, 1 for failed checks).
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ConfigError(UserError):
    """An unknown key, a wrong type or an out-of-range value in a config or ``--set``."""
