"""terraform/: the provider-free module's own `terraform test` cases, and what the demo root
renders: gateway and service files that `isthmus config validate` accepts (both targets), the
same topology as compose/demo.yaml and compose/demo/ (so the compose test runs what Terraform
renders), Kubernetes manifests valid against the Kubernetes schemas (kubernetes-validate,
offline, strict), and every root `terraform fmt`-clean (the provider-bound one can only be
formatted here: its provider cannot be downloaded).

Terraform runs on a copy of terraform/ in a temporary directory (init writes .terraform/ and
apply a state file: none of it lands in the tree), with TF_CLI_CONFIG_FILE=/dev/null (no
warning about a missing CLI config).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.processes import ROOT, run_cli

TERRAFORM = ROOT / "terraform"
K8S_VERSION = "1.30.0"
CLUSTERS = ("east-1", "east-2", "edge-1", "west-1")


def terraform(cwd: Path, *args: str, timeout: float = 120.0) -> str:
    if shutil.which("terraform") is None:
        pytest.skip("needs terraform >= 1.9 on PATH (https://developer.hashicorp.com/terraform/install)")
    env = {**os.environ, "TF_CLI_CONFIG_FILE": "/dev/null", "TF_IN_AUTOMATION": "1"}
    done = subprocess.run(["terraform", *args, "-no-color"], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise AssertionError(f"terraform {' '.join(args)} in {cwd} exited {done.returncode}:\n"
                             f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    copy_of = tmp_path_factory.mktemp("terraform") / "terraform"
    shutil.copytree(TERRAFORM, copy_of, ignore=shutil.ignore_patterns(".terraform", "*.tfstate*"))
    return copy_of


@pytest.fixture(scope="module")
def rendered(tree) -> dict:
    demo = tree / "demo"
    terraform(demo, "init", "-input=false")
    terraform(demo, "apply", "-auto-approve", "-input=false")
    return {k: v["value"] for k, v in json.loads(terraform(demo, "output", "-json")).items()}


@pytest.fixture(scope="module")
def files(tree, rendered, tmp_path_factory) -> Path:
    """terraform/render.py's files of the demo root (what a user runs after apply)."""
    out = tmp_path_factory.mktemp("rendered")
    done = subprocess.run([sys.executable, str(TERRAFORM / "render.py"), str(tree / "demo"),
                           str(out)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TF_CLI_CONFIG_FILE": "/dev/null"})
    assert done.returncode == 0, done.stderr
    assert "8 gateway files" in done.stdout, done.stdout  # 4 clusters, 2 targets
    return out


def test_module_terraform_test_cases(tree):
    """terraform/modules/isthmus/tests/*.tftest.hcl: all pass, and there are some."""
    module = tree / "modules" / "isthmus"
    terraform(module, "init", "-input=false")
    out = terraform(module, "test")
    summary = re.search(r"Success! (\d+) passed, (\d+) failed", out)
    assert summary, out[-2000:]
    assert int(summary[1]) >= 9 and summary[2] == "0", summary[0]


@pytest.mark.parametrize("target", ["compose/demo", "kubernetes"])
def test_rendered_configs_pass_config_validate(files, target):
    paths = sorted((files / target).glob("*/gateway.yaml"))
    assert [p.parent.name for p in paths] == sorted(CLUSTERS)
    for path in paths:
        r = run_cli("config", "validate", str(path))
        assert r.returncode == 0, f"{path}: {r.stdout}{r.stderr}"
        assert "service file(s)" in r.stdout


def test_rendered_demo_is_compose_demo(files):
    """The demo root renders what compose/demo.yaml and compose/demo/<cluster>/ say (parsed)."""
    theirs = sorted(p.relative_to(files / "compose") for p in (files / "compose").rglob("*.yaml"))
    ours = sorted(p.relative_to(ROOT / "compose") for p in (ROOT / "compose").rglob("*.yaml"))
    assert [str(p) for p in theirs] == sorted(str(p).replace("demo.yaml", "compose.yaml")
                                              for p in ours)
    for path in ours:
        if path.name != "demo.yaml":
            assert yaml.safe_load((files / "compose" / path).read_text()) == yaml.safe_load(
                (ROOT / "compose" / path).read_text()), f"{path} differs"
    compose = yaml.safe_load((files / "compose" / "compose.yaml").read_text())
    demo = yaml.safe_load((ROOT / "compose" / "demo.yaml").read_text())
    for key in ("name", "volumes"):
        assert compose[key] == demo[key], key
    assert sorted(compose["services"]) == sorted(demo["services"])
    for name, service in demo["services"].items():
        assert compose["services"][name] == service, f"service {name} differs"


def test_rendered_manifests_validate_against_kubernetes_schemas(files):
    """Every cluster's manifests and the federation's are valid (strict: no unknown fields) for
    Kubernetes 1.30, and the validator does refuse a broken one."""
    pytest.importorskip("kubernetes_validate",
                        reason="needs kubernetes-validate: pip install kubernetes-validate")
    import kubernetes_validate

    kinds = []
    for name in (*CLUSTERS, "federation"):
        for manifest in yaml.safe_load_all((files / "kubernetes" / f"{name}.yaml").read_text()):
            kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
            kinds.append(manifest["kind"])
            if manifest["kind"] == "Deployment" and name != "federation":
                deployment = manifest
    assert sorted(set(kinds)) == ["ConfigMap", "Deployment", "PersistentVolumeClaim", "Service"]
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "inbound"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_terraform_roots_are_formatted():
    """`terraform fmt -check` over terraform/, the provider-bound kubernetes root included."""
    terraform(TERRAFORM, "fmt", "-check", "-recursive")
