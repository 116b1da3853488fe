"""Containers in tests: what must be installed (else skip, naming the command), the image built
once per session, and podman's Docker-compatible API service for testcontainers.

- `require(*tools)` skips the test unless podman, runc and the named Python packages are there
  and we are root (the base image is made with debootstrap, and rootful podman is what
  PLATFORM-NOTES verified). `sh tests/setup.sh` as root installs all of it.
- `image()` runs compose/build-image (the base is built only when absent, the project image
  only when the sources changed: see that script) once per session and returns its report
  lines (each step and its time; the last names the image size).
- `ApiService` is `podman system service --time=0 unix://SOCKET` on a socket of the test's own,
  started by the test and stopped by its PID; `docker_env()` is what testcontainers needs to
  use it (DOCKER_HOST, and Ryuk disabled: its image cannot be pulled without a registry).
- `podman(*args)` runs one podman command, bounded, and returns its stdout; `logs(name)` is a
  container's output.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.processes import ROOT, Proc

IMAGE = "localhost/isthmus:latest"
BUILD = ROOT / "compose" / "build-image"
INSTALL = ("sh tests/setup.sh (as root), or: apt-get install -y podman runc debootstrap && "
           "pip install podman-compose testcontainers")
_built: list[str] = []


def require(*python_modules: str) -> None:
    """Skip unless root, podman and runc, and `python_modules` are available."""
    missing = [t for t in ("podman", "runc", "debootstrap") if shutil.which(t) is None]
    missing += [m for m in python_modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}; install with: {INSTALL}")
    if os.geteuid() != 0:
        pytest.skip("needs root (rootful podman; debootstrap builds the base image)")


def podman(*args: str, timeout: float = 60.0, check: bool = True) -> str:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {done.returncode}: "
                             f"{done.stderr.strip()[-1500:]}")
    return done.stdout


def logs(container: str) -> str:
    """A container's output, stdout and stderr (where Isthmus logs) together."""
    done = subprocess.run(["podman", "logs", container], capture_output=True, text=True,
                          timeout=30)
    return done.stdout + done.stderr


def image() -> list[str]:
    """Build (or find up to date) the image; its report lines. Once per session."""
    if not _built:
        done = subprocess.run(["sh", str(BUILD)], capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise AssertionError(f"compose/build-image exited {done.returncode}:\n"
                                 f"{done.stderr[-3000:]}")
        _built.extend(line for line in done.stderr.splitlines()
                      if line.startswith("compose/build-image:"))
    return _built


class ApiService:
    """podman's Docker-compatible API on `socket`, a process of this test's (stopped by PID)."""

    def __init__(self, directory: Path) -> None:
        self.socket = directory / "podman.sock"
        self.proc = Proc("podman-service",
                         ["podman", "system", "service", "--time=0", f"unix://{self.socket}"],
                         directory / "podman-service.log")

    def start(self, timeout: float = 20.0) -> ApiService:
        self.proc.start()
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if not self.proc.running or time.monotonic() > deadline:
                self.proc.stop()
                raise AssertionError(f"podman system service did not make {self.socket}:\n"
                                     f"{self.proc.tail()}")
            time.sleep(0.1)
        return self

    def docker_env(self) -> dict[str, str]:
        return {"DOCKER_HOST": f"unix://{self.socket}", "TESTCONTAINERS_RYUK_DISABLED": "true"}

    def stop(self) -> None:
        self.proc.stop(grace=10)
