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


def write_configs(rendered: dict, target: str, root: Path) -> list[Path]:
    """The gateway file of each cluster as <root>/<cluster>/gateway.yaml, its service files
    under services/ (as its services_dir says); the gateway files' paths."""
    paths = []
    for cluster, text in rendered["gateway_files"][target].items():
        (root / cluster / "services").mkdir(parents=True)
        (root / cluster / "gateway.yaml").write_text(text)
        for name, body in rendered["service_files"][target][cluster].items():
            (root / cluster / "services" / name).write_text(body)
        paths.append(root / cluster / "gateway.yaml")
    return paths


def test_module_terraform_test_cases(tree):
    """terraform/modules/isthmus/tests/*.tftest.hcl: all pass, and there are some."""
    module = tree / "modules" / "isthmus"
    terraform(module, "init", "-input=false")
    out = terraform(module, "test")
    summary = re.search(r"Success! (\d+) passed, (\d+) failed", out)
    assert summary, out[-2000:]
    assert int(summary[1]) >= 9 and summary[2] == "0", summary[0]


@pytest.mark.parametrize("target", ["compose", "kubernetes"])
def test_rendered_configs_pass_config_validate(rendered, target, tmp_path):
    paths = write_configs(rendered, target, tmp_path)
    assert sorted(p.parent.name for p in paths) == sorted(CLUSTERS)
    for path in paths:
        r = run_cli("config", "validate", str(path))
        assert r.returncode == 0, f"{path}: {r.stdout}{r.stderr}"
        assert "service file(s)" in r.stdout


def test_rendered_demo_is_compose_demo(rendered, tmp_path):
    """The demo root renders what compose/demo.yaml and compose/demo/<cluster>/ say (parsed)."""
    for cluster in CLUSTERS:
        ours = ROOT / "compose" / "demo" / cluster
        assert yaml.safe_load(rendered["gateway_files"]["compose"][cluster]) == yaml.safe_load(
            (ours / "gateway.yaml").read_text()), f"{cluster}: gateway.yaml differs"
        files = rendered["service_files"]["compose"][cluster]
        assert sorted(files) == sorted(p.name for p in (ours / "services").iterdir())
        for name, body in files.items():
            assert yaml.safe_load(body) == yaml.safe_load((ours / "services" / name).read_text()), \
                f"{cluster}: services/{name} differs"
    compose = yaml.safe_load(rendered["compose_file"])
    demo = yaml.safe_load((ROOT / "compose" / "demo.yaml").read_text())
    for key in ("name", "volumes"):
        assert compose[key] == demo[key], key
    assert sorted(compose["services"]) == sorted(demo["services"])
    for name, service in demo["services"].items():
        assert compose["services"][name] == service, f"service {name} differs"


def test_rendered_manifests_validate_against_kubernetes_schemas(rendered):
    """Every cluster's manifests are valid (strict: no unknown fields) for Kubernetes 1.30, and
    the validator does refuse a broken one."""
    pytest.importorskip("kubernetes_validate",
                        reason="needs kubernetes-validate: pip install kubernetes-validate")
    import kubernetes_validate

    kinds = []
    for cluster in CLUSTERS:
        for manifest in yaml.safe_load_all(rendered["kubernetes_yaml"][cluster]):
            kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
            kinds.append(manifest["kind"])
            if manifest["kind"] == "Deployment":
                deployment = manifest
    assert sorted(set(kinds)) == ["ConfigMap", "Deployment", "PersistentVolumeClaim", "Service"]
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "inbound"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_terraform_roots_are_formatted():
    """`terraform fmt -check` over terraform/, the provider-bound kubernetes root included."""
    terraform(TERRAFORM, "fmt", "-check", "-recursive")
