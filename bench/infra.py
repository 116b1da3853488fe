"""What the benchmark suite starts and measures with: nginx, HAProxy, certificates, wrk, curl,
CPU pinning and per-process CPU/RSS readings.

Everything listens on 127.0.0.1, lives in a temp dir the caller owns, and is stopped by PID.
Core layout on a 2-core machine: core 0 = load generator (wrk, curl, bench.loadgen) and the
nginx backend; core 1 = the proxy under test (HAProxy or the Isthmus gateways). Every thread
of a pinned process is pinned (threads started later inherit it).
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

LOAD_CORE = 0
PROXY_CORE = 1
CLK = os.sysconf("SC_CLK_TCK")


def pin(pid: int, core: int) -> None:
    """Pin every thread of `pid` to `core`."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {core})
        except (ProcessLookupError, PermissionError):
            pass


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all threads), in seconds."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK, int(fields[12]) / CLK


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def children(pid: int) -> list[int]:
    """PIDs of the direct children of `pid` (e.g. a gateway primary's workers)."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            continue
    return out


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_port(port: int, timeout: float = 10.0, prefix: tuple[str, ...] = (),
              host: str = "127.0.0.1") -> None:
    """Until host:port accepts a connection; with `prefix` (`ip netns exec NS`), from there."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if prefix:
            probe = subprocess.run([*prefix, "bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}"],
                                   capture_output=True)
            if probe.returncode == 0:
                return
            time.sleep(0.05)
            continue
        try:
            socket.create_connection((host, port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 5.0) -> None:
    """Stop one process we started, by its PID."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def require_tools() -> None:
    missing = [t for t in ("nginx", "haproxy", "wrk", "curl", "taskset") if shutil.which(t) is None]
    if missing:
        raise SystemExit(
            f"bench: missing {', '.join(missing)}; "
            "install with: apt-get install -y haproxy wrk nginx curl"
        )
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("bench: needs 2 cores (load generator on one, proxy on the other)")


# ---------------------------------------------------------------------------------------------
# nginx backend

SMALL_BODY = "x" * 63 + "\n"  # 64-byte response body


class Nginx:
    """One nginx process (master_process off, one worker's worth of work) on the given ports:
    `/` answers a 64-byte body, `/bulk/FILE` serves files from the temp dir (sendfile)."""

    def __init__(self, tmp: Path, ports: list[int], bulk_bytes: int = 0,
                 prefix: tuple[str, ...] = ()) -> None:
        self.prefix = prefix  # e.g. ("ip", "netns", "exec", NS): run it in a namespace
        self.dir = tmp / "nginx"
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        (self.dir / "www" / "bulk").mkdir(parents=True, exist_ok=True)
        self.ports = ports
        self.bulk_bytes = bulk_bytes
        if bulk_bytes:
            with open(self.dir / "www" / "bulk" / "blob", "wb") as f:
                f.truncate(bulk_bytes)  # sparse: reads are zeros from the page cache
        listens = "\n".join(f"    listen 127.0.0.1:{p} backlog=4096;" for p in ports)
        (self.dir / "nginx.conf").write_text(f"""
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 19000;
error_log {self.dir}/logs/error.log warn;
pid {self.dir}/nginx.pid;
events {{ worker_connections 18000; multi_accept on; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  client_header_timeout 300s;
  client_body_temp_path {self.dir}/tmp;
  proxy_temp_path {self.dir}/tmp;
  fastcgi_temp_path {self.dir}/tmp;
  uwsgi_temp_path {self.dir}/tmp;
  scgi_temp_path {self.dir}/tmp;
  default_type application/octet-stream;
  server {{
{listens}
    root {self.dir}/www;
    location = / {{ return 200 "{SMALL_BODY[:-1]}\\n"; }}
    location /bulk/ {{ }}
  }}
}}
""")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                *self.prefix,
                "taskset",
                "-c",
                str(LOAD_CORE),
                "nginx",
                "-p",
                str(self.dir),
                "-c",
                str(self.dir / "nginx.conf"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "logs" / "stderr.log", "wb"),
        )
        for p in self.ports:
            wait_port(p, prefix=self.prefix)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, signal.SIGQUIT)


# ---------------------------------------------------------------------------------------------
# certificates for the HAProxy TLS chain (EC P-256, like the gateways' SVIDs)


def make_certs(d: Path) -> dict[str, Path]:
    """A CA, a server cert (haproxy B) and a client cert (haproxy A), both signed by the CA.
    HAProxy `crt` files hold the certificate followed by its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("bench-ca"))
        .issuer_name(name("bench-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    out = {"ca": d / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role, eku in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cn = f"haproxy-{role}.bench.local"
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        path = d / f"{role}.pem"
        path.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)
        out[role] = path
    return out


# ---------------------------------------------------------------------------------------------
# HAProxy (the reference), one process per hop, nbthread 1, pinned to the proxy core

HAPROXY_GLOBAL = """global
  nbthread {nbthread}
  maxconn 9000
  ssl-server-verify required
defaults
  mode tcp
  timeout connect 1s
  timeout client 300s
  timeout server 300s
"""


class HAProxy:
    def __init__(
        self, tmp: Path, name: str, body: str, nbthread: int = 1, pinned: bool = True,
        prefix: tuple[str, ...] = (), host: str = "127.0.0.1",
    ) -> None:
        self.prefix, self.host = prefix, host  # run in a namespace; the address it binds
        self.cfg = tmp / f"haproxy-{name}.cfg"
        self.cfg.write_text(HAPROXY_GLOBAL.format(nbthread=nbthread) + body)
        self.pinned = pinned  # to PROXY_CORE
        self.log = tmp / f"haproxy-{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, port: int) -> None:
        check = subprocess.run(
            ["haproxy", "-c", "-f", str(self.cfg)], capture_output=True, text=True
        )
        if check.returncode != 0:
            raise RuntimeError(f"haproxy config {self.cfg}: {check.stdout}{check.stderr}")
        pin = ["taskset", "-c", str(PROXY_CORE)] if self.pinned else []
        self.proc = subprocess.Popen(
            [*self.prefix, *pin, "haproxy", "-db", "-f", str(self.cfg)],
            stdin=subprocess.DEVNULL,
            stdout=open(self.log, "wb"),
            stderr=subprocess.STDOUT,
        )
        wait_port(port, prefix=self.prefix, host=self.host)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, signal.SIGUSR1)  # soft stop


def haproxy_tcp(tmp: Path, listen: int, backend: int, name: str = "tcp", nbthread: int = 1,
                pinned: bool = True) -> HAProxy:
    return HAProxy(tmp, name, f"""frontend f
  bind 127.0.0.1:{listen}
  default_backend b
backend b
  server s1 127.0.0.1:{backend}
""", nbthread, pinned)


def haproxy_chain(
    tmp: Path, listen: int, tls_port: int, backend: int, certs: dict[str, Path],
    tls_host: str = "127.0.0.1", prefix_a: tuple[str, ...] = (), prefix_b: tuple[str, ...] = (),
) -> tuple[HAProxy, HAProxy]:
    """A: plain in -> TLS 1.3 out with a client cert (verify the server against the CA);
    B: TLS 1.3 in requiring a client cert from the CA -> plain to the backend. HAProxy's
    defaults otherwise (including its client-side TLS session reuse). B listens on
    tls_host:tls_port; with prefixes, A and B run in those namespaces."""
    a = HAProxy(tmp, "chain-a", f"""frontend f
  bind 127.0.0.1:{listen}
  default_backend b
backend b
  server s1 {tls_host}:{tls_port} ssl crt {certs['client']} ca-file {certs['ca']} verify required \
verifyhost haproxy-server.bench.local sni str(haproxy-server.bench.local) ssl-min-ver TLSv1.3
""")
    b = HAProxy(
        tmp,
        "chain-b",
        f"""frontend f
  bind {tls_host}:{tls_port} ssl crt {certs["server"]} ca-file {certs["ca"]} verify required \
ssl-min-ver TLSv1.3
  default_backend b
backend b
  server s1 127.0.0.1:{backend}
""", prefix=prefix_b, host=tls_host,
    )
    a.prefix = prefix_a
    return a, b


# ---------------------------------------------------------------------------------------------
# wrk and curl, pinned to the load core


@dataclass
class WrkResult:
    rps: float
    p50_us: float | None
    p99_us: float | None
    errors: int
    requests: int


_UNITS = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}


