#!/bin/sh
# Installs the system tools some tests use, when run as root on Debian (CI, a fresh VM); as
# another user it only says what is missing (those tests then skip, naming the same command).
# Called by .ci/run and by the README's test command. Idempotent: installs only what is missing.
set -eu
# tool -> Debian package: chromium renders the drill's HTML report; curl is an HTTP client of
# the HTTP route tests; dig queries the DNS
# responder; ip, wireguard-go, wg and tcpdump run the tunnel tests (network namespaces); etcd
# backs the federation's etcd store; promtool (Debian's prometheus) checks every /metrics page;
# podman, runc and debootstrap build and run the container image (compose/build-image,
# tests/integration/test_compose.py and test_containers.py)
missing=""
need() { command -v "$1" >/dev/null 2>&1 || missing="$missing $2"; }
need chromium chromium
need curl curl
need dig dnsutils
need ip iproute2
need wireguard-go wireguard-go
need wg wireguard-tools
need tcpdump tcpdump
need etcd etcd-server
need etcdctl etcd-client
need promtool prometheus
need podman podman
need runc runc
need debootstrap debootstrap
# podman's default runtime, crun, fails on this kind of machine (cgroup v1 hybrid, rlimits): make
# runc podman's runtime, unless a containers.conf is there already (PLATFORM-NOTES.md)
podman_runc() {
  conf=/etc/containers/containers.conf
  if [ "$(id -u)" = 0 ] && command -v runc >/dev/null 2>&1 && [ ! -e "$conf" ]; then
    mkdir -p /etc/containers
    printf '[engine]\nruntime = "runc"\n\n[containers]\ndefault_ulimits = []\n' >"$conf"
  fi
}
[ -z "$missing" ] && { podman_runc; exit 0; }
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2086 # one word per package
  apt-get install -y -qq $missing >/dev/null
  podman_runc
else
  echo "tests/setup.sh: not installing (needs root and apt-get):$missing; the tests that need" \
       "them skip. Install with: apt-get install -y$missing" >&2
fi
