#!/usr/bin/env bash
# Install everything weft needs on a fresh Debian machine (as root): Debian packages and
# the Python environment in .venv. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(
  iproute2 nftables iptables openssl iputils-ping netcat-openbsd procps kmod tcpdump util-linux
  etcd-server etcd-client qperf iperf3
  wireguard-go wireguard-tools containernetworking-plugins
  clang llvm libbpf-dev bpftool
  systemd  # systemd-analyze: the tests verify the shipped units
  python3 python3-venv
)
# --runtimes (scripts/test.sh): the real container runtimes the namespace tests drive.
# Their packages would start a system dockerd; policy-rc.d (below) stops that.
if [[ "${1:-}" == "--runtimes" ]]; then
  packages+=(docker.io containerd runc podman busybox-static)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # --no-install-recommends: wireguard-tools would otherwise pull in a whole kernel image.
  # No service may start during the install: a dockerd in the machine's own namespace
  # would rewrite its iptables and routes. (A policy-rc.d already there is kept.)
  made_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  [ -z "$made_policy" ] || rm -f /usr/sbin/policy-rc.d
fi
# Installed with systemd present, docker.io would be enabled at boot; weft's tests start
# their own dockerd per testbed host and need none of the machine's.
if command -v systemctl >/dev/null && systemctl is-active --quiet docker 2>/dev/null; then
  systemctl disable --now docker.socket docker.service || true
fi
# The etcd package starts a system etcd on 2379; weft's tests and demo start their own
# on free loopback ports, so the system one is not needed.
if command -v systemctl >/dev/null && systemctl is-active --quiet etcd 2>/dev/null; then
  systemctl stop etcd || true
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null
# weft (the product, with its test tools) and the lab (testbed, demo, bench) beside it.
.venv/bin/pip install -q -e '.[test]' -e ./lab