def _lat(text: str, pct: str) -> float | None:
    m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else None


def wrk(port: int, conns: int, seconds: float, close: bool = False, path: str = "/",
        prefix: tuple[str, ...] = (), headers: tuple[str, ...] = (),
        script: Path | None = None) -> WrkResult:
    """`headers`: extra `-H` values; `script`: a wrk Lua script (e.g. a POST with a body)."""
    cmd = [
        *prefix,
        "taskset",
        "-c",
        str(LOAD_CORE),
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "5s",
    ]
    if close:
        cmd += ["-H", "Connection: close"]
    for h in headers:
        cmd += ["-H", h]
    if script is not None:
        cmd += ["-s", str(script)]
    cmd.append(f"http://127.0.0.1:{port}{path}")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(f"wrk on port {port}: no result:\n{out}")
    errors = 0
    e = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if e:
        errors += sum(int(x) for x in e.groups())
    n = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if n:
        errors += int(n.group(1))
    reqs = re.search(r"(\d+) requests in", out)
    return WrkResult(
        float(m.group(1)),
        _lat(out, "50"),
        _lat(out, "99"),
        errors,
        int(reqs.group(1)) if reqs else 0,
    )


def curl_mbps(port: int, path: str, expect: int, timeout: float = 120.0,
              prefix: tuple[str, ...] = ()) -> float:
    """MB/s (10^6 bytes/s) of one download through 127.0.0.1:port, written to /dev/null."""
    out = subprocess.run(
        [
            *prefix,
            "taskset",
            "-c",
            str(LOAD_CORE),
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "--max-time",
            str(int(timeout)),
            "-w",
            "%{size_download} %{time_total}",
            f"http://127.0.0.1:{port}{path}",
        ],
        capture_output=True,
        text=True,
        timeout=timeout + 10,
    ).stdout
    size, secs = out.split()
    if int(size) != expect:
        raise RuntimeError(f"curl via port {port}: got {size} bytes, expected {expect}")
    return int(size) / float(secs) / 1e6
