"""TLS to etcd (`--store etcd://HOST:PORT?cacert=..&cert=..&key=..`): a real etcd on 127.0.0.1
started with `--cert-file --key-file --trusted-ca-file --client-cert-auth`, certificates made
here. The store works through it (writes, watch, leases), a federation serves from it, and
every way of getting TLS wrong is a clear error: no client certificate, another CA, plaintext,
a file that is not there, a malformed URL."""

from __future__ import annotations

import pytest

from federation.errors import InputError, StoreError
from federation.store.base import open_store
from federation.store.etcd import EtcdStore, EtcdTls, parse_etcd_tls, parse_etcd_url
from tests.helpers.etcd import Etcd, make_etcd_certs, require_etcd


@pytest.fixture
def certs(tmp_path):
    return make_etcd_certs(tmp_path / "certs")


@pytest.fixture
def etcd_tls(tmp_path, certs):
    require_etcd()
    e = Etcd(tmp_path, certs=certs)
    e.start()
    yield e
    e.stop()


def test_tls_parameters_parse_and_bad_ones_are_named():
    assert parse_etcd_tls("etcd://a:1") is None
    assert parse_etcd_tls("etcd://a:1,b:2?cacert=/ca.pem") == EtcdTls("/ca.pem")
    assert parse_etcd_tls("etcd://a:1?cacert=/c&cert=/x&key=/k") == EtcdTls("/c", "/x", "/k")
    assert parse_etcd_url("etcd://a:1,b:2?cacert=/ca.pem") == [("a", 1), ("b", 2)]
    for bad, says in (("etcd://a:1?cafile=/c", "unknown parameter 'cafile'"),
                      ("etcd://a:1?cacert=/c&cert=/x", "go together"),
                      ("etcd://a:1?cacert=", "needs a file path"),
                      ("etcd://a:1?cacert=/a&cacert=/b", "twice"),
                      ("etcd://a:1?cacert", "NAME=VALUE")):
        with pytest.raises(InputError, match=says):
            open_store(bad)


async def test_the_store_works_over_tls_with_a_client_certificate(etcd_tls):
    store = open_store(etcd_tls.url)
    await store.open()
    try:
        r0 = await store.revision()
        lease = await store.grant_lease(30)
        r1 = await store.put("catalog/a", b"1", lease=lease)
        assert (await store.get("catalog/a")).value == b"1"
        evs = await store.events("catalog/", r0, 2.0)
        assert [(e.key, e.revision) for e in evs] == [("catalog/a", r1)]
        assert await store.keepalive(lease)
        assert (await store.describe())["tls"] is True
    finally:
        await store.close()


@pytest.mark.parametrize("how", ["no client certificate", "another CA", "plaintext"])
async def test_a_wrong_tls_setting_is_refused(etcd_tls, certs, tmp_path, how):
    endpoints = [("127.0.0.1", etcd_tls.client_port)]
    if how == "no client certificate":
        tls = EtcdTls(str(certs.ca))
    elif how == "another CA":
        other = make_etcd_certs(tmp_path / "other")
        tls = EtcdTls(str(other.ca), str(certs.client), str(certs.client_key))
    else:
        tls = None
    store = EtcdStore(endpoints, timeout=2.0, tls=tls)
    with pytest.raises(StoreError, match="no etcd endpoint answered"):
        await store.open()
    await store.close()


async def test_a_missing_tls_file_is_named(etcd_tls, certs, tmp_path):
    missing = tmp_path / "nope.pem"
    store = open_store(f"etcd://127.0.0.1:{etcd_tls.client_port}?cacert={certs.ca}"
                       f"&cert={missing}&key={certs.client_key}")
    with pytest.raises(StoreError, match=f"cert file {missing}"):
        await store.open()


async def test_a_federation_serves_from_etcd_over_tls(etcd_tls, make_fed):
    import io

    import aiohttp

    from isthmus.status import render_status
    from tests.helpers.federation import make_cluster

    fed = await make_fed(store_url=etcd_tls.url, lease_ttl=5.0)
    east = make_cluster("east-1")
    c = await fed.join(east)
    await c.grant_lease("east-1")
    rev = (await c.catalog()).revision
    await c.put_export(east.export("web"))
    _, events = await c.watch(rev, 2.0)
    assert [e.key for e in events] == ["catalog/exports/east-1/default/web"]
    async with aiohttp.ClientSession() as s, s.get(fed.admin_url + "/status") as r:
        data = await r.json()
    out = io.StringIO()
    render_status(data, out)
    assert f"store: etcd (127.0.0.1:{etcd_tls.client_port}, TLS)" in out.getvalue()


async def test_the_commands_take_the_tls_url(etcd_tls, tmp_path):
    """As the README shows: `federation serve --store 'etcd://...?cacert=&cert=&key='`, then
    `federation token create --store` with the same URL, a cluster joining with that token,
    and `isthmus federation status` naming the store with TLS."""
    from federation.client import FederationClient, load_federation_bundle
    from tests.helpers.etcd import FedReplica
    from tests.helpers.federation import make_cluster
    from tests.helpers.processes import run_cli

    fed = FedReplica(tmp_path, "fed-tls", etcd_tls.url)
    fed.start()
    try:
        made = run_cli("federation", "token", "create", "--state-dir", str(fed.state),
                       "--store", etcd_tls.url, "--cluster", "east-1")
        assert made.returncode == 0, made.stderr
        token = made.stdout.strip().splitlines()[-1]
        east = make_cluster("east-1")
        bundle = load_federation_bundle(fed.state / "ca.pem")
        async with FederationClient(fed.url, bundle, timeout=5.0) as anon:
            await anon.join(token, east.record, east.bundle(1))
        st = run_cli("federation", "status", "--admin", f"http://127.0.0.1:{fed.admin_port}")
        assert st.returncode == 0, st.stderr
        assert f"store: etcd (127.0.0.1:{etcd_tls.client_port}, TLS)" in st.stdout, st.stdout
    finally:
        fed.stop()
