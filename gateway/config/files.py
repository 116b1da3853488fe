"""Service files: finding them (the gateway file's `services_dir`) and reading one.

`services_dir` is a directory (every `*.yaml` / `*.yml` file directly in it) or a list of glob
patterns, relative to the gateway file. At most MAX_SERVICE_FILES files, each bounded like the
gateway file (reader.read_text), sorted by path so every run reads them in the same order.

A service file holds only `exports`, `imports` and `policies` (policy_objects.py), read by the
same readers as the gateway file's inline sections, one reader per file so every problem names
its own file and line.

`watched_dirs` and `may_be_read` tell the live reload (gateway/control/reload.py) where to
watch and which changes matter.

Pure apart from listing the directory or globs and reading the files: no asyncio, socket, time.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from yaml.nodes import Node, ScalarNode

from gateway.config.policy_objects import parse_policies
from gateway.config.policy_values import Policy
from gateway.config.reader import Field, Reader, Table, read_text
from gateway.config.services import MAX_EXPORTS, Services
from gateway.config.values import ExportConfig, ImportConfig
from gateway.errors import ConfigError, Problem

MAX_SERVICE_FILES = 256
MAX_PATTERNS = 64
SUFFIXES = (".yaml", ".yml")

SERVICE_FILE: Table = (
    Field("exports", None, ()),
    Field("imports", None, ()),
    Field("policies", None, ()),
)


def services_dir(r: Reader, node: Node, path: str) -> Path | tuple[str, ...] | None:
    """The `services_dir` field: a directory (made absolute) or a tuple of glob patterns."""
    if isinstance(node, ScalarNode):
        return r.filepath(node, path)
    nodes = r.items(node, path, "glob patterns", MAX_PATTERNS)
    if nodes is None:
        return None
    out: list[str] = []
    for i, n in enumerate(nodes):
        value = r.string(n, f"{path}[{i}]")
        if value is None:
            return None
        if "\x00" in value:
            r.problem(n, f"{path}[{i}]", "a glob pattern cannot contain NUL characters")
            return None
        out.append(value)
    return tuple(out)


def find(
    spec: Path | tuple[str, ...], gateway: Path, shown: Path
) -> tuple[list[tuple[Path, str]], list[str], list[str]]:
    """The service files `spec` names: (absolute path, name to show in problems) sorted by
    path, plus problems and warnings (messages about the `services_dir` field). `gateway` is
    the gateway file (absolute; never a service file of its own), `shown` the path it was
    given as (service files are shown relative to it, as the operator wrote them)."""
    base, problems, warnings = gateway.parent, [], []
    found: set[Path] = set()
    if isinstance(spec, Path):
        try:
            names = [
                e.name for e in os.scandir(spec)
                if e.name.endswith(SUFFIXES) and not e.name.startswith(".") and e.is_file()
            ] if spec.is_dir() else None
        except OSError as e:
            names, problems = [], [f"cannot list {str(spec)!r}: {e.strerror or e}"]
        if names is None:
            return [], [f"{str(spec)!r} is not a directory"], []
        found = {spec / n for n in names}
    else:
        for pattern in spec:
            matched = 0
            full = pattern if os.path.isabs(pattern) else str(base / pattern)
            for m in glob.iglob(os.path.expanduser(full)):
                p = Path(os.path.abspath(m))
                if p.is_file():
                    found.add(p)
                    matched += 1
                if len(found) > MAX_SERVICE_FILES:
                    break
            if not matched:
                warnings.append(f"{pattern!r} matches no file")
    if len(found) > MAX_SERVICE_FILES:
        problems.append(f"more than {MAX_SERVICE_FILES} service files; at most "
                        f"{MAX_SERVICE_FILES} are read (merge some)")
        return [], problems, warnings
    if gateway in found:
        problems.append(f"includes the gateway file itself ({shown}); keep service files apart")
        found.discard(gateway)
    return [(p, _shown(p, base, shown.parent)) for p in sorted(found)], problems, warnings


def watched_dirs(spec: Path | tuple[str, ...] | None, gateway: Path,
                 files: tuple[Path, ...]) -> set[Path]:
    """The directories to watch (not recursively) to see every change that could change what
    `load_config(gateway)` reads: the gateway file's, the services directory, and for globs the
    fixed part of each pattern and the directories of the files it matched."""
    out = {gateway.parent, *(f.parent for f in files)}
    if isinstance(spec, Path):
        out.add(spec)
    elif spec is not None:
        for pattern in spec:
            full = Path(os.path.expanduser(pattern if os.path.isabs(pattern)
                                           else str(gateway.parent / pattern)))
            fixed = [part for part in full.parts[:-1]]
            for i, part in enumerate(fixed):
                if glob.has_magic(part):
                    fixed = fixed[:i]
                    break
            out.add(Path(*fixed) if fixed else gateway.parent)
    return out


def may_be_read(path: Path, spec: Path | tuple[str, ...] | None, gateway: Path,
                files: tuple[Path, ...]) -> bool:
    """Whether a change at `path` (absolute) can change what `load_config(gateway)` reads."""
    if path == gateway or path in files:
        return True
    if isinstance(spec, Path):
        return path.parent == spec and path.name.endswith(SUFFIXES)
    if spec is None:
        return False
    for pattern in spec:
        full = os.path.expanduser(pattern if os.path.isabs(pattern)
                                  else str(gateway.parent / pattern))
        if fnmatchcase(str(path), full):
            return True
    return False


def _shown(p: Path, base: Path, shown_base: Path) -> str:
    try:
        return str(shown_base / p.relative_to(base))
    except ValueError:
        return str(p)


@dataclass(frozen=True, slots=True)
class ServiceFile:
    """One service file read: its services, its YAML root (for the cross-file checks) and the
    problems and warnings found in it."""

    name: str  # as shown in problems
    path: Path  # absolute
    root: dict[str, Node]  # the top-level fields set
    exports: tuple[ExportConfig, ...]
    imports: tuple[ImportConfig, ...]
    problems: tuple[Problem, ...]
    warnings: tuple[Problem, ...]
    policies: tuple[Policy, ...] = ()
    first_order: int = 0  # Policy.order of this file's first entry


def read_service_file(
    path: Path, name: str, own: str | None, listeners: list[tuple[str, tuple[str, int]]],
    first_order: int = 0,
) -> ServiceFile:
    """Read one service file. `own` is the cluster's name (allowed_consumers always include
    it), `listeners` the gateway's own sockets (an endpoint must not point back at them),
    `first_order` the number of policies of the files read before this one."""
    reader = Services(name, path.parent)
    reader._listeners = list(listeners)
    root: dict[str, Node] = {}
    exports: tuple[ExportConfig, ...] = ()
    imports: tuple[ImportConfig, ...] = ()
    policies: tuple[Policy, ...] = ()
    try:
        text = read_text(path)
    except ConfigError as e:
        reader.problems += [Problem(name, p.line, p.path, p.message) for p in e.problems]
        text = None
    node = reader.compose(text) if text is not None else None
    sec = reader.section(node, "", SERVICE_FILE) if node is not None else None
    if sec is not None:
        root = sec.nodes
        if "exports" in root:
            exports = reader.exports(root["exports"], own)
        if "imports" in root:
            imports = reader.imports(root["imports"])
        if "policies" in root:
            policies = parse_policies(reader, root["policies"], "policies", first_order)
    return ServiceFile(name, path, root, exports, imports,
                       tuple(reader.problems), tuple(reader.warnings), policies,
                       first_order)


__all__ = ["MAX_EXPORTS", "MAX_SERVICE_FILES", "ServiceFile", "find", "read_service_file",
           "services_dir"]
