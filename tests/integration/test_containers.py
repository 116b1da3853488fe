"""The process-based integration tests of join, failover and federation restart, run again with
the federation and the gateways as containers of the project image, started through
testcontainers-python on podman's Docker-compatible API (a `podman system service` this module
starts and stops by its PID). Same topology, files, backends and assertions: only where the
processes run changes (tests/deploy/container_topology.py). The federation's restart is a new
container on the same named volume, which must keep its CA, store and leases.
"""

from __future__ import annotations

import os

import pytest

from tests.deploy.podman import ApiService, image, require
from tests.integration import test_core as process_tests
from tests.integration import test_federation_restart as restart_tests
from tests.integration.harness import running

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def docker_api(tmp_path_factory):
    """The image, and podman's API service for testcontainers (DOCKER_HOST set meanwhile)."""
    require("testcontainers", "docker")
    image()
    service = ApiService(tmp_path_factory.mktemp("podman-api")).start()
    saved = {k: os.environ.get(k) for k in service.docker_env()}
    os.environ.update(service.docker_env())
    try:
        yield service
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        service.stop()


@pytest.fixture
async def topo(docker_api, tmp_path, request):
    from tests.deploy.container_topology import ContainerTopology

    async with running(ContainerTopology(tmp_path), request) as t:
        yield t


@pytest.mark.timeout(300)  # the first may build the image (~2 min on a fresh machine)
async def test_join_in_containers(topo):
    """test_core's join-token test (single use, own cluster only, expiring) against the
    federation's container, after three gateway containers joined with their tokens; every
    container runs as the image's unprivileged user and passes the image's healthcheck."""
    await process_tests.test_join_token_single_use_and_expiring(topo)
    for proc in [topo.fed_proc, *(node.proc for node in topo.nodes.values())]:
        code, out = proc.container.exec(["id", "-u"])
        assert (code, out.decode().strip()) == (0, "10001"), proc.name
        code, out = proc.container.exec(["python3", "/opt/isthmus/libexec/healthcheck.py"])
        assert code == 0, f"{proc.name}: the image's healthcheck: {out.decode()}"


@pytest.mark.timeout(300)  # the first may build the image (~2 min on a fresh machine)
async def test_failover_in_containers(topo):
    """test_core's failover test: east-1 -> east-2 -> west-1 each < 1 s, failback, 0 failed."""
    await process_tests.test_failover_zone_then_region_then_back(topo)


@pytest.mark.timeout(300)  # the first may build the image (~2 min on a fresh machine)
async def test_federation_restart_keeps_state_in_the_volume(topo):
    """The federation's container stopped (SIGTERM: exit 0) for 3 s (> the 2 s lease ttl),
    then a new container on the same volume: nothing withdrawn, 0 failed, leases kept (the
    process-based test's checks), and the same CA."""
    ca_before = topo.fed_ca.read_bytes()
    await restart_tests._outage_then_restart(topo, 3.0)
    assert topo._fed_exec("cat", str(topo.fed_dir / "ca.pem")).encode() == ca_before
