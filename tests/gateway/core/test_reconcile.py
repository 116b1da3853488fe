"""gateway/core/reconcile.py: what a reload changes, from two parsed configs (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.files import may_be_read, watched_dirs
from gateway.config.schema import parse_config
from gateway.core.reconcile import effective, moved_listeners, reconcile
from tests.gateway.config.samples import SRC, cfg


def imp(name: str, port: int, tiers: str = "[any]") -> str:
    return f"  - name: {name}\n    listen: 127.0.0.1:{port}\n    failover:\n      tiers: {tiers}\n"


def exp(name: str, *ports: int, interval: str = "5s") -> str:
    eps = "".join(f"      - 127.0.0.1:{p}\n" for p in ports)
    return (f"  - name: {name}\n    port: 8080\n    endpoints:\n{eps}"
            f"    health_check:\n      interval: {interval}\n")


def config(imports: str = "", exports: str = "", **more: str):
    text = cfg(**more)
    if exports:
        text += "exports:\n" + exports
    if imports:
        text += "imports:\n" + imports
    return parse_config(text, SRC)


def names(items) -> list[str]:
    return [x.name for x in items]


def test_nothing_changed_is_empty():
    a = config(imp("a", 16001), exp("e", 19001))
    ch = reconcile(a, config(imp("a", 16001), exp("e", 19001)))
    assert ch.empty and not ch.services and ch.summary() == "no service changed"


@pytest.mark.parametrize("old, new, added, removed, changed", [
    ([("a", 16001)], [("a", 16001), ("b", 16002)], ["b"], [], []),
    ([("a", 16001), ("b", 16002)], [("a", 16001)], [], ["b"], []),
    ([("a", 16001)], [("a", 16003)], ["a"], ["a"], []),  # moved: removed + added
    ([("a", 16001, "[any]")], [("a", 16001, "[cluster, any]")], [], [], ["a"]),
    ([("a", 16001)], [("b", 16001)], ["b"], ["a"], []),  # renamed at the same address
])
def test_imports(old, new, added, removed, changed):
    a = config("".join(imp(*i) for i in old))
    b = config("".join(imp(*i) for i in new))
    ch = reconcile(a, b)
    assert names(ch.imports_added) == added
    assert names(ch.imports_removed) == removed
    assert [n.name for _, n in ch.imports_changed] == changed
    assert not ch.exports_added and not ch.exports_removed and not ch.exports_changed
    assert ch.restart_needed == ()


def test_a_rename_at_the_same_address_is_a_moved_listener():
    ch = reconcile(config(imp("a", 16001)), config(imp("b", 16001) + imp("c", 16002)))
    assert moved_listeners(ch) == {("127.0.0.1", 16001)}


def test_a_protocol_change_reopens_the_listener_a_route_change_does_not():
    tcp = imp("a", 16001)
    http = tcp + "    protocol: http\n"
    routed = http + "    routes: [{name: r}]\n"
    ch = reconcile(config(tcp), config(http))
    assert (names(ch.imports_removed), names(ch.imports_added)) == (["a"], ["a"])
    assert moved_listeners(ch) == {("127.0.0.1", 16001)}
    ch = reconcile(config(http), config(routed))
    assert [n.name for _, n in ch.imports_changed] == ["a"] and not ch.imports_added


@pytest.mark.parametrize("old, new, added, removed, changed", [
    ([exp("e", 19001)], [exp("e", 19001), exp("f", 19002)], ["f"], [], []),
    ([exp("e", 19001), exp("f", 19002)], [exp("e", 19001)], [], ["f"], []),
    ([exp("e", 19001)], [exp("e", 19001, 19003)], [], [], ["e"]),  # another endpoint
    ([exp("e", 19001)], [exp("e", 19001, interval="1s")], [], [], ["e"]),  # health check
])
def test_exports(old, new, added, removed, changed):
    ch = reconcile(config(exports="".join(old)), config(exports="".join(new)))
    assert names(ch.exports_added) == added
    assert names(ch.exports_removed) == removed
    assert [n.name for _, n in ch.exports_changed] == changed
    assert not ch.imports_added and not ch.imports_removed


def test_summary_names_each_service_with_its_sign():
    a = config(imp("a", 16001) + imp("b", 16002, "[any]"), exp("e", 19001))
    b = config(imp("b", 16002, "[cluster, any]") + imp("c", 16003), exp("f", 19002))
    assert reconcile(a, b).summary() == (
        "imports +default/c -default/a ~default/b; exports +default/f -default/e")


def test_gateway_fields_need_a_restart_and_keep_their_running_values():
    a = config(imp("a", 16001))
    b = config(imp("a", 16001) + imp("b", 16002),
               **{"inbound: 127.0.0.1:15443": "inbound: 127.0.0.1:15444",
                  "zone: a": "zone: b"})
    ch = reconcile(a, b)
    assert ch.restart_needed == ("cluster", "listen")
    assert names(ch.imports_added) == ["b"]
    run = effective(a, b)
    assert run.listen == a.listen and run.cluster == a.cluster
    assert names(run.imports) == ["a", "b"]


def test_reload_section_drain_time_is_live_the_watch_is_not():
    a = config(imp("a", 16001))
    b = parse_config(cfg() + "reload:\n  watch: poll\n  drain_timeout: 5s\n"
                     + "imports:\n" + imp("a", 16001), SRC)
    ch = reconcile(a, b)
    assert ch.restart_needed == ("reload.watch",) and ch.other and not ch.services
    run = effective(a, b)
    assert run.reload.watch == "auto" and run.reload.drain_timeout == 5.0


def test_policy_change_alone_is_other():
    a = config(imp("a", 16001))
    b = parse_config(cfg() + "policy:\n  max_endpoints: 3\nimports:\n" + imp("a", 16001), SRC)
    ch = reconcile(a, b)
    assert ch.other and not ch.services and not ch.restart_needed and not ch.empty


# -- where the reload watches (gateway/config/files.py) ----------------------------------------

GW = Path("/etc/isthmus/gw.yaml")


def test_watched_dirs_of_a_services_directory():
    spec = Path("/etc/isthmus/services")
    assert watched_dirs(spec, GW, ()) == {Path("/etc/isthmus"), spec}
    assert may_be_read(Path("/etc/isthmus/services/a.yaml"), spec, GW, ())
    assert may_be_read(Path("/etc/isthmus/services/a.yml"), spec, GW, ())
    assert not may_be_read(Path("/etc/isthmus/services/.a.yaml.swp"), spec, GW, ())
    assert not may_be_read(Path("/etc/isthmus/services/sub/a.yaml"), spec, GW, ())
    assert may_be_read(GW, spec, GW, ())
    assert not may_be_read(Path("/etc/isthmus/other.yaml"), spec, GW, ())


def test_watched_dirs_of_globs():
    spec = ("teams/*/services.yaml", "/srv/extra/*.yaml")
    files = (Path("/etc/isthmus/teams/a/services.yaml"),)
    assert watched_dirs(spec, GW, files) == {
        Path("/etc/isthmus"), Path("/etc/isthmus/teams"), Path("/etc/isthmus/teams/a"),
        Path("/srv/extra")}
    assert may_be_read(Path("/etc/isthmus/teams/b/services.yaml"), spec, GW, files)
    assert may_be_read(Path("/srv/extra/x.yaml"), spec, GW, files)
    assert not may_be_read(Path("/srv/extra/x.txt"), spec, GW, files)


def test_without_service_files_only_the_gateway_file_matters():
    assert watched_dirs(None, GW, ()) == {Path("/etc/isthmus")}
    assert may_be_read(GW, None, GW, ())
    assert not may_be_read(Path("/etc/isthmus/x.yaml"), None, GW, ())
