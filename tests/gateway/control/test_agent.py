"""The agent's decisions about the federation that need no federation: what is permanent (stop
the gateway) and what is worth a retry, and the errors that name what to fix."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from federation.ca import CertificateAuthority
from federation.errors import FederationError, JoinRefused, PermanentError
from federation.model import Catalog
from gateway.config.schema import parse_config
from gateway.control.agent import Agent, Identity, federation_ca, join_refused_for_good
from gateway.errors import ConfigError

CONFIG = """\
cluster: {name: east-1, region: us-east, zone: a}
federation:
  url: https://127.0.0.1:9
  ca_file: fed-ca.pem
listen: {inbound: 127.0.0.1:15443, admin: 127.0.0.1:15000}
state_dir: state
"""


@pytest.mark.parametrize(
    ("status", "permanent"),
    [(400, True), (401, True), (403, True), (404, True), (409, True), (422, True),
     (408, False), (425, False), (429, False), (500, False), (502, False), (503, False),
     (None, False), (200, False)],
)
def test_which_join_answers_are_refusals_for_good(status, permanent) -> None:
    assert join_refused_for_good(status) is permanent


def test_permanence_is_a_type() -> None:
    assert issubclass(JoinRefused, PermanentError) and issubclass(JoinRefused, FederationError)
    assert issubclass(ConfigError, PermanentError)
    assert not issubclass(FederationError, PermanentError)
    assert JoinRefused("refused", 401).status == 401


def _config(tmp_path: Path, extra: str = ""):
    path = tmp_path / "gw.yaml"
    path.write_text(CONFIG + extra)
    return parse_config(path.read_text(), path), path


@pytest.mark.parametrize(("content", "phrase"), [(None, "No such file"), (b"nope", "not a PEM")])
def test_a_missing_or_bad_federation_ca_is_a_config_error_naming_the_field(tmp_path, content,
                                                                          phrase):
    cfg, path = _config(tmp_path)
    if content is not None:
        (tmp_path / "fed-ca.pem").write_bytes(content)
    with pytest.raises(ConfigError) as e:
        federation_ca(cfg)
    (p,) = e.value.problems
    assert (p.file, p.path) == (str(path), "federation.ca_file")
    assert str(tmp_path / "fed-ca.pem") in p.message and phrase in p.message
    assert len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("token_file", [None, "east-1.token"])
async def test_no_join_token_is_a_config_error_saying_how_to_get_one(tmp_path, monkeypatch,
                                                                     token_file):
    monkeypatch.delenv("ISTHMUS_JOIN_TOKEN", raising=False)
    ca = CertificateAuthority.create("federation.isthmus.local", time.time())
    (tmp_path / "fed-ca.pem").write_bytes(ca.cert_pem)
    cfg, path = _config(tmp_path)
    if token_file is not None:
        text = CONFIG.replace("  ca_file: fed-ca.pem\n",
                              f"  ca_file: fed-ca.pem\n  token_file: {token_file}\n")
        path.write_text(text)
        cfg = parse_config(text, path)
    agent = Agent(cfg, Identity(cfg, time.time()), time.time, lambda c: None, lambda s: None, list)
    with pytest.raises(ConfigError) as e:
        await agent.ensure_joined()
    (p,) = e.value.problems
    assert p.path == "federation.token_file" and "not joined yet and no join token" in p.message
    assert "isthmus federation token create --cluster east-1" in p.message
    if token_file is None:
        assert "set federation.token_file or ISTHMUS_JOIN_TOKEN" in p.message
    else:
        assert f"{tmp_path / token_file} does not exist" in p.message


def test_other_clusters_lease_expiry_and_return_are_logged_at_info(tmp_path, caplog):
    caplog.set_level(logging.INFO, "isthmus.gateway.agent")
    cfg, _ = _config(tmp_path)
    agent = Agent(cfg, Identity(cfg, time.time()), time.time, lambda c: None, lambda s: None, list)
    caplog.clear()

    def said() -> list[str]:
        out = [r.getMessage() for r in caplog.records]
        caplog.clear()
        return out

    agent._set_catalog(Catalog(revision=5, live=frozenset({"east-1", "east-2", "west-1"})))
    assert said() == []  # the first catalog is no news
    agent._set_catalog(Catalog(revision=6, live=frozenset({"west-1"})))  # ours went too
    assert said() == ["cluster east-2: lease expired at the federation; its exports no longer "
                      "count for routing"]
    agent._set_catalog(Catalog(revision=7, live=frozenset({"east-2", "west-1"})))
    assert said() == ["cluster east-2: live at the federation (lease granted)"]
    agent.log_peers = False  # a worker: its primary says it
    agent._set_catalog(Catalog(revision=8, live=frozenset()))
    assert said() == []


# -- against a real federation (in process, real sockets and TLS) ---------------------------


async def _joined_agent(tmp_path, monkeypatch, fed):
    from tests.helpers.federation import Fed  # noqa: F401 (the type of `fed`)

    (tmp_path / "fed-ca.pem").write_bytes((fed.tmp / "state" / "ca.pem").read_bytes())
    text = CONFIG.replace("https://127.0.0.1:9", fed.url)
    path = tmp_path / "gw.yaml"
    path.write_text(text)
    cfg = parse_config(text, path)
    monkeypatch.setenv("ISTHMUS_JOIN_TOKEN", await fed.token("east-1"))
    agent = Agent(cfg, Identity(cfg, time.time()), time.time, lambda c: None, lambda s: None,
                  list)
    await agent.ensure_joined()
    return agent


async def _until(pred, timeout: float = 10.0) -> None:
    import asyncio

    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_bundle_sequence_behind_the_federations_is_raised_past_it_and_published(
        tmp_path, monkeypatch, caplog):
    """The federation holds sequence 5 of our bundle (a state dir restored from a backup holds
    1): the 409 names 5; until our bundle is taken the gateway is not ready, saying why; the
    sequence goes to 6 (persisted), the bundle is taken, the lease granted."""
    import asyncio
    import json
    from dataclasses import replace

    from tests.helpers.federation import Fed

    fed = Fed(tmp_path / "fed")
    await fed.start()
    agent = await _joined_agent(tmp_path, monkeypatch, fed)
    try:
        ours = agent.identity.bundle
        assert ours.sequence == 1
        await agent.client.put_bundle("east-1", replace(ours, sequence=5))
        with pytest.raises(FederationError) as e:
            await agent._put_bundle()
        assert e.value.status == 409 and e.value.body["held_sequence"] == 5
        assert agent._refused("bundle", e.value) is True
        why = agent.not_ready()
        assert why is not None and why.startswith(
            "the federation refuses our bundle (bundle_sequence, HTTP 409): bundle "
            "east-1.isthmus.local: sequence 1")
        assert agent.identity.bundle.sequence == 6 and agent.refusals == {"bundle_sequence": 1}
        meta = json.loads((agent.identity.dir / "bundle.json").read_text())
        assert meta["sequence"] == 6
        assert "the federation holds bundle sequence 5, ours is 1; publishing ours as " \
               "sequence 6" in caplog.text
        task = asyncio.create_task(agent.lease_loop())
        try:
            await _until(lambda: agent.lease is not None)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert agent.not_ready() is None and agent.refusal is None
        assert agent.published_bundle == agent.identity.bundle
        assert agent.status()["registered"] is True
        assert agent.status()["refusals"] == {"bundle_sequence": 1}
    finally:
        await agent.close()
        await fed.stop()


async def test_a_refused_bundle_is_retried_and_the_gateway_is_not_ready_meanwhile(
        tmp_path, monkeypatch):
    """A federation refusing our bundle for a reason we cannot fix (a bundle it cannot take)
    is asked again and again (never given up), and /readyz's reason says what it answered."""
    import asyncio
    from dataclasses import replace

    from tests.helpers.federation import Fed

    fed = Fed(tmp_path / "fed")
    await fed.start()
    agent = await _joined_agent(tmp_path, monkeypatch, fed)
    other = CertificateAuthority.create("west-1.isthmus.local", time.time())
    agent.identity.bundle = replace(agent.identity.bundle, sequence=2,
                                    authorities=(other.cert_der,))  # another trust domain's CA
    task = asyncio.create_task(agent.lease_loop())
    try:
        await _until(lambda: agent.refusals.get("bundle_invalid", 0) >= 3)
        assert agent.lease is None
        why = agent.not_ready()
        assert why is not None and why.startswith(
            "the federation refuses our bundle (bundle_invalid, HTTP 400): bundle: keys[0] is an "
            "authority of trust domain 'west-1.isthmus.local'")
        assert agent.status()["refusal"]["reason"] == "bundle_invalid"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await agent.close()
        await fed.stop()


