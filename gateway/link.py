"""The east-west link protocol between gateways, spoken inside mutual TLS 1.3. Pure codec.

Frames (all big-endian):  type (1 byte) | stream id (4 bytes) | length (4 bytes) | payload

    OPEN   caller -> answerer   {"v":2,"service":"<ns>/<name>"}; the caller picks odd ids, rising
    OK     answerer -> caller   {"endpoint": key}: the answerer reached a local endpoint
    ERR    answerer -> caller   {"code","error"}: refused (forbidden, unknown-service,
                                no-endpoint, draining, degraded, busy); the caller fails over
    DATA   both ways            bytes of the stream
    EOF    both ways            this direction is done (half-close; TLS itself cannot)
    RST    both ways            the stream is over: close after flushing what was received
    WINDOW both ways            4-byte credit: the receiver consumed that many bytes
    PING / PONG (stream 0)      liveness, opaque payload (<= 64 bytes) echoed

Frames are bounded (MAX_FRAME, MAX_CONTROL); a peer that sends a bigger one, an unknown type or
malformed control JSON is cut off with a reason naming what it sent. How streams share a link
and how flow control works is gateway/mux.py's docstring.
"""

from __future__ import annotations

import json
import struct
from typing import Any

OPEN, OK, ERR, DATA, EOF, PING, PONG, RST, WINDOW = 1, 2, 3, 4, 5, 6, 7, 8, 9
NAMES = {OPEN: "OPEN", OK: "OK", ERR: "ERR", DATA: "DATA", EOF: "EOF", PING: "PING",
         PONG: "PONG", RST: "RST", WINDOW: "WINDOW"}
HEADER = struct.Struct("!BII")
CREDIT = struct.Struct("!I")
VERSION = 2
MAX_FRAME = 1 << 20
MAX_CONTROL = 4096
WINDOW_SIZE = 1024 * 1024
MAX_STREAMS = 100_000  # open streams per link
MAX_STREAM_ID = 2**31 - 1




class LinkProtocolError(Exception):
    """The peer broke the link protocol; the message says how."""


def frame(kind: int, stream: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, stream, len(payload)) + payload


def control(kind: int, stream: int, obj: dict[str, Any]) -> bytes:
    return frame(kind, stream, json.dumps(obj, separators=(",", ":")).encode())


def parse_control(kind: int, payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_CONTROL:
        raise LinkProtocolError(f"{NAMES[kind]} frame of {len(payload)} bytes (max {MAX_CONTROL})")
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise LinkProtocolError(f"{NAMES[kind]} frame is not JSON") from None
    if not isinstance(obj, dict):
        raise LinkProtocolError(f"{NAMES[kind]} frame is not a JSON object")
    return obj


class FrameReader:
    """Accumulates bytes and yields complete (type, stream, payload) frames."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        buf = self._buf
        if buf:
            buf += data
        else:
            buf = self._buf = bytearray(data)
        out: list[tuple[int, int, bytes]] = []
        pos, end = 0, len(buf)
        unpack = HEADER.unpack_from
        while end - pos >= 9:
            kind, stream, length = unpack(buf, pos)
            if kind not in NAMES:
                raise LinkProtocolError(f"unknown frame type {kind}")
            if length > MAX_FRAME:
                raise LinkProtocolError(f"{NAMES[kind]} frame of {length} bytes (max {MAX_FRAME})")
            if end - pos - 9 < length:
                break
            out.append((kind, stream, bytes(buf[pos + 9 : pos + 9 + length])))
            pos += 9 + length
        if pos:
            del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)
