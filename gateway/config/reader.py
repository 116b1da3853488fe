"""Reading a config file: bounded bytes, YAML nodes with line numbers, typed getters, problems.

The text is *composed* into PyYAML nodes rather than loaded into plain dicts, so every value
still knows the line it came from. A `Reader` walks the nodes with a field table per section
(`Field`: name, parser with its bounds, default, doc; the tables are in schema.py):

* `section` checks a mapping's field names against its table (unknown, duplicate and missing
  fields are problems; a field set to `null` counts as "not set", so its default applies), and
  `parse` runs each field's parser or applies its default;
* each parser is one typed getter (string, name, integer, duration, host:port, path, ...) that
  records a `Problem` (`FILE:LINE: path: message`) and returns None instead of raising, so one
  pass reports everything.

Pure apart from `read_text` reading the one file: no asyncio, socket, time or random.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from federation.errors import InputError
from federation.fields import check_name
from federation.units import format_duration, parse_duration, parse_hostport
from gateway.errors import ConfigError, Problem

MAX_FILE_BYTES = 1024 * 1024
REQUIRED: Any = object()  # the default of a field that must be set


DAY = 86400.0  # seconds, for the duration bounds of the field tables


@dataclass(frozen=True, slots=True)
class Field:
    """One field of a section. `parse(reader, node, path)` returns the value or None (after
    recording a problem); None as parser: the section's builder reads the field itself
    (it depends on other fields). `default` applies when the field is not set."""

    name: str
    parse: Callable[[Reader, Node, str], Any] | None
    default: Any = REQUIRED
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


Table = tuple[Field, ...]


def defaults(table: Table) -> dict[str, Any]:
    """Field name -> default: the value of a section that is not in the file."""
    return {f.name: f.default for f in table}


@dataclass(slots=True)
class Section:
    """One mapping being read: its value nodes by field name (null ones left out), the values
    parsed so far (defaults applied), and the fields that are wrong or missing."""

    node: Node
    path: str
    nodes: dict[str, Node]
    values: dict[str, Any] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.failed

    def where(self, name: str) -> str:
        return _join(self.path, name)


def integer(lo: int, hi: int) -> Callable[[Reader, Node, str], int | None]:
    return lambda r, node, path: r.integer(node, path, lo, hi)


def duration(
    *, minimum: float = 0.0, maximum: float, zero_ok: bool = False
) -> Callable[[Reader, Node, str], float | None]:
    return lambda r, node, path: r.duration(
        node, path, minimum=minimum, maximum=maximum, zero_ok=zero_ok
    )


def choice(allowed: tuple[str, ...], what: str) -> Callable[[Reader, Node, str], str | None]:
    return lambda r, node, path: r.choice(node, path, allowed, what)


def read_text(path: str | os.PathLike[str]) -> str:
    """The text of one config file, bounded in size and checked to be UTF-8. Every failure is a
    ConfigError naming the file (and the line of a bad byte)."""
    p = Path(path)
    name = str(path)

    def fail(message: str, line: int | None = None) -> ConfigError:
        return ConfigError([Problem(name, line, "", message)])

    try:
        with open(p, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise fail("file not found") from None
    except IsADirectoryError:
        raise fail("is a directory, not a config file") from None
    except PermissionError:
        raise fail("cannot read the file: permission denied") from None
    except OSError as e:
        raise fail(f"cannot read the file: {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:
        raise fail("file is larger than 1 MiB; a gateway config is never that big")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise fail(
            f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})", line
        ) from None
    return text


class Reader:
    def __init__(self, file: str, base: Path):
        self.file = file
        self.base = base
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []
        self._ctor = SafeConstructor()

    # -- plumbing ----------------------------------------------------------------------------

    def problem(self, node: Node | None, path: str, message: str) -> None:
        self.problems.append(Problem(self.file, _line(node), path, message))

    def warn(self, node: Node | None, path: str, message: str) -> None:
        self.warnings.append(Problem(self.file, _line(node), path, message))

    def compose(self, text: str) -> Node | None:
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = mark.line + 1 if mark is not None else None
            what = " ".join(s for s in (e.context, e.problem) if s)
            self.problems.append(Problem(self.file, line, "", f"not valid YAML: {what}"))
            return None
        except yaml.reader.ReaderError as e:
            line = text[: e.position].count("\n") + 1 if isinstance(e.position, int) else None
            char = _char(e.character)
            message = f"not valid YAML: character {char!r} is not allowed in a YAML file"
            self.problems.append(Problem(self.file, line, "", message))
            return None
        except yaml.YAMLError as e:
            msg = " ".join(str(e).split())
            self.problems.append(Problem(self.file, None, "", f"not valid YAML: {msg}"))
            return None
        if root is None or _is_null(root):
            message = "the file is empty; see the config reference in README.md"
            self.problems.append(Problem(self.file, None, "", message))
            return None
        return root

    def scalar(self, node: ScalarNode) -> Any:
        try:
            return self._ctor.construct_object(node)
        # PyYAML's constructors raise plain ValueError/IndexError/... on a tagged scalar they
        # cannot build (`!!int ~`, `!!float ''`): as for a YAMLError, the text is the value
        # (the field's parser then says what is wrong with it)
        except (yaml.YAMLError, ValueError, TypeError, IndexError, OverflowError):
            self._ctor.recursive_objects.clear()  # what the failed construction left behind
            return node.value

    def describe(self, node: Node) -> str:
        if isinstance(node, MappingNode):
            return "a mapping"
        if isinstance(node, SequenceNode):
            return "a list"
        value = self.scalar(node)
        if value is None:
            return "null"
        if isinstance(value, bool):
            return f"boolean {str(value).lower()}"
        if isinstance(value, int):
            return f"integer {value}"
        if isinstance(value, float):
            return f"number {value:g}"
        if isinstance(value, str):
            return f"string {value!r}"
        return f"{type(value).__name__} {node.value!r}"

    def section(
        self, node: Node, path: str, table: Table, *, parse: bool = True
    ) -> Section | None:
        """Check a mapping's field names against its table; with `parse`, read every field
        that has a parser (see `parse`). None when the node is not a mapping."""
        fields = [f.name for f in table]
        required = {f.name for f in table if f.required}
        if not isinstance(node, MappingNode):
            self.problem(
                node,
                path,
                f"expected a mapping with fields {', '.join(fields)}; got {self.describe(node)}",
            )
            return None
        out: dict[str, Node] = {}
        seen: dict[str, Node] = {}
        missing: set[str] = set()
        for key, value in node.value:
            if not (isinstance(key, ScalarNode) and key.tag == "tag:yaml.org,2002:str"):
                self.problem(key, path, f"field names must be strings, got {self.describe(key)}")
                continue
            name = key.value
            where = _join(path, name)
            if name in seen:
                self.problem(key, where, f"duplicate field (first set on line {_line(seen[name])})")
                continue
            seen[name] = key
            if name not in fields:
                self.problem(
                    key, where, f"unknown field {name!r} (allowed here: {', '.join(fields)})"
                )
                continue
            if _is_null(value):
                if name in required:
                    self.problem(value, where, "required, but empty")
                    missing.add(name)
                continue
            out[name] = value
        for name in fields:
            if name in required and name not in seen:
                self.problem(node, _join(path, name), "missing required field")
                missing.add(name)
        section = Section(node, path, out, failed=missing)
        if parse:
            self.parse(section, table)
        return section

    def parse(self, section: Section, table: Table) -> None:
        """Read the fields of `table` that have a parser into `section.values`: the parsed value
        of a field that is set, the default of one that is not (null counts as not set). A
        field whose value is wrong (its problem recorded) goes into `section.failed`."""
        for f in table:
            if f.parse is None:
                continue
            node = section.nodes.get(f.name)
            if node is None:
                if not f.required:
                    section.values[f.name] = f.default
                continue
            value = f.parse(self, node, _join(section.path, f.name))
            if value is None:
                section.failed.add(f.name)
            section.values[f.name] = value

    def items(self, node: Node, path: str, what: str, maximum: int) -> list[Node] | None:
        if not isinstance(node, SequenceNode):
            self.problem(node, path, f"expected a list of {what}, got {self.describe(node)}")
            return None
        if len(node.value) > maximum:
            self.problem(node, path, f"{len(node.value)} {what}, at most {maximum} allowed")
            return None
        return list(node.value)

    # -- typed getters -----------------------------------------------------------------------

    def string(self, node: Node, path: str) -> str | None:
        if isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:str":
            if node.value.strip():
                return node.value
            self.problem(node, path, "must not be empty")
            return None
        hint = ""
        if isinstance(node, ScalarNode):
            hint = f" (quote it if you mean the text: '{node.value}')"
        self.problem(node, path, f"expected a string, got {self.describe(node)}{hint}")
        return None

    def name(self, node: Node, path: str) -> str | None:
        value = self.string(node, path)
        if value is None:
            return None
        try:
            return check_name(value, path)
        except InputError as e:
            self.problem(node, path, str(e).removeprefix(f"{path}: "))
            return None

    def choice(self, node: Node, path: str, allowed: tuple[str, ...], what: str) -> str | None:
        value = self.string(node, path)
        if value is None:
            return None
        if value not in allowed:
            self.problem(node, path, f"{value!r} is not a supported {what} (use {_or(allowed)})")
            return None
        return value

    def boolean(self, node: Node, path: str) -> bool | None:
        value = self.scalar(node) if isinstance(node, ScalarNode) else None
        if not isinstance(value, bool):
            self.problem(node, path, f"expected true or false, got {self.describe(node)}")
            return None
        return value

    def integer(self, node: Node, path: str, lo: int, hi: int) -> int | None:
        value = self.scalar(node) if isinstance(node, ScalarNode) else None
        if not isinstance(value, int) or isinstance(value, bool):
            self.problem(node, path, f"expected a whole number, got {self.describe(node)}")
            return None
        if not lo <= value <= hi:
            self.problem(node, path, f"{value} is not in {lo}..{hi}")
            return None
        return value

    def duration(
        self,
        node: Node,
        path: str,
        *,
        minimum: float = 0.0,
        maximum: float,
        zero_ok: bool = False,
    ) -> float | None:
        if isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:str":
            raw: Any = node.value
        elif isinstance(node, ScalarNode):
            raw = self.scalar(node)
        else:
            self.problem(node, path, f"expected a duration like 5s, got {self.describe(node)}")
            return None
        try:
            value = parse_duration(raw)
        except InputError as e:
            self.problem(node, path, str(e))
            return None
        if value == 0 and not zero_ok:
            self.problem(node, path, f"{raw!r} must be more than 0")
            return None
        if value < minimum:
            self.problem(node, path, f"{raw!r} is too short: at least {format_duration(minimum)}")
            return None
        if value > maximum:
            self.problem(node, path, f"{raw!r} is too long: at most {format_duration(maximum)}")
            return None
        return value

    def hostport(self, node: Node, path: str) -> tuple[str, int] | None:
        if not (isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:str"):
            self.problem(
                node, path, f"expected host:port like 127.0.0.1:8080, got {self.describe(node)}"
            )
            return None
        try:
            return parse_hostport(node.value)
        except InputError as e:
            self.problem(node, path, str(e))
            return None

    def filepath(self, node: Node, path: str) -> Path | None:
        value = self.string(node, path)
        if value is None:
            return None
        if "\x00" in value:
            self.problem(node, path, "a file path cannot contain NUL characters")
            return None
        p = Path(value).expanduser()
        return Path(os.path.abspath(p if p.is_absolute() else self.base / p))

    def url(self, node: Node, path: str) -> str | None:
        value = self.string(node, path)
        if value is None:
            return None
        try:
            parts = urlsplit(value)
            port = parts.port
        except ValueError as e:
            self.problem(node, path, f"{value!r} is not a valid URL ({e})")
            return None
        if parts.scheme != "https":
            self.problem(
                node,
                path,
                f"{value!r} is not an https:// URL; the federation is only reached over TLS",
            )
            return None
        if not parts.hostname:
            self.problem(node, path, f"{value!r} has no host")
            return None
        if port == 0:
            self.problem(node, path, f"{value!r}: port 0 is not in 1..65535")
            return None
        if parts.query or parts.fragment or parts.username or parts.password:
            self.problem(
                node, path, f"{value!r}: write only https://host:port[/path], no user, query or #"
            )
            return None
        return value.rstrip("/")

    def payload(self, node: Node, path: str, limit: int) -> bytes | None:
        """Bytes of a probe, written as a YAML string: UTF-8, whitespace-only is fine (CR LF)."""
        if not (isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:str"):
            self.problem(
                node, path, f'expected a string like "PING\\r\\n", got {self.describe(node)}'
            )
            return None
        try:
            data = node.value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape like "\ud800"
            self.problem(node, path, "is not valid Unicode text")
            return None
        if not data:
            self.problem(node, path, "must not be empty")
            return None
        if len(data) > limit:
            self.problem(node, path, f"{len(data)} bytes (UTF-8), at most {limit} allowed")
            return None
        return data

    def unique_names(
        self, node: Node, path: str, what: str, limit: int, label: str = ""
    ) -> list[str] | None:
        """A list of distinct names; every bad or repeated item is a problem (None if any)."""
        nodes = self.items(node, path, what, limit)
        if nodes is None:
            return None
        out: list[str] = []
        ok = True
        for i, n in enumerate(nodes):
            name = self.name(n, f"{path}[{i}]")
            if name is None:
                ok = False
            elif name in out:
                self.problem(n, f"{path}[{i}]", f"{label}{name!r} is listed twice")
                ok = False
            else:
                out.append(name)
        return out if ok else None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _line(node: Node | None) -> int | None:
    return None if node is None else node.start_mark.line + 1


def _child(node: Node | None, key: str) -> Node | None:
    if not isinstance(node, MappingNode):
        return None
    for k, v in node.value:
        if isinstance(k, ScalarNode) and k.value == key:
            return v
    return None


def _quiet_name(node: Node | None) -> str | None:
    if not (isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:str"):
        return None
    try:
        return check_name(node.value, "")
    except InputError:
        return None


def _quiet_service(node: Node) -> tuple[str, str] | None:
    """(namespace, name) of an export or import entry when both are valid, else None."""
    ns_node = _child(node, "namespace")
    ns = "default" if ns_node is None or _is_null(ns_node) else _quiet_name(ns_node)
    name = _quiet_name(_child(node, "name"))
    return None if ns is None or name is None else (ns, name)


def _char(c: Any) -> str:
    return chr(c) if isinstance(c, int) else str(c)


def _quiet_hostport(node: Node | None) -> tuple[str, int] | None:
    if not (isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:str"):
        return None
    try:
        return parse_hostport(node.value)
    except InputError:
        return None


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _same_bind(a: str, b: str) -> bool:
    """Would binding both hosts on one port clash? A wildcard clashes with every address."""
    return a.lower() == b.lower() or _is_wildcard(a) or _is_wildcard(b)


def _or(options: tuple[str, ...]) -> str:
    quoted = [repr(o) for o in options]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _absolute(p: Path) -> Path:
    return Path(os.path.abspath(p.expanduser()))
