"""Errors of the gateway package. Each says whose fault it is and what to do.

`GatewayError` is the base of everything the gateway raises on purpose. `ConfigError` means the
operator's config file is wrong: it carries every problem found, each naming the file, the line,
the field path and what is wrong, so one run of `isthmus config validate` shows them all.

Permanent or worth a retry is a matter of type, never of message text: a `PermanentError`
(federation/errors.py; `ConfigError` is one, and so is `JoinRefused`) means retrying cannot
help, and the gateway stops with it (`isthmus` exits 2 for a ConfigError, 1 otherwise, with the
reason on one line). Any other error on the way to the federation is retried with backoff.
"""

from __future__ import annotations

from dataclasses import dataclass

from federation.errors import IsthmusError, PermanentError


class GatewayError(IsthmusError):
    """Base of every error the gateway raises on purpose."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a config file.

    `line` is 1-based (None when the problem is about the file as a whole); `path` is the field,
    written like `imports[0].failover.tiers[1]` ("" when the problem is not about one field).
    """

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        return self._format("")

    def warning(self) -> str:
        """The line for a warning: `FILE:LINE: warning: path: message`."""
        return self._format("warning: ")

    def _format(self, label: str) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        what = f"{self.path}: {self.message}" if self.path else self.message
        return f"{where}: {label}{what}"


class ConfigError(GatewayError, PermanentError):
    """The config file is wrong (the operator's to fix). str() is one line per problem;
    `warnings` holds the risky-but-valid settings found in the same pass."""

    def __init__(self, problems: list[Problem], warnings: list[Problem] | tuple[Problem, ...] = ()):
        if not problems:
            raise ValueError("ConfigError needs at least one problem")
        self.problems: list[Problem] = list(problems)
        self.warnings: list[Problem] = list(warnings)
        super().__init__("\n".join(str(p) for p in self.problems))
