"""The east-west link protocol between gateways, spoken inside mutual TLS 1.3. Pure codec.

Frames (all big-endian):  type (1 byte) | stream id (4 bytes) | length (4 bytes) | payload

    OPEN   caller -> answerer   {"v":2,"service":"<ns>/<name>"}; the caller picks odd ids, rising,
                                at most MAX_STREAM_ID (then it dials a new link)
    OK     answerer -> caller   {"endpoint": key}: the answerer reached a local endpoint
    ERR    answerer -> caller   {"code","error"}: refused (forbidden, unknown-service,
                                no-endpoint, draining, degraded, busy, unsupported-version);
                                the caller fails over.
                                On stream 0, code "goaway": open no new streams on this link
    DATA   both ways            bytes of the stream
    EOF    both ways            this direction is done (half-close; TLS itself cannot)
    RST    both ways            the stream is over: close after flushing what was received
    WINDOW both ways            4-byte credit: the receiver consumed that many bytes
    PING / PONG (stream 0)      liveness, opaque payload (<= 64 bytes) echoed

Frames are bounded (MAX_FRAME, MAX_CONTROL); a peer that sends a bigger one, an unknown type or
malformed control JSON is cut off with a reason naming what it sent. How streams share a link
and how flow control works is gateway/dataplane/mux.py's docstring.

A bad OPEN is one of two things (`check_open_id`, `parse_open`):

* a **protocol violation**, and the link is cut (LinkProtocolError): a stream id that is even,
  not above every id opened before, or above MAX_STREAM_ID (ids are the framing's own
  bookkeeping; a caller that runs out of them must dial a new link), or a payload that is not
  a JSON object. Nothing the peer sends after that can be trusted to line up.
* a **refusal** of that one stream, and the link survives (OpenRefused, answered with ERR
  `unsupported-version`): a well-framed OPEN whose `"v"` is missing or not VERSION. Frames
  themselves are not versioned, so the other streams are fine; a caller of another version
  fails over as for any ERR. The error quotes the version the peer sent.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from federation.logs import quote
from gateway.errors import LinkProtocolError, OpenRefused

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


def check_open_id(sid: int, last_open: int) -> None:
    """An OPEN's stream id must be odd, above `last_open` and at most MAX_STREAM_ID."""
    if sid > MAX_STREAM_ID:
        raise LinkProtocolError(f"OPEN with stream id {sid} (max {MAX_STREAM_ID}: dial a new link)")
    if sid % 2 == 0 or sid <= last_open:
        raise LinkProtocolError(
            f"OPEN with stream id {sid} after {last_open} (callers open new odd ids, rising)")


def parse_open(sid: int, payload: bytes) -> dict[str, Any]:
    """The request of an OPEN on stream `sid`: LinkProtocolError if it is not a JSON object,
    OpenRefused("unsupported-version") if its version is not ours."""
    obj = parse_control(OPEN, payload)
    if "v" not in obj:
        raise OpenRefused("unsupported-version", f"OPEN on stream {sid} has no version "
                          f"\"v\" (this gateway speaks {VERSION})")
    v = obj["v"]
    if type(v) is not int or v != VERSION:
        raise OpenRefused("unsupported-version",
                          f"OPEN on stream {sid}: version {quote(json.dumps(v), 64)} is not "
                          f"supported (this gateway speaks {VERSION})")
    return obj


class FrameReader:
    """Accumulates bytes and yields complete (type, stream, payload) frames.

    A bulk transfer hands this ~256 KiB chunks, each holding a few big DATA frames and the head
    of the next. So nothing is re-copied per frame: frames are parsed from a memoryview of the
    chunk and a DATA payload is a read-only memoryview slice of it (no copy; it pins the chunk
    until the consumer is done, which flow control bounds to a window). Control payloads are
    small and become bytes. The tail of a chunk (a partial frame) is kept as a view; the parts
    of a frame that spans chunks are joined once, when it is complete."""

    __slots__ = ("_parts", "_have", "_need")

    def __init__(self) -> None:
        self._parts: list[Any] = []  # a partial frame, in pieces
        self._have = 0  # bytes in _parts
        self._need = 0  # the whole frame's size once its header is in, else 0

    def feed(self, data: bytes) -> list[tuple[int, int, Any]]:
        parts = self._parts
        if parts:
            parts.append(data)
            self._have += len(data)
            if not self._need:
                if self._have < 9:
                    return []
                head = parts[0] if len(parts[0]) >= 9 else b"".join(parts)
                self._need = 9 + _check(*HEADER.unpack_from(head))
            if self._have < self._need:
                return []
            data = b"".join(parts)
            self._parts = []
            self._have = self._need = 0
        out: list[tuple[int, int, Any]] = []
        view = memoryview(data).toreadonly()
        pos, end = 0, len(data)
        unpack = HEADER.unpack_from
        append = out.append
        while end - pos >= 9:
            kind, stream, length = unpack(data, pos)
            if kind != DATA:
                _check(kind, stream, length)
            elif length > MAX_FRAME:
                _check(kind, stream, length)
            stop = pos + 9 + length
            if stop > end:
                self._need = 9 + length
                break
            append((kind, stream,
                    view[pos + 9 : stop] if kind == DATA else bytes(view[pos + 9 : stop])))
            pos = stop
        if pos < end:
            self._parts = [view[pos:]]
            self._have = end - pos
        return out

    @property
    def pending(self) -> int:
        return self._have


def _check(kind: int, stream: int, length: int) -> int:
    if kind not in NAMES:
        raise LinkProtocolError(f"unknown frame type {kind}")
    if length > MAX_FRAME:
        raise LinkProtocolError(f"{NAMES[kind]} frame of {length} bytes (max {MAX_FRAME})")
    return length
