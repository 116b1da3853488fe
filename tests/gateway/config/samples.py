"""Shared config texts and helpers of the gateway.config tests (the line numbers are relied
on by the tables of cases)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.schema import parse_config
from gateway.errors import ConfigError, Problem

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples" / "three-clusters"
SRC = Path("/etc/isthmus/gw.yaml")

# A minimal valid config; the line numbers below are relied on by the table of cases.
MINIMAL = """\
cluster:
  name: east-1
  region: us-east
  zone: a
federation:
  url: https://127.0.0.1:7443
  ca_file: ca.pem
listen:
  inbound: 127.0.0.1:15443
  admin: 127.0.0.1:15000
state_dir: state
"""
# Line 12 onwards is whatever a case appends.

EXPORT = """\
exports:
  - name: echo
    port: 8080
    endpoints:
      - 127.0.0.1:19001
"""  # lines 12..16

IMPORT = """\
imports:
  - name: echo
    listen: 127.0.0.1:16001
"""  # lines 12..14


def cfg(extra: str = "", **replace: str) -> str:
    text = MINIMAL
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new, 1)
    return text + extra


def problems(text: str) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, SRC)
    return info.value.problems
