"""Pure parsers for the small units used in configs, CLIs and the wire: durations, host:port."""

from __future__ import annotations

import ipaddress
import re

from .errors import InputError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_SCALE = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | int | float) -> float:
    """'200ms', '5s', '1m', '24h' -> seconds. Bare numbers are refused: units are required."""
    if isinstance(text, bool) or not isinstance(text, str):
        raise InputError(f"{text!r} is not a duration: write it with a unit, like 200ms, 5s, 1m or 24h")
    m = _DURATION.match(text)
    if not m:
        raise InputError(f"{text!r} is not a duration: write it like 200ms, 5s, 1m or 24h")
    return float(m.group(1)) * _SCALE[m.group(2)]


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:g}s"
    if seconds < 7200:
        return f"{seconds / 60:g}m"
    return f"{seconds / 3600:g}h"


def parse_hostport(text: str) -> tuple[str, int]:
    """'127.0.0.1:80', '[::1]:80', 'localhost:80' -> (host, port). Ports 1..65535."""
    if not isinstance(text, str):
        raise InputError(f"{text!r} is not host:port")
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise InputError(f"{text!r} is not host:port (IPv6 is written [::1]:port)")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InputError(f"{text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise InputError(f"{text!r} is not host:port")
        if ":" in host:
            raise InputError(f"{text!r}: write IPv6 addresses in brackets, like [::1]:8080")
        if not re.fullmatch(r"[A-Za-z0-9.\-_]+", host):
            raise InputError(f"{text!r}: {host!r} is not a host name or IPv4 address")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"{text!r}: port {port!r} is not in 1..65535")
    return host, int(port)


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
