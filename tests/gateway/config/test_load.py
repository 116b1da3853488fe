"""Tests of gateway.config: load_config on the file itself, and properties (durations, unknown
fields in every section, the README's full example)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.units import format_duration, parse_duration
from gateway.config.schema import (
    load_config,
    parse_config,
)
from gateway.errors import ConfigError, Problem
from tests.gateway.config.samples import EXPORT, IMPORT, ROOT, SRC, cfg, problems

# --- load_config: the file itself ---------------------------------------------------------


def _load_problem(path: Path | str) -> Problem:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (p,) = info.value.problems
    return p


def test_load_missing_file(tmp_path: Path) -> None:
    p = _load_problem(tmp_path / "nope.yaml")
    assert p.message == "file not found" and p.line is None


def test_load_directory(tmp_path: Path) -> None:
    assert "is a directory" in _load_problem(tmp_path).message


def test_load_too_big(tmp_path: Path) -> None:
    f = tmp_path / "big.yaml"
    f.write_text("# " + "x" * (1024 * 1024) + "\n")
    assert "larger than 1 MiB" in _load_problem(f).message


def test_load_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "latin1.yaml"
    f.write_bytes(b"cluster:\n  name: caf\xe9\n")
    p = _load_problem(f)
    assert p.line == 2 and "not UTF-8" in p.message


def test_load_empty(tmp_path: Path) -> None:
    f = tmp_path / "empty.yaml"
    f.write_text("# nothing here\n")
    assert "empty" in _load_problem(f).message


def test_load_control_character(tmp_path: Path) -> None:
    f = tmp_path / "ctl.yaml"
    f.write_text("cluster:\n  name: a\x01\n")
    p = _load_problem(f)
    assert p.line == 2 and "not valid YAML" in p.message


def test_load_problem_names_the_path_as_given(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("gw.yaml").write_text(cfg("bogus: 1\n"))
    assert str(_load_problem("gw.yaml")).startswith("gw.yaml:12: bogus: unknown field")


# --- properties -----------------------------------------------------------------------------

_MAX_DURATION_S = 30 * 86400  # the longest duration a config accepts (identity.svid_ttl)
_DURATIONS = st.sampled_from([("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)]).flatmap(
    lambda u: st.tuples(
        st.integers(min_value=1, max_value=int(_MAX_DURATION_S / u[1])), st.just(u[0])
    )
)


@given(_DURATIONS)
def test_duration_round_trip(d: tuple[int, str]) -> None:
    # Durations in the range configs accept survive format -> parse (to format's precision).
    # (Above ~1e6 hours format_duration writes '1e+06h', which parse_duration refuses.)
    n, unit = d
    seconds = parse_duration(f"{n}{unit}")
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, rel=1e-3, abs=5e-4)


@settings(max_examples=50, deadline=None)
@given(st.integers(min_value=1, max_value=60_000))
def test_connect_timeout_accepts_any_valid_duration(ms: int) -> None:
    c = parse_config(cfg(f"limits:\n  connect_timeout: {ms}ms\n"), SRC)
    assert c.limits.connect_timeout == pytest.approx(ms / 1000)


_SECTIONS = {
    # section path in the document -> allowed keys there
    (): {
        "cluster",
        "federation",
        "listen",
        "state_dir",
        "identity",
        "limits",
        "outlier_detection",
        "peer_probe",
        "exports",
        "imports",
    },
    ("cluster",): {"name", "region", "zone", "trust_domain"},
    ("federation",): {"url", "ca_file", "token_file"},
    ("listen",): {"inbound", "admin", "advertise"},
    ("exports", 0): {
        "name",
        "namespace",
        "port",
        "protocol",
        "endpoints",
        "health_check",
        "allowed_consumers",
    },
    ("exports", 0, "health_check"): {
        "kind",
        "path",
        "send",
        "expect",
        "interval",
        "timeout",
        "healthy_threshold",
        "unhealthy_threshold",
    },
    ("imports", 0): {"name", "namespace", "listen", "failover"},
    ("imports", 0, "failover"): {"tiers", "region_preference", "failback_after", "max_attempts"},
}


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(sorted(_SECTIONS, key=str)),
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True),
    st.one_of(st.integers(), st.text(max_size=10), st.booleans(), st.none()),
)
def test_unknown_keys_always_rejected(section: tuple, key: str, value: object) -> None:
    if key in _SECTIONS[section]:
        return
    doc = yaml.safe_load(
        cfg(
            EXPORT
            + "    health_check: {kind: tcp}\n"
            + IMPORT
            + "    failover: {max_attempts: 2}\n"
        )
    )
    target = doc
    for part in section:
        target = target[part]
    target[key] = value
    found = problems(yaml.safe_dump(doc, sort_keys=False))
    dotted = ".".join(f"[{p}]" if isinstance(p, int) else p for p in section).replace(".[", "[")
    where = f"{dotted}.{key}" if dotted else key
    assert [(p.path, p.message.split(" (")[0]) for p in found] == [
        (where, f"unknown field {key!r}")
    ]


def test_reference_doc_full_example_is_valid() -> None:
    doc = (ROOT / "README.md").read_text()
    block = doc.split("### Full example", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    c = parse_config(block, SRC)
    assert c.exports[0].health_check.path == "/healthz"
    assert c.exports[0].allowed_consumers == ("east-2", "west-1", "east-1")
