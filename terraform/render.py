"""Write what a root of this directory rendered (its `terraform output -json`) as files.

    terraform -chdir=terraform/demo init && terraform -chdir=terraform/demo apply
    python3 terraform/render.py terraform/demo OUT

makes, under OUT:
    compose/compose.yaml                        the compose file (output compose_file)
    compose/<config_dir>/<cluster>/gateway.yaml the gateway files, where compose.yaml mounts them
    compose/<config_dir>/<cluster>/services/*   the service files
    kubernetes/<cluster>/gateway.yaml, services/*  the same for pods (what the ConfigMaps hold)
    kubernetes/<cluster>.yaml                   the manifests, one multi-document file a cluster
    kubernetes/federation.yaml                  the federation's (output kubernetes_federation_yaml)
Then `isthmus config validate OUT/compose/demo/east-1/gateway.yaml`, or
`podman-compose -f OUT/compose/compose.yaml up -d` (with the image built: compose/build-image).
The root must output gateway_files, service_files, compose_file and kubernetes_yaml, and may
output compose_config_dir (default ./config) and kubernetes_federation_yaml, as terraform/demo
does. Names from the outputs become paths only when they are plain names.
Exit 0, or 2 naming what is wrong.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
OUTPUTS = ("gateway_files", "service_files", "compose_file", "kubernetes_yaml")


def plain(name: str, what: str) -> str:
    if not NAME.match(name) or name in (".", ".."):
        raise ValueError(f"{what} {name!r} is not a plain file name")
    return name


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def render(outputs: dict, out: Path) -> list[Path]:
    missing = [k for k in OUTPUTS if k not in outputs]
    if missing:
        raise ValueError(f"the root does not output {', '.join(missing)}")
    written = []
    compose_text = outputs["compose_file"]
    config_dir = outputs.get("compose_config_dir", "./config")
    if Path(config_dir).is_absolute() or ".." in Path(config_dir).parts:
        raise ValueError(f"compose_config_dir {config_dir!r} is not a path below compose.yaml")
    for target, files in outputs["gateway_files"].items():
        base = out / plain(target, "target") / (config_dir if target == "compose" else ".")
        for cluster, text in files.items():
            d = base / plain(cluster, "cluster")
            write(d / "gateway.yaml", text)
            written.append(d / "gateway.yaml")
            for name, body in outputs["service_files"][target][cluster].items():
                write(d / "services" / plain(name, "service file"), body)
    write(out / "compose" / "compose.yaml", compose_text)
    for cluster, text in outputs["kubernetes_yaml"].items():
        if cluster == "federation":
            raise ValueError("a cluster named 'federation' would overwrite federation.yaml")
        write(out / "kubernetes" / f"{plain(cluster, 'cluster')}.yaml", text)
    if "kubernetes_federation_yaml" in outputs:
        write(out / "kubernetes" / "federation.yaml", outputs["kubernetes_federation_yaml"])
    return written


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python3 terraform/render.py ROOT_DIR OUT_DIR", file=sys.stderr)
        return 2
    root, out = Path(argv[0]), Path(argv[1])
    done = subprocess.run(["terraform", f"-chdir={root}", "output", "-json"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        print(f"render: terraform output in {root} failed: {done.stderr.strip()[-500:]}",
              file=sys.stderr)
        return 2
    try:
        outputs = {k: v["value"] for k, v in json.loads(done.stdout).items()}
        written = render(outputs, out)
    except (ValueError, KeyError, TypeError) as e:
        print(f"render: {root}: {e}", file=sys.stderr)
        return 2
    print(f"render: {len(written)} gateway files, compose.yaml and "
          f"{len(outputs['kubernetes_yaml'])} manifest files under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
