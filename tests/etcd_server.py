"""Real etcd servers for tests, on free loopback ports with temporary data.

    with etcd_cluster(members=3) as cluster:     # weft_lab.etcd_local.LocalEtcd
        cluster.url                              # "etcd://127.0.0.1:P1,..."
        cluster.kill(1); cluster.restart(1)      # a member crashes and comes back
        cluster.etcdctl("put", key, value)       # the real etcdctl

There is one etcd launcher in weft (`weft_lab.etcd_local`, also behind `weft demo --store
etcd`); this module adds what tests need around it: `requires_etcd` (a skip, or in CI a
failure, when the server binary is missing), and a prefix per test so tests can share one
server without seeing each other.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from helpers import missing, requires
from weft_lab.etcd_local import ETCD_BINARY, ETCDCTL_BINARY, EtcdTls, LocalEtcd

ETCD_MISSING_REASON = (
    f"needs the etcd server ({ETCD_BINARY}, Debian package etcd-server) and "
    f"{ETCDCTL_BINARY} (etcd-client)"
)
ETCD_AVAILABLE = os.access(ETCD_BINARY, os.X_OK) and os.access(ETCDCTL_BINARY, os.X_OK)

requires_etcd = requires(ETCD_AVAILABLE, ETCD_MISSING_REASON)


@contextlib.contextmanager
def etcd_cluster(
    members: int = 1,
    base_dir: Path | None = None,
    *,
    tls: EtcdTls | None = None,
    extra_args: Sequence[str] = (),
) -> Iterator[LocalEtcd]:
    """Start an N-member etcd cluster on loopback; stop it and remove its data after."""
    if not ETCD_AVAILABLE:
        missing(ETCD_MISSING_REASON)
    with LocalEtcd(members, base_dir=base_dir, tls=tls, extra_args=extra_args) as cluster:
        yield cluster


ROOT_USER = "--user=root:rootpw"  # etcdctl's flag for the root user `enable_auth` adds


def enable_auth(cluster: LocalEtcd, prefix: str) -> None:
    """Users root (password rootpw) and weft (password secret), weft's role granted read
    and write on `prefix`, then auth on: from here etcdctl needs ROOT_USER."""
    cluster.etcdctl("user", "add", "root:rootpw", "--interactive=false")
    cluster.etcdctl("user", "add", "weft:secret", "--interactive=false")
    cluster.etcdctl("role", "add", "weft")
    cluster.etcdctl("role", "grant-permission", "weft", "--prefix=true", "readwrite", prefix)
    cluster.etcdctl("user", "grant-role", "weft", "weft")
    cluster.etcdctl("auth", "enable")


def unique_prefix() -> str:
    """A key prefix no other test uses (shaped like flannel's)."""
    return f"/weft-test/{uuid.uuid4().hex[:12]}/network"


def make_tls(directory: Path, *, name: str = "weft-test") -> EtcdTls:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, made
    with the real openssl."""
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    def newkey(stem: str, subject: str) -> None:
        openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-nodes", "-keyout", f"{stem}.key", "-out", f"{stem}.csr", "-subj", subject)

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
            "-subj", f"/CN={name}-ca")
    for stem, ext in (
        ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        newkey(stem, f"/CN={name}-{stem}")
        (directory / f"{stem}.ext").write_text(ext)
        openssl("x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{stem}.crt", "-days", "1",
                "-extfile", f"{stem}.ext")
    return EtcdTls(
        cafile=directory / "ca.crt",
        certfile=directory / "server.crt",
        keyfile=directory / "server.key",
        client_certfile=directory / "client.crt",
        client_keyfile=directory / "client.key",
    )


def leader_index(cluster: LocalEtcd) -> int:
    """Which member leads the cluster now (asked with etcdctl)."""
    statuses = json.loads(cluster.etcdctl("endpoint", "status", "-w", "json").stdout)
    by_endpoint = {s["Endpoint"].split("://")[-1]: s["Status"] for s in statuses}
    for i, member in enumerate(cluster.members):
        status = by_endpoint.get(member.endpoint)
        if status is not None and status["header"]["member_id"] == status["leader"]:
            return i
    raise AssertionError(f"no member leads the cluster: {statuses}")


_HANDLED = re.compile(r'^grpc_server_handled_total\{grpc_code="(\w+)",grpc_method="(\w+)",'
                      r'.*\} (\d+)', re.MULTILINE)


def grpc_calls(cluster: LocalEtcd) -> dict[tuple[str, str], int]:
    """How many calls etcd's members answered so far, by (method, code), from their own
    /metrics: what a client asked, seen from the server (plain loopback members only)."""
    calls: dict[tuple[str, str], int] = {}
    for member in cluster.members:
        if not member.running:
            continue
        with urllib.request.urlopen(f"{member.client_url}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        for code, method, count in _HANDLED.findall(text):
            calls[method, code] = calls.get((method, code), 0) + int(count)
    return calls


def calls_since(before: dict[tuple[str, str], int],
                after: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
    """The calls answered between two `grpc_calls` readings (only those that happened)."""
    return {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}
