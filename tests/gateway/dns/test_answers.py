"""gateway/dns/answers.py: the zone's records from the catalog and the imports (pure)."""

from __future__ import annotations

import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype as T
import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation.model import Catalog, ClusterRecord, Endpoint, Export, FailoverPolicy
from gateway.config.values import ImportConfig
from gateway.dns.answers import DnsSettings, build, resolve

ME = "east-1"


def catalog(*exports: Export, live: tuple[str, ...] = ("east-1", "east-2", "west-1")) -> Catalog:
    clusters = {c: ClusterRecord(c, "us-east" if c.startswith("east") else "us-west", "a",
                                 f"{c}.isthmus.local", "127.0.0.1:1")
                for c in ("east-1", "east-2", "west-1")}
    return Catalog(revision=7, clusters=clusters, live=frozenset(live),
                   exports={e.key: e for e in exports})


def export(cluster: str, name: str = "echo", protocol: str = "tcp",
           consumers: tuple[str, ...] | None = None) -> Export:
    return Export(cluster, "default", name, 8080, protocol,
                  (Endpoint("127.0.0.1", 9000, True, 1),), consumers)


def imp(name: str = "echo", host: str = "127.0.0.1", port: int = 16001) -> ImportConfig:
    return ImportConfig(name, "default", (host, port), FailoverPolicy())


def records(imports=None, cat=None, **settings):
    return build(DnsSettings(**settings), imports or (imp(),), cat or catalog(export("east-2")),
                 ME, 42)


def ask(recs, name: str, rdtype=T.A, rdclass=dns.rdataclass.IN):
    return resolve(recs, dns.name.from_text(name), rdtype, rdclass)


def texts(rrsets) -> list[str]:
    return [rr.to_text() for rr in rrsets]


def test_a_record_of_an_exported_import():
    got = ask(records(), "echo.default.svc.clusterset.local")
    assert got.rcode == dns.rcode.NOERROR
    assert texts(got.answer) == ["echo.default.svc.clusterset.local. 5 IN A 127.0.0.1"]


def test_names_are_case_insensitive_and_answered_as_asked():
    got = ask(records(), "ECHO.Default.SVC.clusterset.LOCAL")
    assert texts(got.answer) == ["ECHO.Default.SVC.clusterset.LOCAL. 5 IN A 127.0.0.1"]


def test_aaaa_of_an_ipv6_listener_and_nodata_for_a():
    recs = records((imp(host="::1"),))
    assert texts(ask(recs, "echo.default.svc.clusterset.local", T.AAAA).answer) == [
        "echo.default.svc.clusterset.local. 5 IN AAAA ::1"]
    nodata = ask(recs, "echo.default.svc.clusterset.local", T.A)
    assert nodata.rcode == dns.rcode.NOERROR and not nodata.answer
    assert [rr.rdtype for rr in nodata.authority] == [T.SOA]


@pytest.mark.parametrize("name", ["echo.default.svc.clusterset.local",
                                  "_tcp._tcp.echo.default.svc.clusterset.local"])
def test_srv_with_the_listener_port_and_the_address_as_additional(name):
    got = ask(records(), name, T.SRV)
    assert texts(got.answer) == [f"{name}. 5 IN SRV 0 100 16001 echo.default.svc.clusterset.local."]
    assert texts(got.additional) == ["echo.default.svc.clusterset.local. 5 IN A 127.0.0.1"]


def test_srv_port_name_is_the_exported_protocol():
    recs = records((imp("web"),), catalog(export("east-2", "web", "http")))
    assert ask(recs, "_http._tcp.web.default.svc.clusterset.local", T.SRV).answer
    assert ask(recs, "_tcp._tcp.web.default.svc.clusterset.local", T.SRV).rcode == \
        dns.rcode.NXDOMAIN


def test_no_exporter_no_name():
    recs = records(cat=catalog())
    got = ask(recs, "echo.default.svc.clusterset.local")
    assert got.rcode == dns.rcode.NXDOMAIN
    soa = got.authority[0]
    assert soa.rdtype == T.SOA and soa[0].minimum == 5 and soa[0].serial == 42


def test_an_exporter_without_lease_does_not_count():
    recs = records(cat=catalog(export("east-2"), live=("east-1",)))
    assert ask(recs, "echo.default.svc.clusterset.local").rcode == dns.rcode.NXDOMAIN


