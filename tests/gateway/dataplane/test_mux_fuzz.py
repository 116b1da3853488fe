"""A malformed link peer never crashes a gateway or touches its other links (Hypothesis).

Real sockets, real mutual TLS, uvloop, the real InboundListener / LinkPool / MuxLink. One uvloop
runs in a thread for the whole module (a TLS setup per example would cost seconds), holding:
gateway B (an InboundListener exporting an echo backend), gateway A (an ImportListener whose
links to B come from one LinkPool), a *good* client connection through A -> B kept open for
every example, and a *rogue answerer* (a TLS server with B's identity speaking frames by hand).

* Malformed caller: each example dials B with cluster A's identity and writes a generated mix
  of frames (well-formed OPEN/DATA/..., any type byte, any stream id, lying length fields,
  control JSON of any shape, raw garbage, split anywhere). B may cut that link; the good stream
  must still echo afterwards, and B must end with only the good link.
* Malformed answerer: each example, A's Dialer dials the rogue answerer, which answers the OPEN
  with generated frames. The dial may succeed or fail with DialError (nothing else); the good
  stream must still echo.
Every example also checks that no exception escaped to the loop's exception handler. Examples
are bounded (`max_examples`) so the module runs in a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.dataplane import link
from gateway.dataplane.dial import Dialer
from gateway.errors import DialError
from tests.helpers.mux import RawPeer, open_frame
from tests.helpers.relay import (
    HOST,
    SERVICE,
    Exports,
    FakeRouter,
    echo_server,
    eventually,
    import_listener,
    inbound,
    remote_target,
    roundtrip,
)
from tests.helpers.tls import tls_pair

EXAMPLES = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

KINDS = st.integers(0, 12)
SIDS = st.sampled_from([0, 1, 2, 3, 5, link.MAX_STREAM_ID, link.MAX_STREAM_ID + 2,
                        2**32 - 1]) | st.integers(0, 2**32 - 1)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(
                        st.text(max_size=5), c, max_size=3), max_leaves=6)
CONTROL_KEYS = st.sampled_from(["v", "service", "code", "error", "endpoint"]) | st.text(max_size=5)
CHUNK = st.one_of(
    st.builds(lambda sid: open_frame(sid), st.sampled_from([1, 3, 5, 7])),  # valid OPENs
    st.builds(link.control, KINDS, SIDS, st.dictionaries(CONTROL_KEYS, JSON, max_size=4)),
    st.builds(link.frame, KINDS, SIDS, st.binary(max_size=48)),
    st.builds(lambda k, s, n, p: link.HEADER.pack(k, s, n) + p,  # the length field lies
              KINDS, SIDS, st.integers(0, 2**32 - 1), st.binary(max_size=16)),
    st.binary(min_size=1, max_size=48),
)
SCRIPTS = st.lists(CHUNK, min_size=1, max_size=8)


class World:
    """The module's loop thread and the gateways on it."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.escaped: list[dict] = []
        self.loop.set_exception_handler(lambda _loop, ctx: self.escaped.append(ctx))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.stack = contextlib.AsyncExitStack()
        self.rogue_script: list[bytes] = []

    def run(self, coro, timeout: float = 20.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def setup(self) -> None:
        stack = self.stack
        self.tls_a, self.tls_b = tls_pair()
        exports = Exports()
        exports.add(SERVICE, await echo_server(stack))
        self.b = await inbound(stack, self.tls_b, exports)
        self.a = await import_listener(stack, FakeRouter(remote_target(self.b.port)),
                                       tls=self.tls_a)
        reader, writer = await asyncio.open_connection(HOST, self.a.port)
        stack.callback(writer.close)
        self.good = (reader, writer)
        await roundtrip(*self.good)
        srv = await asyncio.start_server(self._rogue, HOST, 0,
                                         ssl=self.tls_b.server_context)
        stack.push_async_callback(srv.wait_closed)
        stack.callback(srv.close)
        self.rogue_port = srv.sockets[0].getsockname()[1]

    async def _rogue(self, reader, writer) -> None:
        """A fake answerer: after the caller's first bytes (its OPEN), the example's frames."""
        try:
            await asyncio.wait_for(reader.read(65536), 2.0)
            for chunk in self.rogue_script:
                writer.write(chunk)
                await writer.drain()
            await asyncio.wait_for(reader.read(65536), 0.3)
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()

    async def rogue_caller(self, script: list[bytes]) -> None:
        ctx, _ = self.tls_a.for_peer("cluster-b")
        reader, writer = await asyncio.open_connection(HOST, self.b.port, ssl=ctx,
                                                       server_hostname="b")
        peer = RawPeer()
        pump = asyncio.create_task(peer.pump(reader))
        try:
            for chunk in script:
                writer.write(chunk)
                await asyncio.sleep(0)  # each in its own read, mostly
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(peer.closed.wait(), 0.2)
        finally:
            writer.close()
            pump.cancel()
        await roundtrip(*self.good, b"good stream")

    async def rogue_answerer(self, script: list[bytes]) -> None:
        self.rogue_script = script
        dialer = Dialer(self.tls_a, 1.0)
        try:
            stream = await dialer.dial(remote_target(self.rogue_port), SERVICE)
        except DialError:
            pass
        else:
            await asyncio.sleep(0.05)  # let whatever followed the OK arrive
            stream.close()
        finally:
            await dialer.pool.close()
        await roundtrip(*self.good, b"good stream")


@pytest.fixture(scope="module")
def world():
    w = World()
    w.run(w.setup())
    yield w
    w.run(w.stack.aclose())
    w.loop.call_soon_threadsafe(w.loop.stop)
    w.thread.join(5)
    w.loop.close()


@EXAMPLES
@given(script=SCRIPTS)
def test_malformed_caller_costs_only_its_own_link(world, script):
    world.run(world.rogue_caller(script))
    assert not world.escaped, world.escaped[:3]


@EXAMPLES
@given(script=SCRIPTS)
def test_malformed_answerer_costs_only_its_own_link(world, script):
    world.run(world.rogue_answerer(script))
    assert not world.escaped, world.escaped[:3]


def test_after_the_fuzz_only_the_good_link_is_left(world):
    async def check() -> None:
        await eventually(lambda: len(world.b.links) == 1, timeout=5.0,
                         what="every rogue link closed")
        await roundtrip(*world.good, b"still good")

    world.run(check())
    assert not world.escaped, world.escaped[:3]
