"""The docker runtime: a real dockerd in each testbed host, as the seed ran it.

    source subnet.env; dockerd --bip=$FLANNEL_SUBNET --mtu=$FLANNEL_MTU ...

Each host's dockerd is started with the flags `weft docker-opts` prints from the
`subnet.env` its agent wrote, inside the host's network namespace through
`nsenter --net=` (not `ip netns exec`, which remounts /sys and hides the cgroup mounts
dockerd needs). Its own data root, exec root, pidfile and socket live in the host's run
directory, so several daemons coexist; its containers' cgroups sit under a parent named
after the run. dockerd's iptables rules go into the host namespace's tables, never the
machine's. Nothing is pulled: the image is `docker import`ed from weft_lab.runtimes.image.
`--live-restore` keeps containers running while dockerd restarts, as in production.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

from weft_lab.nodes import Container, Host
from weft_lab.runtimes.base import RunView
from weft_lab.runtimes.cleanup import cgroup_parent, unmount_below
from weft_lab.runtimes.image import run_rootfs
from weft_lab.shell import TestbedError, sh

DOCKER = "/usr/bin/docker"  # Debian's client, matching its dockerd (not a newer one on PATH)
DOCKERD = "/usr/sbin/dockerd"
IMAGE = "weft-lab:latest"


class DockerRuntime:
    name = "docker"

    def __init__(self, tb: RunView) -> None:
        self.tb = tb
        self.daemons: dict[str, subprocess.Popen[bytes]] = {}

    # --- paths ----------------------------------------------------------------------------

    @staticmethod
    def root(host: Host) -> Path:
        return host.run_dir / "docker"

    def socket(self, host: Host) -> Path:
        return self.root(host) / "docker.sock"

    def docker(self, host: Host, *args: str, check: bool = True,
               timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return sh([DOCKER, "-H", f"unix://{self.socket(host)}", *args], check=check,
                  timeout=timeout)

    # --- the daemon -------------------------------------------------------------------------

    def docker_opts(self, host: Host) -> list[str]:
        """dockerd's network flags, exactly as `weft docker-opts` prints them."""
        out = self.tb.weft("docker-opts", "--subnet-file", str(host.subnet_env_path),
                           "--format", "flags", netns=host.netns).stdout
        return shlex.split(out)

    def start_host(self, host: Host, timeout: float = 60.0,
                   flags: list[str] | None = None) -> None:
        """Start dockerd with `weft docker-opts`'s flags, or `flags` instead (an operator
        who started it by hand, wrongly)."""
        root = self.root(host)
        for d in ("data", "exec"):
            (root / d).mkdir(parents=True, exist_ok=True)
        config = root / "daemon.json"
        # Not /etc/docker: dockerd 20.10 would otherwise create /etc/docker/key.json.
        config.write_text(json.dumps({"deprecated-key-path": str(root / "key.json")}) + "\n")
        network = self.docker_opts(host) if flags is None else flags
        argv = ["nsenter", f"--net=/run/netns/{host.netns}", DOCKERD, *network,
                "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
                "--pidfile", str(root / "dockerd.pid"), "-H", f"unix://{self.socket(host)}",
                "--config-file", str(config),
                "--cgroup-parent", f"/{cgroup_parent(self.tb.run_id, host.name)}",
                "--live-restore", "--userland-proxy=false", "--log-level", "warn"]
        log = (root / "dockerd.log").open("ab")
        self.daemons[host.name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while self.docker(host, "version", "--format", "{{.Server.Version}}",
                          check=False, timeout=10).returncode != 0:
            proc = self.daemons[host.name]
            if proc.poll() is not None or time.monotonic() > deadline:
                raise TestbedError(f"dockerd on {host.name} did not come up "
                                   f"(exit {proc.returncode}):\n{self.daemon_log(host)[-3000:]}")
            time.sleep(0.2)
        if self.docker(host, "image", "inspect", IMAGE, check=False).returncode != 0:
            self.docker(host, "import", str(run_rootfs(self.tb.run_dir)), IMAGE, timeout=120)

    def daemon_log(self, host: Host) -> str:
        try:
            return (self.root(host) / "dockerd.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop_host(self, host: Host, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Stop dockerd (its containers keep running: --live-restore)."""
        proc = self.daemons.pop(host.name, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def restart_host(self, host: Host) -> None:
        self.stop_host(host)
        self.start_host(host)

    # --- containers -------------------------------------------------------------------------

    def container_name(self, c: Container) -> str:
        return c.netns

    def run_container(self, c: Container) -> None:
        """`docker run` on the host's default bridge; its namespace gets the testbed's
        name for c (`ip netns attach`), so every testbed helper reaches it."""
        name = self.container_name(c)
        self.docker(c.host, "run", "-d", "--pull", "never", "--name", name,
                    "--hostname", c.name, IMAGE, "sleep", "1000000000")
        pid = self.docker(c.host, "inspect", "-f", "{{.State.Pid}}", name).stdout.strip()
        ip = self.docker(c.host, "inspect", "-f", "{{.NetworkSettings.IPAddress}}",
                         name).stdout.strip()
        ip6 = self.docker(c.host, "inspect", "-f", "{{.NetworkSettings.GlobalIPv6Address}}",
                          name).stdout.strip()
        sh(["ip", "netns", "attach", c.netns, pid])
        c.ip = ipaddress.ip_address(ip)
        c.ip6 = ipaddress.IPv6Address(ip6) if ip6 else None  # dual stack: dockerd --ipv6

    def exec_argv(self, c: Container, argv: list[str]) -> list[str]:
        """Run argv inside the container itself (its image, its processes)."""
        return [DOCKER, "-H", f"unix://{self.socket(c.host)}", "exec",
                self.container_name(c), *argv]

    def remove_container(self, c: Container) -> None:
        sh(["ip", "netns", "del", c.netns], check=False)
        self.docker(c.host, "rm", "-f", self.container_name(c), check=False)

    # --- teardown ---------------------------------------------------------------------------

    def destroy(self) -> None:
        """Containers, then dockerd (and with it containerd), then its mounts; the data
        roots go with the run directory."""
        for host in self.tb.hosts:
            if host.name in self.daemons:
                with contextlib.suppress(Exception):
                    ids = self.docker(host, "ps", "-aq", check=False, timeout=20).stdout.split()
                    if ids:
                        self.docker(host, "rm", "-f", *ids, check=False, timeout=60)
            with contextlib.suppress(Exception):
                self.stop_host(host)
            unmount_below(self.root(host))

