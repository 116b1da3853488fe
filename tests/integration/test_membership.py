"""Membership with real processes (issue 20): a join token cannot hand a live cluster to an
impostor, a gateway back at another address is found there, a removed cluster is refused."""

from __future__ import annotations

import pytest

from tests.helpers.backends import Backend
from tests.helpers.processes import free_port, run_cli
from tests.helpers.traffic import request as ask
from tests.helpers.traffic import wait_for
from tests.integration.harness import Node, Topology, running

pytestmark = pytest.mark.integration


async def test_a_token_for_a_live_cluster_does_not_let_an_impostor_take_it(tmp_path, request):
    """`token create --cluster east-2` while east-2 is live; a second gateway named east-2 with
    its own CA joins with it: refused (exit 1, naming --replace), and the real east-2 keeps its
    bundle, its lease and its traffic."""
    topo = Topology(tmp_path)
    async with running(topo, request):
        before = (await topo.fed_status())["clusters"]["east-2"]
        real = topo.nodes["east-2"]
        imp = Node("east-2", real.region, real.zone, tmp_path / "impostor", free_port(),
                   free_port(), free_port(), [Backend("impostor", free_port())])
        imp.dir.mkdir()
        token_file = imp.dir / "token"
        topo.create_token("east-2", output=token_file)
        imp.config.write_text(topo.config_text(imp).replace(str(topo.token_file("east-2")),
                                                            str(token_file)))
        await imp.backends[0].start()
        proc = topo._proc("impostor", ["gateway", "run", "--config", str(imp.config)])
        proc.start()
        try:
            code = await wait_for(lambda: proc.popen.poll() is not None, 20.0,
                                  what="the impostor to exit")
            assert code is not None
            assert proc.popen.returncode == 1, proc.tail()
            log = proc.log.read_text()
            assert "409" in log and "--replace" in log, proc.tail()
        finally:
            proc.stop()
            await imp.backends[0].close()
        after = (await topo.fed_status())["clusters"]["east-2"]
        assert after["trust_domain"] == before["trust_domain"]
        assert after["gateway_address"] == before["gateway_address"]
        await topo.wait_live("east-1")
        # east-1 without its own endpoints goes to east-2 (same region): the real one answers
        await topo.stop_backends("east-1")
        await topo.wait_served("east-1", "east-2")
        # and a freshly started peer routes there too
        topo.nodes["west-1"].proc.stop()
        topo.start_gateway("west-1")
        await topo.wait_ready("west-1")
        await topo.stop_backends("west-1")
        await topo.wait_served("west-1", "east-2", timeout=15.0)


async def test_a_gateway_back_at_another_address_is_found_there(tmp_path, request):
    """east-2 restarts with another listen.inbound: it publishes its record again, and east-1
    reaches it at the new address (before: the federation kept the joined address forever)."""
    topo = Topology(tmp_path)
    async with running(topo, request):
        n = topo.nodes["east-2"]
        n.proc.stop()
        old = n.inbound_port
        n.inbound_port = free_port()
        topo.write_configs()
        topo.start_gateway("east-2")
        await topo.wait_ready("east-2")

        async def moved() -> bool:
            rec = (await topo.fed_status())["clusters"]["east-2"]
            return rec["gateway_address"] == f"127.0.0.1:{n.inbound_port}"

        await wait_for(moved, 10.0, what="east-2's record to name its new inbound address")
        await topo.wait_live("east-1")
        await topo.stop_backends("east-1")
        await topo.wait_served("east-1", "east-2", timeout=10.0)
        assert old != n.inbound_port


async def test_removed_cluster_is_refused_by_its_peers(tmp_path, request):
    """`isthmus federation cluster remove east-2 --yes`: its record and bundle leave every view;
    east-1 stops sending it traffic and drops its links; east-2's own import can no longer reach
    its peers (they refuse its SVID)."""
    topo = Topology(tmp_path)
    async with running(topo, request):
        await topo.stop_backends("east-1")
        await topo.wait_served("east-1", "east-2")
        r = run_cli("federation", "cluster", "remove", "east-2", "--yes",
                    "--federation", topo.fed_url,
                    "--credentials", str(topo.fed_dir / "operator"))
        assert r.returncode == 0, r.stderr
        assert "east-2" not in (await topo.fed_status())["clusters"]

        async def gone() -> bool:
            st = await topo.status("east-1")
            return "east-2" not in st["catalog"]["clusters"]

        await wait_for(gone, 10.0, what="east-1's catalog to drop east-2")
        # east-1's traffic now goes to west-1, never to east-2
        await topo.wait_served("east-1", "west-1", timeout=10.0)
        for _ in range(20):
            assert await ask(topo.nodes["east-1"].import_port, "ping", 3.0) == "west-1"
        # east-2 without its own endpoints reaches nobody: its peers refuse it
        await topo.stop_backends("east-2")

        async def refused() -> bool:
            try:
                reply = await ask(topo.nodes["east-2"].import_port, "ping", 2.0)
            except (OSError, TimeoutError, ConnectionError):
                return True
            return reply == ""

        await wait_for(refused, 15.0, what="east-2's peers to refuse it")
        for _ in range(5):
            assert await refused()


async def test_replace_token_gives_a_cluster_that_lost_its_ca_a_new_identity(tmp_path, request):
    """east-2 loses its state dir (its CA): its fresh start is refused with an ordinary token
    and joins with a --replace one, above the bundle sequence the federation held; peers
    then trust the new CA and route to it."""
    import shutil

    topo = Topology(tmp_path)
    async with running(topo, request):
        n = topo.nodes["east-2"]
        n.proc.stop()
        shutil.rmtree(n.state_dir)
        topo.create_token("east-2", output=topo.token_file("east-2"))
        topo.start_gateway("east-2")
        await wait_for(lambda: n.proc.popen.poll() is not None, 20.0, what="east-2 to exit")
        assert n.proc.popen.returncode == 1 and "--replace" in n.proc.tail()
        r = run_cli("federation", "token", "create", "--cluster", "east-2", "--replace",
                    "--state-dir", str(topo.fed_dir), "-o", str(topo.token_file("east-2")))
        assert r.returncode == 0, r.stderr
        topo.start_gateway("east-2")
        await topo.wait_ready("east-2")
        await topo.wait_live("east-1")

        async def replaced() -> bool:  # /readyz answers before the join is through
            return "REPLACED" in topo.fed_proc.log.read_text()

        await wait_for(replaced, 10.0, what="the federation to log the REPLACED takeover")
        await topo.stop_backends("east-1")
        await topo.wait_served("east-1", "east-2", timeout=15.0)
