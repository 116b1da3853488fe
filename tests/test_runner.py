"""The suite's one way of running coroutines (tests/conftest.py) holds: uvloop by default, both
loops when a test asks, and `on_uvloop` is a decorator on that runner."""

import asyncio

import pytest
import uvloop

from tests.helpers.loops import on_uvloop

SEEN: list[type] = []


async def test_an_async_test_runs_on_uvloop():
    """A plain `async def` test runs on a uvloop loop (1 of 1), with no marker."""
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


@pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])
async def test_a_test_can_ask_for_both_loops():
    """Asking for both loops runs the test twice, once per loop (2 loop classes seen)."""
    SEEN.append(type(asyncio.get_running_loop()))
    if len(SEEN) == 2:
        assert uvloop.Loop in SEEN and any(t is not uvloop.Loop for t in SEEN), SEEN


@on_uvloop
async def test_on_uvloop_gives_a_stack_closed_on_the_loop(stack, tmp_path):
    """`on_uvloop` passes an AsyncExitStack first and still resolves fixtures (tmp_path)."""
    loop = asyncio.get_running_loop()
    closed = []

    async def close() -> None:
        closed.append(asyncio.get_running_loop() is loop)

    stack.push_async_callback(close)
    assert tmp_path.exists() and isinstance(loop, uvloop.Loop)
