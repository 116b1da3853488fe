"""The east-west link protocol between gateways, spoken inside mutual TLS 1.3. Pure codec.

Theory of operation
-------------------
A link carries one proxied connection (a stream). After the TLS handshake, in which both sides
present SVIDs and check each other against the bundle of the *claimed* trust domain, everything
is a frame:

    +--------+-------------------+----------------------+
    | type 1B| length 4B (big e.)| payload (length B)   |
    +--------+-------------------+----------------------+

The caller sends OPEN {"v":1, "service":"<ns>/<name>"}; the answering gateway authorizes the
caller's cluster for that export, connects to one of its healthy local endpoints (with
connect-time failover among them) and answers OK {"cluster", "endpoint"} or
ERR {"code", "error"}. Only after OK does the caller commit the client connection to this link,
so a remote gateway without a healthy endpoint costs the client nothing: the caller tries its
next candidate. Then DATA frames carry bytes both ways and EOF half-closes one direction (TLS
transports cannot half-close, so it has to be a frame). Closing the TLS connection ends the
stream. PING/PONG answers liveness probes without touching any endpoint.

Frames are bounded (MAX_FRAME); a peer that sends a bigger one, an unknown type, or anything
but OPEN/PING first is cut off with a reason naming what it sent.
"""

from __future__ import annotations

import json
import struct
from typing import Any

OPEN, OK, ERR, DATA, EOF, PING, PONG = 1, 2, 3, 4, 5, 6, 7
NAMES = {OPEN: "OPEN", OK: "OK", ERR: "ERR", DATA: "DATA", EOF: "EOF", PING: "PING", PONG: "PONG"}
HEADER = struct.Struct("!BI")
MAX_FRAME = 1 << 20
MAX_CONTROL = 4096  # OPEN/OK/ERR payloads are small JSON objects
VERSION = 1


class LinkProtocolError(Exception):
    """The peer broke the link protocol; the message says how."""


def frame(kind: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def control(kind: int, obj: dict[str, Any]) -> bytes:
    return frame(kind, json.dumps(obj, separators=(",", ":")).encode())


def parse_control(kind: int, payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_CONTROL:
        raise LinkProtocolError(f"{NAMES[kind]} frame of {len(payload)} bytes (max {MAX_CONTROL})")
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):  # RecursionError: nesting too deep for the decoder
        raise LinkProtocolError(f"{NAMES[kind]} frame is not JSON") from None
    if not isinstance(obj, dict):
        raise LinkProtocolError(f"{NAMES[kind]} frame is not a JSON object")
    return obj


class FrameReader:
    """Accumulates bytes and yields complete (type, payload) frames."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf
        buf += data
        out: list[tuple[int, bytes]] = []
        pos = 0
        end = len(buf)
        while end - pos >= 5:
            kind, length = HEADER.unpack_from(buf, pos)
            if kind not in NAMES:
                raise LinkProtocolError(f"unknown frame type {kind}")
            if length > MAX_FRAME:
                raise LinkProtocolError(f"{NAMES[kind]} frame of {length} bytes (max {MAX_FRAME})")
            if end - pos - 5 < length:
                break
            out.append((kind, bytes(buf[pos + 5 : pos + 5 + length])))
            pos += 5 + length
        if pos:
            del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)
