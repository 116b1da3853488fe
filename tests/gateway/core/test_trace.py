"""W3C Trace Context (gateway/core/trace.py): tables of the spec's cases, and properties."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.trace import MAX_TRACESTATE, continue_trace, parse_traceparent

GOOD = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACE, PARENT = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


def rand(seed: int = 1):
    return random.Random(seed).getrandbits


@pytest.mark.parametrize("value, ok", [
    (GOOD, True),
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", True),
    ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future", True),  # higher version
    ("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", True),
    ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", False),  # version ff
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x", False),  # 00 is 55 chars
    ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", False),  # uppercase
    ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", False),  # zero trace id
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", False),  # zero parent id
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", False),  # no flags
    ("00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01", False),
    ("00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01", False),  # not hex
    ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x", False),  # no "-" at 55
    ("", False),
])
def test_parse_traceparent(value, ok):
    assert (parse_traceparent(value) is not None) is ok


def test_a_valid_trace_is_continued_with_a_new_span():
    t = continue_trace([GOOD], ["a=1", "b=2"], rand())
    assert (t.trace_id, t.parent_id, t.flags) == (TRACE, PARENT, "01")
    assert t.span_id != PARENT and len(t.span_id) == 16 and t.span_id.strip("0")
    assert t.tracestate == "a=1,b=2"  # several headers joined
    assert t.traceparent == f"00-{TRACE}-{t.span_id}-01" and not t.restarted


def test_a_future_version_goes_out_as_00():
    t = continue_trace(["02-" + GOOD[3:] + "-more"], [], rand())
    assert t.traceparent.startswith("00-" + TRACE)


@pytest.mark.parametrize("parents", [[], ["garbage"], [GOOD, GOOD]])
def test_missing_malformed_or_repeated_starts_a_new_trace_and_drops_tracestate(parents):
    t = continue_trace(parents, ["a=1"], rand())
    assert t.restarted and t.tracestate is None and t.flags == "00"
    assert t.trace_id != TRACE and len(t.trace_id) == 32 and t.trace_id.strip("0")


def test_an_oversized_tracestate_is_dropped_whole():
    t = continue_trace([GOOD], ["k=" + "v" * MAX_TRACESTATE], rand())
    assert t.tracestate is None and t.trace_id == TRACE


def test_all_zero_ids_are_drawn_again():
    draws = iter([0, 0, 5, 7])  # a zero span, then a zero trace id: both redrawn
    t = continue_trace([], [], lambda bits: next(draws))
    assert t.span_id == f"{5:016x}" and t.trace_id == f"{7:032x}"


@given(st.text(max_size=80))
def test_anything_in_gives_a_valid_traceparent_out(value):
    t = continue_trace([value], [value], rand())
    assert parse_traceparent(t.traceparent) is not None
    parsed = parse_traceparent(value.strip())
    if parsed is None:
        assert t.restarted and t.tracestate is None
    else:
        assert not t.restarted and (t.trace_id, t.parent_id, t.flags) == parsed
