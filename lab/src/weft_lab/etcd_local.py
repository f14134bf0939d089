"""A throwaway etcd cluster: for `weft demo --store etcd`, the testbed and the tests.

    with LocalEtcd(members=1) as cluster:
        store = open_store(cluster.url)          # "etcd://127.0.0.1:P1[,127.0.0.1:P2...]"
        cluster.kill(0); cluster.restart(0)      # fault injection (tests)

Every member is a real `etcd` process (Debian `etcd-server`) listening only on 127.0.0.1
(or, for the testbed, on one address inside a network namespace the run created), on
ports the kernel picked free, with its data in a temporary directory. Member names and
the cluster token carry a per-run id, so two runs never join each other. Leaving the
context stops every process and removes the data, on success or failure.

This is not a production launcher: there is no TLS and no auth. It waits for health
through the plain-HTTP `/health` endpoint etcd serves on its client port (from inside the
namespace, through `etcdctl endpoint health`, when there is one).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from weft.core.errors import StoreUnavailable, UsageError

ETCD_BINARY = "/usr/bin/etcd"
ETCDCTL_BINARY = "/usr/bin/etcdctl"

# How long a member (or a whole cluster) may take to report healthy. Generous: CI
# machines are small and a 3-member cluster needs an election first.
START_TIMEOUT = 30.0


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class EtcdTls:
    """TLS on the client port: the server's certificate and key, and the CA that signed
    both it and the clients' certificates (which etcd then requires). The client pair is
    what `etcdctl` and the health check present."""

    cafile: Path
    certfile: Path
    keyfile: Path
    client_certfile: Path
    client_keyfile: Path


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    host: str = "127.0.0.1"
    tls: bool = False

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"

    @property
    def peer_url(self) -> str:
        return f"http://{_hostport(self.host, self.peer_port)}"

    @property
    def endpoint(self) -> str:
        return _hostport(self.host, self.client_port)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class LocalEtcd:
    """An N-member etcd cluster on one address (loopback by default; `netns`+`host` put it
    inside a network namespace). Use as a context manager, or start() / stop()."""

    def __init__(
        self,
        members: int = 1,
        *,
        base_dir: str | Path | None = None,
        binary: str = ETCD_BINARY,
        netns: str | None = None,
        host: str = "127.0.0.1",
        heartbeat_ms: int = 100,
        election_ms: int = 1000,
        tls: EtcdTls | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        if members < 1:
            raise UsageError(f"an etcd cluster needs at least one member, not {members}")
        if not os.access(binary, os.X_OK):
            raise UsageError(
                f"the etcd server binary {binary} is missing; install the Debian package "
                "etcd-server (apt-get install etcd-server)"
            )
        self.binary = binary
        self.netns = netns
        self.run_id = uuid.uuid4().hex[:8]
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix=f"weft-etcd-{self.run_id}-"))
        self._heartbeat_ms = heartbeat_ms
        self._election_ms = election_ms
        self.tls = tls
        self._extra_args = list(extra_args)
        self.members = [
            EtcdMember(
                name=f"weft-{self.run_id}-e{i}",
                client_port=0,
                peer_port=0,
                data_dir=self.base_dir / f"member{i}",
                log_path=self.base_dir / f"member{i}.log",
                host=host,
                tls=tls is not None,
            )
            for i in range(members)
        ]

    # --- addresses ----------------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def url(self) -> str:
        """The store URL for weft: `etcd://127.0.0.1:P1,127.0.0.1:P2,...` (etcds:// with TLS)."""
        return ("etcds://" if self.tls else "etcd://") + ",".join(self.endpoints)

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start every member and wait until the cluster answers healthy."""
        ports = _distinct_free_ports(2 * len(self.members))
        for i, member in enumerate(self.members):
            member.client_port, member.peer_port = ports[2 * i], ports[2 * i + 1]
        try:
            for member in self.members:
                self._spawn(member, new_cluster=True)
            for member in self.members:
                self._wait_healthy(member)
        except BaseException:
            self.stop()
            raise

    def kill(self, index: int) -> None:
        """SIGKILL one member (a crash: no goodbye to its peers)."""
        member = self.members[index]
        if member.process is not None:
            member.process.kill()
            member.process.wait()
        self._close_log(member)

    def restart(self, index: int, *, wait: bool = True) -> None:
        """Start a killed member again on the same ports and data (it rejoins)."""
        member = self.members[index]
        if member.running:
            return
        self._spawn(member, new_cluster=False)
        if wait:
            self._wait_healthy(member)

    def wait_healthy(self) -> None:
        """Wait until every running member reports healthy (after restarting several: one
        member alone has no quorum, so restart them all with wait=False, then wait here)."""
        for member in self.members:
            if member.process is not None:
                self._wait_healthy(member)

    def stop(self) -> None:
        """Stop every member and remove the data (if this object made the directory)."""
        for member in self.members:
            if member.process is not None and member.process.poll() is None:
                member.process.terminate()
                try:
                    member.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    member.process.kill()
                    member.process.wait()
            self._close_log(member)
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> LocalEtcd:
        try:
            self.start()
        except BaseException:
            self.stop()  # a member that did start must not outlive a failed start
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- tools --------------------------------------------------------------------------

    def etcdctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the real `etcdctl` (API v3) against this cluster's live members."""
        live = [m.endpoint for m in self.members if m.running] or self.endpoints
        return self._etcdctl(live, *args, check=check)

    def _etcdctl(
        self, endpoints: Sequence[str], *args: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        scheme = "https" if self.tls else "http"
        urls = ",".join(f"{scheme}://{e}" for e in endpoints)
        argv = [ETCDCTL_BINARY, f"--endpoints={urls}", "--dial-timeout=2s"]
        if self.tls:
            argv += [f"--cacert={self.tls.cafile}", f"--cert={self.tls.client_certfile}",
                     f"--key={self.tls.client_keyfile}"]
        argv += args
        return subprocess.run(
            self._in_netns(argv),
            env={**os.environ, "ETCDCTL_API": "3"},
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def _in_netns(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    # --- internals ----------------------------------------------------------------------

    def _spawn(self, member: EtcdMember, *, new_cluster: bool) -> None:
        member.data_dir.mkdir(parents=True, exist_ok=True)
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        argv = [
            self.binary,
            f"--name={member.name}",
            f"--data-dir={member.data_dir}",
            f"--listen-client-urls={member.client_url}",
            f"--advertise-client-urls={member.client_url}",
            f"--listen-peer-urls={member.peer_url}",
            f"--initial-advertise-peer-urls={member.peer_url}",
            f"--initial-cluster={initial}",
            f"--initial-cluster-state={'new' if new_cluster else 'existing'}",
            f"--initial-cluster-token=weft-{self.run_id}",
            f"--heartbeat-interval={self._heartbeat_ms}",
            f"--election-timeout={self._election_ms}",
            "--logger=zap",
            "--log-outputs=stderr",
        ]
        if self.tls:
            argv += [
                f"--cert-file={self.tls.certfile}",
                f"--key-file={self.tls.keyfile}",
                f"--trusted-ca-file={self.tls.cafile}",
                "--client-cert-auth",
            ]
        argv += self._extra_args
        self._close_log(member)
        member._log = open(member.log_path, "ab")  # noqa: SIM115 (closed in _close_log)
        # etcd dies with the process that started it, even one killed without a chance to
        # clean up: a throwaway cluster must never outlive its run. setpriv sets the
        # parent-death signal and execs etcd; a Python preexec_fn would run in a forked
        # copy of this process, where grpc's threads make fork unsafe.
        if shutil.which("setpriv"):
            argv = ["setpriv", "--pdeathsig", "KILL", "--", *argv]
        member.process = subprocess.Popen(
            self._in_netns(argv), stdin=subprocess.DEVNULL, stdout=member._log, stderr=member._log,
        )

    def _wait_healthy(self, member: EtcdMember) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if member.process is None or member.process.poll() is not None:
                raise StoreUnavailable(
                    f"etcd member {member.name} exited while starting; log: "
                    f"{_tail(member.log_path)}"
                )
            if self._healthy(member):
                return
            time.sleep(0.1)
        raise StoreUnavailable(
            f"etcd member {member.name} on {member.endpoint} not healthy after "
            f"{START_TIMEOUT:.0f}s; log: {_tail(member.log_path)}"
        )

    def _healthy(self, member: EtcdMember) -> bool:
        if self.netns is not None or self.tls is not None:
            # urllib here would look in this process's namespace (and would need the
            # client certificate): ask etcdctl, from inside the namespace.
            try:
                proc = self._etcdctl([member.endpoint], "endpoint", "health", check=False,
                                     timeout=10)
            except subprocess.TimeoutExpired:
                return False
            return proc.returncode == 0
        try:
            with urllib.request.urlopen(f"{member.client_url}/health", timeout=2) as resp:
                return json.loads(resp.read()).get("health") in (True, "true")
        except (urllib.error.URLError, OSError, ValueError):
            return False

    @staticmethod
    def _close_log(member: EtcdMember) -> None:
        if member._log is not None:
            member._log.close()
            member._log = None


def _distinct_free_ports(count: int) -> Sequence[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_loopback_port()
        if port not in ports:
            ports.append(port)
    return ports


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
