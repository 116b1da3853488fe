"""`on_uvloop`: the decorator of the data-plane tests, on the suite's one runner.

Every async test runs under pytest-asyncio (auto mode) on a fresh uvloop loop per test (see
tests/conftest.py). `on_uvloop` adds three things to such a test: its first parameter is an
`AsyncExitStack` closed when the test ends (callbacks run on the test's loop, before the loop
closes), the test body is bounded by TEST_TIMEOUT, and the loop is asserted to be uvloop's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect

import uvloop

TEST_TIMEOUT = 60.0


def on_uvloop(fn):
    """Run `async def test(stack, ...)` under pytest-asyncio with a stack and a time bound."""

    @functools.wraps(fn)
    async def run(*args, **kwargs):
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        async with contextlib.AsyncExitStack() as stack:
            return await asyncio.wait_for(fn(stack, *args, **kwargs), TEST_TIMEOUT)

    # pytest must not see the `stack` parameter as a fixture
    run.__signature__ = _without_first_param(fn)
    return run


def _without_first_param(fn):
    sig = inspect.signature(fn)
    return sig.replace(parameters=list(sig.parameters.values())[1:])