def test_an_export_that_does_not_admit_us_does_not_count():
    recs = records(cat=catalog(export("east-2", consumers=("west-1",))))
    assert ask(recs, "echo.default.svc.clusterset.local").rcode == dns.rcode.NXDOMAIN
    recs = records(cat=catalog(export("east-2", consumers=("west-1", ME))))
    assert ask(recs, "echo.default.svc.clusterset.local").rcode == dns.rcode.NOERROR


def test_exported_but_not_imported_is_unknown_here():
    recs = records(cat=catalog(export("east-2"), export("east-2", "other")))
    assert ask(recs, "other.default.svc.clusterset.local").rcode == dns.rcode.NXDOMAIN


@pytest.mark.parametrize("name", ["clusterset.local", "svc.clusterset.local",
                                  "default.svc.clusterset.local"])
def test_apex_and_parents_exist_without_a(name):
    got = ask(records(), name)
    assert got.rcode == dns.rcode.NOERROR and not got.answer and got.authority


def test_apex_soa_and_ns():
    recs = records()
    assert ask(recs, "clusterset.local", T.SOA).answer[0][0].serial == 42
    assert texts(ask(recs, "clusterset.local", T.NS).answer) == [
        "clusterset.local. 5 IN NS ns.clusterset.local."]
    assert texts(ask(recs, "ns.clusterset.local").answer) == [
        "ns.clusterset.local. 5 IN A 127.0.0.1"]


@pytest.mark.parametrize("name, rdclass", [("example.com", dns.rdataclass.IN),
                                           ("local", dns.rdataclass.IN),
                                           ("echo.default.svc.clusterset.local",
                                            dns.rdataclass.CH)])
def test_outside_the_zone_or_class_is_refused(name, rdclass):
    got = ask(records(), name, T.A, rdclass)
    assert got.rcode == dns.rcode.REFUSED and not got.answer and not got.authority


def test_wildcard_listener_answers_with_the_configured_addresses():
    recs = records((imp(host="0.0.0.0"),), addresses=("10.0.0.5", "fd00::5"))
    name = "echo.default.svc.clusterset.local"
    assert texts(ask(recs, name, T.A).answer) == [f"{name}. 5 IN A 10.0.0.5"]
    assert texts(ask(recs, name, T.AAAA).answer) == [f"{name}. 5 IN AAAA fd00::5"]
    recs = records((imp(host="0.0.0.0"),), listen_host="10.1.1.1")
    assert texts(ask(recs, name, T.A).answer) == [f"{name}. 5 IN A 10.1.1.1"]
    recs = records((imp(host="0.0.0.0"),), listen_host="0.0.0.0")
    assert not ask(recs, name, T.A).answer and ask(recs, name, T.SRV).answer


def test_any_gets_every_type_of_the_name():
    got = ask(records(), "echo.default.svc.clusterset.local", T.ANY)
    assert sorted(rr.rdtype for rr in got.answer) == [T.A, T.SRV]


def test_another_zone_and_ttl():
    recs = records(zone="mesh.example", ttl=30)
    assert texts(ask(recs, "echo.default.svc.mesh.example").answer) == [
        "echo.default.svc.mesh.example. 30 IN A 127.0.0.1"]
    assert ask(recs, "echo.default.svc.clusterset.local").rcode == dns.rcode.REFUSED


def test_status_rows_say_what_each_name_answers():
    recs = records((imp(), imp("gone", port=16002)))
    assert [(r["name"], r["exported_by"]) for r in recs.services] == [
        ("echo.default.svc.clusterset.local", ["east-2"]),
        ("gone.default.svc.clusterset.local", [])]


@given(st.lists(st.text(alphabet="abcXYZ-09._", min_size=1, max_size=20), max_size=4),
       st.sampled_from([T.A, T.AAAA, T.SRV, T.TXT, T.ANY, T.SOA, T.NS, T.MX]))
def test_every_name_gets_one_of_the_four_answers(labels, rdtype):
    try:
        name = dns.name.from_text(".".join(labels) + ".clusterset.local")
    except Exception:
        return  # not a name dnspython accepts (empty label, too long): not a question
    got = resolve(records(), name, rdtype)
    assert got.rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)
    assert got.answer or got.authority
