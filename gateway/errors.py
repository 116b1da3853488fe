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
from typing import Any

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


# -- the data plane: links, streams and dials ------------------------------------------------


class LinkProtocolError(GatewayError):
    """A peer gateway's bytes broke the link protocol (dataplane/link.py): the fault is the
    peer's (a bug or a hostile sender, not our config). The message says what it sent; the link
    is cut, its streams reset, and the next connection dials a new link."""


class OpenRefused(GatewayError):
    """A well-framed OPEN from a peer gateway that this side will not serve (unknown protocol
    version, no service named): the peer's request is at fault. It is answered with ERR `code`
    and the link stays up."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class StreamRefused(GatewayError):
    """The remote gateway answered our OPEN with ERR, or reset the stream before OK: its
    decision, not a broken peer (unknown-service, forbidden, busy, draining, no-endpoint...;
    `code` says which). The caller fails over to its next candidate."""

    def __init__(self, code: Any, error: Any) -> None:
        super().__init__(f"{code}: {error}")
        self.code = code


class DialError(GatewayError):
    """One connect attempt failed: the endpoint or the remote gateway was unreachable, refused
    the connection or our stream, or timed out (the far side's state, not our config nor the
    client's). The message names the target and why; connect_first moves on to the next
    candidate and reports the failure to outlier detection."""
