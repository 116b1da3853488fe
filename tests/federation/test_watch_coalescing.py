"""The catalog watch coalesces bursts (federation/server/catalog.py, "Coalescing"): a burst of
changes reaches a polling watcher in a few answers rather than one per change, every change
once and in order; a change after a quiet spell is answered at once, alone."""

from __future__ import annotations

import asyncio
import time

from federation.server.catalog import DEBOUNCE, DEBOUNCE_MAX
from tests.helpers.federation import make_cluster

BURST = 20


async def test_a_burst_comes_in_a_few_answers_and_a_lone_change_at_once(make_fed):
    fed = await make_fed(lease_ttl=30.0)
    east = make_cluster("east-1")
    c = await fed.join(east)
    await c.grant_lease("east-1")
    watcher = fed.client(east.svid)
    after = (await c.catalog()).revision
    answers: list[list[int]] = []
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal after
        while not done.is_set():
            after, events = await watcher.watch(after, 2.0)
            if events:
                answers.append([e.revision for e in events])

    task = asyncio.create_task(watch())
    await asyncio.sleep(2 * DEBOUNCE)  # quiet before
    wrote = []
    for i in range(BURST):  # a change every 20 ms: a burst (gaps well under DEBOUNCE)
        wrote.append(await c.put_export(east.export("web", 9000 + i)))
        await asyncio.sleep(0.02)
    await asyncio.sleep(DEBOUNCE_MAX + 2 * DEBOUNCE)  # the burst's last answer has gone out
    burst_answers = len(answers)
    lone = await c.put_export(east.export("web", 8000))  # after a quiet spell
    t = time.monotonic()
    while not answers or answers[-1][-1] != lone:
        await asyncio.sleep(0.005)
    took = time.monotonic() - t
    done.set()
    await task
    seen = [r for a in answers for r in a]
    assert seen == wrote + [lone], "every change once, in order"
    assert 2 <= burst_answers <= 6, f"{BURST} changes came in {burst_answers} answers: {answers}"
    assert answers[-1] == [lone]
    print(f"\n{BURST} changes in {burst_answers} answers; a lone change answered in "
          f"{took * 1000:.0f} ms")
    assert took < DEBOUNCE, "a lone change after a quiet spell is not held back"