@pytest.mark.parametrize(("held", "ours", "raised", "reason"), [
    (5, 1, 6, "bundle_sequence"),  # the federation is ahead (a state dir from a backup)
    (1, 1, 2, "bundle_sequence"),  # the same sequence with other keys (refused as well)
    (0, 1, 1, "bundle_409"),  # a 409 we cannot fix by counting: a plain refusal
    (None, 1, 1, "bundle_409"),
])
def test_which_409s_raise_our_bundle_sequence(tmp_path, held, ours, raised, reason):
    cfg, _ = _config(tmp_path)
    agent = Agent(cfg, Identity(cfg, time.time()), time.time, lambda c: None, lambda s: None, list)
    assert agent.identity.bundle.sequence == ours
    body = {"error": "refused"} if held is None else {"held_sequence": held, "sequence": ours}
    assert agent._refused("bundle", FederationError("refused", 409, body)) is True
    assert agent.identity.bundle.sequence == raised and agent.refusals == {reason: 1}
    assert agent.not_ready() is not None  # no lease: not ready, whatever the reason
    agent.lease = 7
    assert agent.not_ready() is None  # a lease held: peers route to us, the data plane works
    for status in (None, 500, 503, 408, 429):  # unreachable or busy: no refusal
        assert agent._refused("bundle", FederationError("x", status)) is False
    assert agent._refused("publish", FederationError("x", 409)) is False


async def test_an_svid_the_federations_tls_refuses_is_a_refusal_not_an_outage(
        tmp_path, monkeypatch):
    """CA files replaced without an overlap: the federation's TLS layer refuses our new SVID
    (TLS 1.3 shows it as a closed connection). The federation answers anonymous requests, so
    that is a refusal: the gateway is not ready and says what to do; never "just down"."""
    import asyncio

    from federation.identity import gateway_id
    from tests.helpers.federation import Fed

    fed = Fed(tmp_path / "fed")
    await fed.start()
    agent = await _joined_agent(tmp_path, monkeypatch, fed)
    stranger = CertificateAuthority.create("east-1.isthmus.local", time.time())
    agent.client.set_svid(stranger.issue(gateway_id("east-1.isthmus.local"), time.time()))
    task = asyncio.create_task(agent.lease_loop())
    try:
        await _until(lambda: agent.refusals.get("unauthenticated", 0) >= 1)
        why = agent.not_ready()
        assert why is not None and "TLS layer refuses our SVID" in why and "rotate-ca" in why
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await agent.close()
    await fed.stop()
    # a federation that is down is no refusal: nobody answers the anonymous request either
    assert await agent.client.refuses_our_certificate() is False
