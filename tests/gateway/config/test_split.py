"""Tests of the split config (issue 10): a gateway file with `services_dir` and `policy`, and
service files holding only exports and imports. Pure: tmp_path files and load_config."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from gateway.config.files import MAX_SERVICE_FILES
from gateway.config.schema import load_config, parse_config
from gateway.errors import ConfigError, Problem
from tests.gateway.config.samples import EXPORT, IMPORT, ROOT, cfg
from tests.helpers.processes import run_cli

SPLIT = ROOT / "examples" / "split"


def _write(tmp: Path, gateway: str, **files: str) -> Path:
    (tmp / "services").mkdir(exist_ok=True)
    for name, text in files.items():
        (tmp / "services" / f"{name}.yaml").write_text(text)
    gw = tmp / "gw.yaml"
    gw.write_text(gateway)
    return gw


def _problems(gw: Path) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        load_config(gw)
    return info.value.problems


def _where(p: Problem) -> tuple[str, int | None, str]:
    return Path(p.file).name, p.line, p.path


DIR = "services_dir: services\n"  # line 12 of cfg()


def test_split_equals_inline(tmp_path: Path) -> None:
    """The same services inline and in two service files make the same config, plus where
    each came from."""
    inline = parse_config(cfg(EXPORT + IMPORT), tmp_path / "gw.yaml")
    gw = _write(tmp_path, cfg(DIR), a=EXPORT, b=IMPORT)
    split = load_config(gw)
    a, b = tmp_path / "services" / "a.yaml", tmp_path / "services" / "b.yaml"
    assert split.service_files == (a, b)
    assert split.exports == inline.exports and split.imports == inline.imports
    assert replace(split, services_dir=None, service_files=(), service_sources=()) == inline
    src = split.source_of("exports", "default", "echo")
    assert src is not None and (src.file, src.line) == (a, 2)
    src = split.source_of("imports", "default", "echo")
    assert src is not None and (src.file, src.line) == (b, 2)
    # the inline form loads as before, its services' source being the gateway file
    (tmp_path / "inline.yaml").write_text(cfg(EXPORT + IMPORT))
    one = load_config(tmp_path / "inline.yaml")
    assert one.service_files == () and one.exports == inline.exports
    assert one.source_of("exports", "default", "echo").file == tmp_path / "inline.yaml"


def test_globs_sorted_and_deduplicated(tmp_path: Path) -> None:
    gw = _write(tmp_path, cfg('services_dir: ["services/b*.yaml", "services/*.yaml"]\n'),
                b=IMPORT, a=EXPORT)
    assert [p.name for p in load_config(gw).service_files] == ["a.yaml", "b.yaml"]


def test_duplicate_service_across_files_names_both(tmp_path: Path) -> None:
    gw = _write(tmp_path, cfg(DIR), a=EXPORT, b="# team b\n" + EXPORT)
    (p,) = _problems(gw)
    assert _where(p) == ("b.yaml", 3, "exports[0]")
    assert f"already exported by {tmp_path / 'services' / 'a.yaml'}:2 (exports[0])" in p.message


def test_duplicate_service_inline_and_in_a_file(tmp_path: Path) -> None:
    gw = _write(tmp_path, cfg(DIR + IMPORT), b=IMPORT.replace("16001", "16002"))
    (p,) = _problems(gw)
    assert _where(p) == ("b.yaml", 2, "imports[0]")
    assert f"already imported by {gw}:14 (imports[0])" in p.message


def test_listener_clash_across_files(tmp_path: Path) -> None:
    other = IMPORT.replace("name: echo", "name: other")
    admin = other.replace("name: other", "name: third").replace("127.0.0.1:16001", "0.0.0.0:15000")
    gw = _write(tmp_path, cfg(DIR), a=IMPORT, b=other, c=admin)
    found = _problems(gw)
    assert [_where(p) for p in found] == [("b.yaml", 3, "imports[0].listen"),
                                         ("c.yaml", 3, "imports[0].listen")]
    assert f"clashes with imports[0].listen (127.0.0.1:16001) in {tmp_path}/services/a.yaml:3" \
        in found[0].message
    assert f"clashes with listen.admin (127.0.0.1:15000) in {gw}:10" in found[1].message


POLICY = "policy:\n"  # line 13


@pytest.mark.parametrize("policy, text, where, words", [
    ("  namespaces: [shop]\n", EXPORT, (2, "exports[0].namespace"),
     "namespace 'default' is not allowed by policy.namespaces for this file (allowed: shop)"),
    ('  namespaces: {"services/x*.yaml": [default]}\n', EXPORT, (2, "exports[0].namespace"),
     "(allowed: none: no pattern matches services/a.yaml)"),
    ("  import_listen: [10.0.0.0/8, '::1/128']\n", IMPORT, (3, "imports[0].listen"),
     "'127.0.0.1:16001' is outside policy.import_listen (10.0.0.0/8, ::1/128)"),
    ("  import_listen: [127.0.0.0/8]\n", IMPORT.replace("127.0.0.1", "gw.local"),
     (3, "imports[0].listen"), "'gw.local' is not an IP address; policy.import_listen"),
    ("  max_endpoints: 1\n", EXPORT + "      - 127.0.0.1:19002\n", (5, "exports[0].endpoints"),
     "2 endpoints; policy.max_endpoints allows at most 1 per export"),
    ("  max_services_per_file: 1\n", EXPORT + IMPORT, (7, ""),
     "2 services (exports and imports); policy.max_services_per_file allows at most 1"),
])
def test_policy_rules(tmp_path: Path, policy: str, text: str, where: tuple, words: str) -> None:
    gw = _write(tmp_path, cfg(DIR + POLICY + policy), a=text)
    (p,) = _problems(gw)
    assert (Path(p.file).name, p.line, p.path) == ("a.yaml", *where)
    assert words in p.message, p.message


def test_policy_allows_and_binds_service_files_only(tmp_path: Path) -> None:
    """A file matching a namespaces pattern may export there; imports may name any namespace;
    the gateway file's own inline services are the admin's, not bound by the policy."""
    rules = ('  namespaces: {"services/a.yaml": [shop]}\n  import_listen: [127.0.0.0/8]\n'
             "  max_endpoints: 1\n")
    shop = EXPORT.replace("name: echo", "name: echo\n    namespace: shop")
    inline = EXPORT.replace("name: echo", "name: own") + "      - 127.0.0.1:19009\n"
    gw = _write(tmp_path, cfg(DIR + POLICY + rules + inline), a=shop, b=IMPORT)
    c = load_config(gw)
    assert [(e.namespace, e.name) for e in c.exports] == [("default", "own"), ("shop", "echo")]
    assert c.policy.max_endpoints == 1 and str(c.policy.import_listen[0]) == "127.0.0.0/8"


@pytest.mark.parametrize("policy, path, words", [
    ("  import_listen: [10.0.0.0/33]\n", "policy.import_listen[0]", "not a CIDR range"),
    ("  max_endpoints: 0\n", "policy.max_endpoints", "not in 1..1000"),
    ("  namespaces: shop\n", "policy.namespaces", "expected a list of namespaces or a mapping"),
    ("  bogus: 1\n", "policy.bogus", "unknown field"),
])
def test_policy_bad_values(policy: str, path: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(cfg(POLICY + policy), Path("/etc/gw.yaml"))
    (p,) = info.value.problems
    assert (p.line, p.path) == (13, path) and words in p.message, p


def test_too_many_service_files(tmp_path: Path) -> None:
    gw = _write(tmp_path, cfg(DIR))
    for i in range(MAX_SERVICE_FILES + 1):
        (tmp_path / "services" / f"s{i:03}.yml").write_text("imports: []\n")
    (p,) = _problems(gw)
    assert (p.file, p.line, p.path) == (str(gw), 12, "services_dir")
    assert f"more than {MAX_SERVICE_FILES} service files" in p.message


def test_missing_dir_and_gateway_file_itself(tmp_path: Path) -> None:
    gw = tmp_path / "gw.yaml"
    gw.write_text(cfg("services_dir: nope\n"))
    (p,) = _problems(gw)
    assert (p.line, p.path) == (12, "services_dir") and "is not a directory" in p.message
    gw.write_text(cfg("services_dir: .\n"))
    (p,) = _problems(gw)
    assert "includes the gateway file itself" in p.message


def test_broken_service_file_names_its_file(tmp_path: Path) -> None:
    """Problems in service files name their own file and line; the gateway's come first; a
    file that is not YAML, one too big and one with a bad value each report alone."""
    bad = EXPORT.replace("port: 8080", "port: 99999")
    gw = _write(tmp_path, cfg(DIR + "bogus: 1\n"), a="exports: [\n", b=bad,
                c="#" * (1024 * 1024 + 1))
    found = _problems(gw)
    assert [_where(p) for p in found] == [
        ("gw.yaml", 13, "bogus"), ("a.yaml", 2, ""), ("b.yaml", 3, "exports[0].port"),
        ("c.yaml", None, ""),
    ]
    assert "not valid YAML" in found[1].message and "larger than 1 MiB" in found[3].message
    assert str(found[2]).startswith(f"{tmp_path}/services/b.yaml:3: exports[0].port: ")


def test_unknown_field_in_service_file(tmp_path: Path) -> None:
    gw = _write(tmp_path, cfg(DIR), a=EXPORT + "cluster:\n  name: east-1\n")
    (p,) = _problems(gw)
    assert _where(p) == ("a.yaml", 6, "cluster")
    assert "unknown field 'cluster' (allowed here: exports, imports, policies)" in p.message


def test_endpoint_in_service_file_is_not_the_gateway(tmp_path: Path) -> None:
    gw = _write(tmp_path, cfg(DIR), a=EXPORT.replace("127.0.0.1:19001", "127.0.0.1:15443"))
    (p,) = _problems(gw)
    assert _where(p) == ("a.yaml", 5, "exports[0].endpoints[0]")
    assert "this gateway's own listen.inbound" in p.message


def test_split_example_loads() -> None:
    c = load_config(SPLIT / "gateway.yaml")
    assert [p.name for p in c.service_files] == ["team-a.yaml", "team-b.yaml"]
    assert [(e.namespace, e.name) for e in c.exports] == [("team-a", "echo")]
    assert [(i.namespace, i.name) for i in c.imports] == [("team-a", "echo")]


def test_cli_validates_a_split_config(tmp_path: Path) -> None:
    """`isthmus config validate` prints the gateway file and each service file; a problem in a
    service file exits 2 naming that file and line."""
    r = run_cli("config", "validate", str(SPLIT / "gateway.yaml"))
    assert r.returncode == 0, r.stderr
    assert "2 service file(s)" in r.stdout
    assert f"  {SPLIT / 'services' / 'team-b.yaml'}: ok (0 export(s), 1 import(s))" in r.stdout
    gw = _write(tmp_path, cfg(DIR), a=EXPORT.replace("port: 8080", "port: x"))
    r = run_cli("config", "validate", str(gw))
    assert r.returncode == 2
    assert r.stderr.startswith(f"{tmp_path}/services/a.yaml:3: exports[0].port: "), r.stderr
