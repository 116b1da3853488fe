"""Fixtures and hooks every test gets.

How tests run coroutines (one way): a test that awaits is an `async def` test function (or
fixture), and pytest-asyncio runs it (`asyncio_mode = "auto"` in pyproject.toml, so no marker
is needed) on a new event loop per test. That loop is uvloop's, the loop the `isthmus` command
installs for the gateway and the federation (`pytest_asyncio_loop_factories` below). Do not
write `asyncio.run(...)`, `uvloop.run(...)` or `asyncio.Runner` in a test.
- Data-plane tests that want an `AsyncExitStack` and a hard time bound use `@on_uvloop` from
  tests/helpers/loops.py; it is a decorator on that same runner, not a runner of its own.
- A test that must run on both loops marks itself
  `@pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])` (one run per loop).
- A Hypothesis `@given` test may be `async def` too (every example runs on the test's loop).
- Outside this rule, as they are not coroutine tests: the sync tests of
  tests/integration/test_drill_cli.py, whose module-scoped topology keeps its backends on a loop
  in a background thread; tests/federation/test_http_serving.py's `run(loop_factory, coro)`,
  which predates the both-loops marker above (to be moved onto it).
"""

import asyncio

import pytest
import uvloop

from federation.logs import LogLimiter

LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


def pytest_asyncio_loop_factories(config, item):
    """uvloop for every async test; both loops only for a test whose asyncio marker asks."""
    marker = item.get_closest_marker("asyncio")
    if marker is not None and marker.kwargs.get("loop_factories"):
        return LOOPS
    return {"uvloop": LOOPS["uvloop"]}


@pytest.fixture(autouse=True)
def _fresh_log_budgets():
    """Rate-limited log lines are per process: a test must not spend the next test's budget."""
    LogLimiter.reset_all()
    yield
