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
