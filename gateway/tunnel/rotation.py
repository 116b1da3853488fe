"""WireGuard key rotation on a schedule, with overlap (gateway/core/tunnel_peers.py says how
peers take it):

1. a new key pair is made and its public key announced in our record (`next_public_key`);
   peers add it as a peer that carries nothing yet;
2. after `rotation_overlap` (long enough for every peer to have seen the announcement) the
   device switches to the new private key (it handshakes with every peer at once: they know
   the key), the key file is replaced, and our record says `public_key` = the new key; peers
   then move our overlay address to it and drop the old key.

If the announcement cannot be published (federation unreachable), this rotation is skipped and
tried again one period later; once switched, the record is retried until it is taken (the
lease loop republishes it too). The private keys never leave the state dir and the device.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

from federation.errors import IsthmusError
from federation.model import Tunnel
from gateway.tunnel.device import WireguardDevice
from gateway.tunnel.keys import KeyPair, write

log = logging.getLogger("isthmus.gateway.tunnel")


class KeyRotation:
    def __init__(self, state_dir: Path, every: float, overlap: float, device: WireguardDevice,
                 current: Callable[[], Tunnel], publish: Callable[[Tunnel], Awaitable[None]]
                 ) -> None:
        self.state_dir = state_dir
        self.every = every
        self.overlap = overlap
        self.device = device
        self.current = current
        self.publish = publish
        self.rotations = 0
        self.skipped = 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            await self.rotate()

    async def rotate(self) -> bool:
        new = await asyncio.to_thread(KeyPair.generate)
        cur = self.current()
        try:
            await self.publish(replace(cur, next_public_key=new.public_b64))
        except IsthmusError as e:
            self.skipped += 1
            log.warning("tunnel key rotation skipped: cannot announce the next key (%s); "
                        "trying again in %gs", e, self.every)
            return False
        log.info("tunnel key rotation: next key %s… announced, switching in %gs",
                 new.public_b64[:8], self.overlap)
        await asyncio.sleep(self.overlap)
        await asyncio.to_thread(write, self.state_dir, new)
        await self.device.set_key(new)
        switched = Tunnel(new.public_b64, cur.endpoint, cur.overlay_address)
        delay = 0.2
        while True:
            try:
                await self.publish(switched)
                break
            except IsthmusError as e:
                log.warning("tunnel key rotation: switched to %s…, but the record is not taken "
                            "yet (%s); retrying", new.public_b64[:8], e)
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)
        self.rotations += 1
        log.info("tunnel key rotation: now using key %s… (rotation %d)", new.public_b64[:8],
                 self.rotations)
        return True
