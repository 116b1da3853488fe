"""Log lines about what peers and anonymous clients send: quoted, and rate-limited.

Two rules every process of Isthmus follows (federation, gateways, workers):

* **Untrusted input is quoted.** A path, header, SPIFFE ID or address that came off the wire is
  logged through `quote()`: a single-line, printable, length-bounded literal (`'a\\nb'`), so a
  client cannot forge a log line with `%0A` or hide one with terminal escapes.
* **One line per event class, rate-limited.** `LogLimiter.log(level, key, ...)` lets at most
  `burst` lines of one key out per `interval` seconds; the first line after a quiet spell says
  how many were held back. Keys name the event class (`"forbidden"`, `"bad-request"`), not
  the client, so a flood of distinct bad clients still costs a few lines; counters (metrics)
  carry the volume. At most `max_keys` classes are tracked; beyond that the oldest is dropped.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable

QUOTE_LIMIT = 200  # characters of untrusted input kept in one log line


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """`value` as a printable one-line literal of at most `limit` characters (then `...`)."""
    if isinstance(value, bytes | bytearray | memoryview):
        text = bytes(value).decode("utf-8", "backslashreplace")
    else:
        text = str(value)
    if len(text) > limit:
        return repr(text[:limit]) + "..."
    return repr(text)


class LogLimiter:
    """At most `burst` lines per key per `interval` seconds, with a count of what was held."""

    _all: weakref.WeakSet[LogLimiter] = weakref.WeakSet()

    @classmethod
    def reset_all(cls) -> None:
        """Forget every budget (tests: each starts with the full burst of every limiter)."""
        for limiter in list(cls._all):
            limiter._windows.clear()

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        burst: int = 5,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        # key -> [window start, lines let out in this window, lines held back]
        self._windows: OrderedDict[str, list[float]] = OrderedDict()
        LogLimiter._all.add(self)

    def log(self, level: int, key: str, msg: str, *args: object,
            exc_info: bool | None = None) -> bool:
        """Log `msg % args` unless `key` is over its budget; True when the line went out."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self._clock()
        w = self._windows.get(key)
        held = 0
        if w is None or now - w[0] >= self.interval:
            held = int(w[2]) if w is not None else 0
            w = [now, 0, 0]
            self._windows[key] = w
            self._windows.move_to_end(key)
            while len(self._windows) > self.max_keys:
                self._windows.popitem(last=False)
        if w[1] >= self.burst:
            w[2] += 1
            return False
        w[1] += 1
        if held:
            msg = f"{msg} ({held} more like this in the last {self.interval:g}s not logged)"
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def info(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.INFO, key, msg, *args)

    def warning(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

    def error(self, key: str, msg: str, *args: object) -> bool:
        return self.log(logging.ERROR, key, msg, *args)

    def exception(self, key: str, msg: str, *args: object) -> bool:
        """An ERROR line with the exception being handled (its traceback: our bug, not input)."""
        return self.log(logging.ERROR, key, msg, *args, exc_info=True)
