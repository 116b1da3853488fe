"""Processes and ports for tests that start real Isthmus processes.

Ports come from 20000..32000 (below the ephemeral range, away from the fixed ports of
`isthmus demo`), checked free by binding, and never handed out twice by one test process.
`Proc` is one subprocess with its log file (stdout+stderr, appended across restarts), stopped
only by its own PID (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PORT_RANGE = (20000, 32000)
_handed_out: set[int] = set()


def free_port() -> int:
    """A port in PORT_RANGE that nothing listens on now (nor in TIME_WAIT), not handed out yet."""
    for _ in range(500):
        port = random.randint(*PORT_RANGE)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port found in {PORT_RANGE}")


def isthmus_cmd() -> list[str]:
    """`python -m isthmus.cli` of this interpreter, with this tree first on its path (see
    `tree_env`): a test runs the code it sits beside, not whatever an installed console script
    points at (an editable install of another checkout, say)."""
    return [sys.executable, "-m", "isthmus.cli"]


ROOT = Path(__file__).resolve().parents[2]


def tree_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process that must import this tree's packages."""
    base = dict(os.environ if env is None else env)
    old = base.get("PYTHONPATH")
    base["PYTHONPATH"] = str(ROOT) + (os.pathsep + old if old else "")
    return base


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run([*isthmus_cmd(), *args], capture_output=True, text=True,
                          timeout=timeout, env=tree_env())


class Proc:
    """One subprocess with its log file. Stopped only by its own PID."""

    def __init__(self, name: str, args: list[str], log: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = args
        self.log = log
        self.env = env
        self.popen: subprocess.Popen | None = None

    def start(self) -> None:
        assert self.popen is None or self.popen.poll() is not None, f"{self.name} already running"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as f:
            f.write(f"=== {time.strftime('%H:%M:%S')} start: {' '.join(self.args)}\n".encode())
            f.flush()
            self.popen = subprocess.Popen(self.args, stdout=f, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=tree_env(self.env))

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL (a crash) and reap."""
        if self.running:
            os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(10)

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds. Returns the exit code."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(10)
        return self.popen.returncode

    def tail(self, lines: int = 60) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
