"""W3C Trace Context (pure): continue the caller's trace, or start one, with a new span per hop.

Theory of operation
-------------------
A request carries `traceparent: VERSION-TRACEID-PARENTID-FLAGS` (https://www.w3.org/TR/trace-context/):

    version   2 lowercase hex, not "ff"; version 00 is exactly 55 characters long; a higher
              version may be longer, its extra fields after a "-" at position 55 are ignored
    trace-id  32 lowercase hex, not all zeros
    parent-id 16 lowercase hex, not all zeros
    flags     2 lowercase hex (bit 0: sampled)

Each gateway that handles a request at L7 is one hop: it keeps the trace id and the flags, and
sends its own new span id as the parent id (version 00 out, whatever came in). A request with
no traceparent, more than one, or one that does not parse starts a new trace (new trace id, new
span id, flags 00); the spec says tracestate must then be dropped as well, since it describes a
trace we are not continuing. A valid trace keeps its tracestate (several headers are joined with
",", as the spec allows), bounded to MAX_TRACESTATE characters: a longer one is dropped whole
rather than cut mid-entry.

Randomness is injected (`rand(bits) -> a random int of that many bits`, as Random.getrandbits);
ids that come out all zeros are drawn again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

__all__ = ["Trace", "continue_trace", "parse_traceparent"]

MAX_TRACESTATE = 512  # the spec's "at least 512 characters" a vendor must propagate
_HEX = frozenset("0123456789abcdef")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16


class Trace(NamedTuple):  # a tuple: made once per request, on the hot path
    trace_id: str
    span_id: str  # ours, sent as the next hop's parent id
    parent_id: str | None  # the caller's span (None: we started the trace)
    flags: str
    tracestate: str | None

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    @property
    def restarted(self) -> bool:
        return self.parent_id is None


def _hex(s: str, n: int) -> bool:
    return len(s) == n and _HEX.issuperset(s)


def parse_traceparent(value: str) -> tuple[str, str, str] | None:
    """(trace id, parent id, flags) of a valid traceparent, else None (module docstring)."""
    if len(value) < 55:
        return None
    version = value[:2]
    if not _hex(version, 2) or version == "ff":
        return None
    if version == "00" and len(value) != 55:
        return None
    if len(value) > 55 and value[55] != "-":
        return None
    if value[2] != "-" or value[35] != "-" or value[52] != "-":
        return None
    trace_id, parent_id, flags = value[3:35], value[36:52], value[53:55]
    if not (_hex(trace_id, 32) and _hex(parent_id, 16) and _hex(flags, 2)):
        return None
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, parent_id, flags


def _new_id(rand: Callable[[int], int], bits: int) -> str:
    while True:
        out = rand(bits)
        if out:
            return f"{out:0{bits // 4}x}"


def continue_trace(traceparents: Sequence[str], tracestates: Sequence[str],
                   rand: Callable[[int], int]) -> Trace:
    """This hop's trace: the caller's continued with a new span, or a new one (docstring)."""
    parsed = parse_traceparent(traceparents[0].strip()) if len(traceparents) == 1 else None
    span = _new_id(rand, 64)
    if parsed is None:
        return Trace(_new_id(rand, 128), span, None, "00", None)
    trace_id, parent_id, flags = parsed
    state = ",".join(s.strip() for s in tracestates) if tracestates else None
    if state is not None and (len(state) > MAX_TRACESTATE or not state):
        state = None
    return Trace(trace_id, span, parent_id, flags, state)
