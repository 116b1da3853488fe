"""Fixtures of the federation tests: a running federation (`fed`), or a maker (`make_fed`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.helpers.federation import Fed


@pytest.fixture
async def make_fed(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Fed]]]:
    feds: list[Fed] = []

    async def make(**kw) -> Fed:
        fed = Fed(tmp_path, **kw)
        await fed.start()
        feds.append(fed)
        return fed

    yield make
    for fed in feds:
        await fed.stop()


@pytest.fixture
async def fed(make_fed) -> Fed:
    return await make_fed()
