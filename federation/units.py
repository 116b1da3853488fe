"""Pure parsers for the small units used in configs, CLIs and the wire: integers, durations,
host:port.

Numbers are ASCII only. `str.isdigit()` and `int()` take far more than 0-9: superscripts ('²'
is a digit to isdigit() but int() refuses it), other scripts' digits ('٣٣' is 33 to int()),
signs, spaces and '_' ('+1', ' 1', '1_0'), and regex `\\d` matches every script's digits too.
Every number read from text (a path segment, a query parameter, a port, a config value) goes
through `parse_int` (`[0-9]+`) or `parse_decimal` (`[0-9]+(.[0-9]+)?`, no sign, exponent,
nan or inf, which `float()` would take); patterns that embed a number use `DECIMAL`.
"""

from __future__ import annotations

import ipaddress
import re

from federation.errors import InputError

DECIMAL = r"[0-9]+(?:\.[0-9]+)?"  # embed in patterns compiled with re.ASCII
_DIGITS = re.compile(r"[0-9]+")
_DECIMAL = re.compile(DECIMAL)
MAX_DIGITS = 19  # enough for every int64 (2**63-1 has 19 digits); bounds the work of int()
MAX_DECIMAL = 40
_DURATION = re.compile(rf"\s*({DECIMAL})\s*(ms|s|m|h)\s*", re.ASCII)
_SCALE = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_HOST = 253  # the longest DNS name

# host:port as a regular expression (for the OpenAPI document): every text it matches is taken
# by `parse_hostport` (tests check it), which also takes a few more (leading zeros in a port,
# IPv6 with an embedded IPv4 address).
_HEX4 = "[0-9A-Fa-f]{1,4}"
_IPV6 = "|".join((
    f"({_HEX4}:){{7}}{_HEX4}",
    f"({_HEX4}:){{1,7}}:",
    f"({_HEX4}:){{1,6}}:{_HEX4}",
    *(f"({_HEX4}:){{1,{n}}}(:{_HEX4}){{1,{7 - n}}}" for n in range(5, 0, -1)),
    f":((:{_HEX4}){{1,7}}|:)",
))
_PORT = "([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
HOSTPORT_PATTERN = f"([A-Za-z0-9._-]{{1,{MAX_HOST}}}|\\[({_IPV6})\\]):{_PORT}"


def _shown(text: object) -> str:
    """The bad input quoted for a message, cut at 40 characters."""
    if isinstance(text, str) and len(text) > 40:
        return repr(text[:40]) + "..."
    return repr(text)


def parse_int(text: str, what: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    """`text` as an integer in lo..hi, written with ASCII digits 0-9 only (no sign, space, '_'
    or digits of other scripts). InputError names `what` and quotes the text."""
    if not isinstance(text, str) or len(text) > MAX_DIGITS or not _DIGITS.fullmatch(text):
        raise InputError(f"{what}: {_shown(text)} is not a whole number (ASCII digits 0-9)")
    value = int(text)
    if not lo <= value <= hi:
        raise InputError(f"{what}: {value} is not in {lo}..{hi}")
    return value


def parse_decimal(text: str, what: str) -> float:
    """`text` as a non-negative number like 5, 0.25 or 99.9, in ASCII digits only (no sign,
    exponent, nan, inf or digits of other scripts). InputError names `what`."""
    if not isinstance(text, str) or len(text) > MAX_DECIMAL or not _DECIMAL.fullmatch(text):
        raise InputError(
            f"{what}: {_shown(text)} is not a number like 5 or 0.25 (ASCII digits 0-9)"
        )
    return float(text)


def parse_duration(text: str | int | float) -> float:
    """'200ms', '5s', '1m', '24h' -> seconds. Bare numbers are refused: units are required."""
    if isinstance(text, bool) or not isinstance(text, str):
        raise InputError(
            f"{text!r} is not a duration: write it with a unit, like 200ms, 5s, 1m or 24h"
        )
    m = _DURATION.fullmatch(text)
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
        if len(host) > MAX_HOST:
            raise InputError(f"{text[:40]!r}...: the host is longer than {MAX_HOST} characters")
    try:
        return host, parse_int(port, "port", 1, 65535)
    except InputError:
        hint = "" if _DIGITS.fullmatch(port) else " (a port is written in ASCII digits 0-9)"
        raise InputError(f"{text!r}: port {port!r} is not in 1..65535{hint}") from None


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
