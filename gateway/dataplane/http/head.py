"""HTTP/1.1 message heads as the proxy writes them: hop-by-hop headers out, our framing in.

Header names arrive lowercased (session.py lowers them once, in on_header) and go out that way,
as HAProxy and Envoy send them; HTTP header names are case-insensitive (RFC 9110 5.1).

Hop-by-hop headers (RFC 9110 7.6.1) belong to one connection, so they are never forwarded:
Connection and every header it names, Keep-Alive, Proxy-Connection, TE, Trailer,
Transfer-Encoding (each side gets our own framing: Content-Length as it came, or chunked) and
Upgrade (upgrades are not proxied: the upstream never sees one). `Expect` is answered by this
proxy (100 Continue once a backend is connected), so it is not forwarded either.
"""

from __future__ import annotations

from http import HTTPStatus

from gateway.core import routes as rt

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade", b"expect"})
CHUNKED_END = b"0\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


HOP_BY_HOP_AND_TRACE = HOP_BY_HOP | {b"traceparent", b"tracestate"}  # a request's, replaced


def dropped_with(connection: bytes | None) -> frozenset[bytes]:
    """The hop-by-hop names, with those a Connection header's value lists."""
    if not connection:
        return HOP_BY_HOP
    named = {t.strip().lower() for t in connection.split(b",")} - {b"close", b"keep-alive", b""}
    return HOP_BY_HOP | named if named else HOP_BY_HOP


def strip_hop_by_hop(headers: list[tuple[bytes, bytes]], connection: bytes | None
                     ) -> list[tuple[bytes, bytes]]:
    """`headers` without hop-by-hop ones (those `connection`'s value names included)."""
    drop = dropped_with(connection)
    return [h for h in headers if h[0] not in drop]


def request_head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def response_head(status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    parts = [b"HTTP/1.1 ", str(status).encode(), b" ", reason, b"\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def reason_of(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


def local_response(status: int, body: bytes, headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
                   close: bool = False, head: bool = False) -> bytes:
    """A response the proxy makes itself (errors, redirects): a body with its length, plain
    text unless `headers` give its content-type."""
    typed = any(n == b"content-type" for n, _ in headers)
    hs = [*([] if typed else [(b"content-type", b"text/plain; charset=utf-8")]),
          (b"content-length", str(len(body)).encode()), *headers]
    if close:
        hs.append((b"connection", b"close"))
    out = response_head(status, reason_of(status), hs)
    return out if head else out + body


def modify_headers(headers: list[tuple[bytes, bytes]], mod: rt.HeaderModifier
                   ) -> list[tuple[bytes, bytes]]:
    """core.routes.modify_headers on the wire form (names lowercase)."""
    got = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]
    return [(n.lower().encode("latin-1"), v.encode("latin-1"))
            for n, v in rt.modify_headers(got, mod)]
