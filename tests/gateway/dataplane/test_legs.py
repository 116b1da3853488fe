"""The legs' plumbing (gateway/dataplane/legs.py), driven by a fake transport: flow control
between the legs, half-close, and what PENDING_LIMIT pauses.
"""

from __future__ import annotations

from gateway.dataplane import legs


def test_pending_limit_is_sane():
    assert 64 * 1024 <= legs.PENDING_LIMIT <= 4 * 1024 * 1024


# ------------------------------------------------------------------------------ leg plumbing


class FakeTransport:
    """Just enough of a transport to drive Leg flow control deterministically."""

    def __init__(self, protocol, high: int = 64 * 1024) -> None:
        self.protocol, self.high = protocol, high
        self.buffered = 0
        self.reading = True
        self.writing_paused = False
        self.closing = False
        self.eof_written = False
        protocol.connection_made(self)

    def write(self, data: bytes) -> None:
        self.buffered += len(data)
        if self.buffered > self.high and not self.writing_paused:
            self.writing_paused = True
            self.protocol.pause_writing()

    def writelines(self, chunks) -> None:
        for c in chunks:
            self.write(c)

    def drain(self) -> None:
        self.buffered = 0
        if self.writing_paused:
            self.writing_paused = False
            self.protocol.resume_writing()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True


def test_pending_bytes_flushed_into_a_full_up_leg_keep_the_client_paused():
    down, up = legs.PlainLeg(), legs.PlainLeg()
    td, tu = FakeTransport(down), FakeTransport(up)
    chunk = b"x" * 65536
    while td.reading:  # the client sends while we are still connecting
        down.data_received(chunk)
    assert down.pending_size > legs.PENDING_LIMIT

    up.attach(down)
    down.attach(up)  # the flush overfills the up leg, which asks the client leg to pause
    assert tu.buffered == down.pending_size
    assert not td.reading, "client leg resumed although the backend leg is over its high water"

    tu.drain()  # the backend catches up
    assert td.reading


def test_leg_flow_control_and_half_close_plumbing():
    down, up = legs.PlainLeg(), legs.PlainLeg()
    td, tu = FakeTransport(down), FakeTransport(up)
    up.attach(down)
    down.attach(up)
    down.data_received(b"y" * 100_000)  # over the up leg's high water
    assert not td.reading and down.paused_for_other
    tu.drain()
    assert td.reading and not down.paused_for_other

    assert down.eof_received() is True  # keep the other direction open
    assert tu.eof_written
    up.data_received(b"reply")
    assert td.buffered == 5
    assert up.eof_received() is False  # both directions done
    assert td.closing
