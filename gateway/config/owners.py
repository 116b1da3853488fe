"""Who binds which socket and who declares which service, across the gateway file and its
service files: the cross-file rules of a split config.

Every record names its file and line, so a clash names both places. The records are taken from
the YAML nodes quietly (a value that is wrong on its own is its own file's problem, reported
once there). Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from yaml.nodes import Node, SequenceNode

from federation.units import format_hostport
from gateway.config.reader import _child, _line, _quiet_hostport, _quiet_service, _same_bind
from gateway.errors import Problem


@dataclass(frozen=True, slots=True)
class Listener:
    """One socket the gateway binds: the field that asks for it and where."""

    file: str
    line: int | None
    path: str  # listen.inbound, imports[2].listen, ...
    address: tuple[str, int]


@dataclass(frozen=True, slots=True)
class Declared:
    """One exports[] or imports[] entry with a valid namespace and name."""

    file: str
    line: int | None
    path: str  # exports[0]
    section: str  # "exports" | "imports"
    service: tuple[str, str]  # (namespace, name)


def _where(file: str, line: int | None) -> str:
    return file if line is None else f"{file}:{line}"


def import_listeners(file: str, imports: Node | None) -> list[Listener]:
    """The `listen` of every imports[] entry whose address is valid."""
    out: list[Listener] = []
    if isinstance(imports, SequenceNode):
        for i, item in enumerate(imports.value):
            n = _child(item, "listen")
            hp = _quiet_hostport(n)
            if n is not None and hp is not None:
                out.append(Listener(file, _line(n), f"imports[{i}].listen", hp))
    return out


def listener_clashes(found: list[Listener], *, skip_within: str | None = None) -> list[Problem]:
    """No two sockets may share a port (a wildcard clashes with every address). Each clash is
    reported once, on the later listener, naming the earlier one (and its file:line when it is
    in another file). Clashes between two listeners of file `skip_within` are left out (that
    file's own check reported them)."""
    out: list[Problem] = []
    for j, b in enumerate(found):
        host, port = b.address
        for a in found[:j]:
            if a.file == b.file == skip_within:
                continue
            if port == a.address[1] and _same_bind(host, a.address[0]):
                there = "" if a.file == b.file else f" in {_where(a.file, a.line)}"
                out.append(Problem(
                    b.file, b.line, b.path,
                    f"{format_hostport(host, port)!r} clashes with {a.path} "
                    f"({format_hostport(*a.address)}){there}; every listener needs its own port",
                ))
                break
    return out


def declared(file: str, section: str, entries: Node | None) -> list[Declared]:
    """The services a file's `exports` or `imports` list declares (valid names only)."""
    out: list[Declared] = []
    if isinstance(entries, SequenceNode):
        for i, item in enumerate(entries.value):
            key = _quiet_service(item)
            if key is not None:
                out.append(Declared(file, _line(item), f"{section}[{i}]", section, key))
    return out


def ownership_clashes(found: list[Declared]) -> list[Problem]:
    """Each service is exported (and imported) by one file: a second file declaring it is a
    problem in that file naming the first. Repeats within one file are that file's own check."""
    out: list[Problem] = []
    first: dict[tuple[str, tuple[str, str]], Declared] = {}
    for d in found:
        key = (d.section, d.service)
        owner = first.get(key)
        if owner is None:
            first[key] = d
        elif owner.file != d.file:
            verb = d.section.removesuffix("s")
            out.append(Problem(
                d.file, d.line, d.path,
                f"service {d.service[0]}/{d.service[1]} is already {verb}ed by "
                f"{_where(owner.file, owner.line)} ({owner.path}); each service is owned by "
                "one file",
            ))
    return out
