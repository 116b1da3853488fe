"""quote() and LogLimiter: untrusted input stays on one line; floods cost a few lines."""

import logging

from federation.logs import LogLimiter, quote


def test_quote_keeps_one_printable_line():
    assert quote("/v1/x\nINFO forged") == "'/v1/x\\nINFO forged'"
    assert "\x1b" not in quote("\x1b[2Jclear")
    assert quote(b"\xff\x00ab") == "'\\\\xff\\x00ab'"
    long = quote("a" * 500)
    assert long.endswith("...") and len(long) < 210


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_limiter_lets_burst_out_then_counts_what_it_held(caplog):
    clock = _Clock()
    lim = LogLimiter(logging.getLogger("t.limiter"), interval=10, burst=2, clock=clock)
    caplog.set_level(logging.INFO, "t.limiter")
    sent = [lim.warning("forbidden", "403 %s", i) for i in range(5)]
    assert sent == [True, True, False, False, False]
    lim.warning("other", "another class")  # its own budget
    clock.t = 10.0
    assert lim.warning("forbidden", "403 again")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["403 0", "403 1", "another class",
                     "403 again (3 more like this in the last 10s not logged)"]


def test_limiter_tracks_a_bounded_number_of_keys():
    lim = LogLimiter(logging.getLogger("t.keys"), max_keys=3)
    for i in range(10):
        lim.error(f"k{i}", "x")
    assert len(lim._windows) == 3
