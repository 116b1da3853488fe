"""examples/observability: the Prometheus config and the Grafana dashboard's queries are valid
(promtool checks both), and every metric they use is documented in the README's "Metrics"."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "observability"

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="no promtool: apt-get install -y prometheus")


def exprs() -> list[str]:
    dash = json.loads((EXAMPLES / "grafana-dashboard.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


@needs_promtool
def test_prometheus_config_is_valid():
    r = subprocess.run(["promtool", "check", "config", str(EXAMPLES / "prometheus.yml")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_every_dashboard_query_parses(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"isthmus:dashboard_{i}", "expr": e} for i, e in enumerate(exprs())]}]}
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    r = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_metric_the_dashboard_uses_is_documented():
    readme = (ROOT / "README.md").read_text()
    used = {m.removesuffix("_bucket") for e in exprs() for m in re.findall(r"isthmus_\w+", e)}
    assert used, "no isthmus metric in the dashboard?"
    missing = sorted(m for m in used if f"`{m}`" not in readme)
    assert not missing, missing
