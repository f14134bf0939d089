"""The podman runtime: real podman containers on `--network weft`, i.e. through weft-cni.

Each host has its own podman state (storage root, run root, tmp dir) in its run
directory and a `containers.conf` whose `network_config_dir` holds one conflist, `weft`,
whose only plugin is weft-cni delegating to the reference bridge + host-local plugins.
podman (CNI backend, runc) runs in the host's network namespace through
`nsenter --net=`, so the CNI plugins it calls configure that host. podman creates the
container's namespace at `podman run` (CNI ADD) and deletes it at `podman rm` (CNI DEL).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from weft.integrations.cni.runtime import default_cni_path
from weft_lab.nodes import Container, Host
from weft_lab.runtimes.base import RunView
from weft_lab.runtimes.cleanup import (
    cgroup_parent,
    record_runtime_netns,
    remove_runtime_netns,
    unmount_below,
)
from weft_lab.runtimes.image import run_rootfs
from weft_lab.shell import sh

PODMAN = "/usr/bin/podman"
IMAGE = "localhost/weft-lab:latest"
NETWORK = "weft"
# This sandbox's hard rlimits are below podman's defaults (1048576), which runc refuses.
ULIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")


class PodmanRuntime:
    name = "podman"

    def __init__(self, tb: RunView) -> None:
        self.tb = tb
        # Directories podman searches for CNI plugins: weft-cni's, then the reference ones.
        self.plugin_dirs = default_cni_path().split(os.pathsep)
        self._ready: set[str] = set()

    @staticmethod
    def root(host: Host) -> Path:
        return host.run_dir / "podman"

    def conflist(self, host: Host) -> dict[str, object]:
        conf = host.cni_conf()
        plugin = {k: v for k, v in conf.items() if k not in ("cniVersion", "name")}
        return {"cniVersion": conf["cniVersion"], "name": NETWORK, "plugins": [plugin]}

    def containers_conf(self, host: Host) -> str:
        root = self.root(host)
        dirs = ", ".join(json.dumps(d) for d in self.plugin_dirs)
        return (
            "[network]\n"
            'network_backend = "cni"\n'
            f'network_config_dir = "{root / "net.d"}"\n'
            f"cni_plugin_dirs = [{dirs}]\n"
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{root / "events.log"}"\n'
            f'tmp_dir = "{root / "tmp"}"\n'
            f'volume_path = "{root / "volumes"}"\n'
        )

    def podman_argv(self, host: Host, *args: str) -> list[str]:
        root = self.root(host)
        return ["nsenter", f"--net=/run/netns/{host.netns}", "env",
                f"CONTAINERS_CONF={root / 'containers.conf'}", PODMAN,
                "--root", str(root / "storage"), "--runroot", str(root / "run"),
                "--tmpdir", str(root / "tmp"), "--storage-driver", "overlay", *args]

    def podman(self, host: Host, *args: str, check: bool = True,
               timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return sh(self.podman_argv(host, *args), check=check, timeout=timeout)

    def start_host(self, host: Host, timeout: float = 60.0) -> None:
        """podman has no daemon: write its config and import the image."""
        root = self.root(host)
        for d in ("net.d", "storage", "run", "tmp", "volumes"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "containers.conf").write_text(self.containers_conf(host))
        (root / "net.d" / f"{NETWORK}.conflist").write_text(
            json.dumps(self.conflist(host), indent=1) + "\n")
        if self.podman(host, "image", "exists", IMAGE, check=False).returncode != 0:
            self.podman(host, "import", str(run_rootfs(self.tb.run_dir)), IMAGE, timeout=120)
        self._ready.add(host.name)

    def stop_host(self, host: Host, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Nothing runs between podman commands."""

    def container_name(self, c: Container) -> str:
        return c.netns

    def run_container(self, c: Container) -> None:

        name = self.container_name(c)
        self.podman(c.host, "run", "-d", "--pull", "never", "--network", NETWORK,
                    "--name", name, "--hostname", c.name,
                    "--cgroup-parent", f"/{cgroup_parent(self.tb.run_id, c.host.name)}",
                    *ULIMITS, IMAGE, "sleep", "1000000000", timeout=120)
        self._attach(c)

    def restart_container(self, c: Container) -> None:
        """`podman restart`: a CNI DEL and a fresh ADD, in a new namespace."""
        sh(["ip", "netns", "del", c.netns], check=False)
        self.podman(c.host, "restart", "-t", "0", self.container_name(c), timeout=120)
        self._attach(c)

    def _attach(self, c: Container) -> None:
        """Name the container's namespace c.netns and learn its address."""
        info = self._inspect(c.host, self.container_name(c))[0]
        sh(["ip", "netns", "attach", c.netns, str(info["State"]["Pid"])])
        network = info["NetworkSettings"]["Networks"][NETWORK]
        c.ip = ipaddress.ip_address(network["IPAddress"])
        ip6 = network.get("GlobalIPv6Address")  # dual stack: weft-cni's second range
        c.ip6 = ipaddress.IPv6Address(ip6) if ip6 else None

    def _inspect(self, host: Host, *names: str) -> list[dict[str, Any]]:
        """podman inspect, recording each container's namespace file for the cleanup."""
        proc = self.podman(host, "inspect", *names, check=False)
        try:
            infos: list[dict[str, Any]] = json.loads(proc.stdout or "[]")
        except ValueError:
            infos = []
        for info in infos:
            record_runtime_netns(self.tb.run_dir, info.get("NetworkSettings", {})
                                 .get("SandboxKey") or "")
        return infos

    def exec_argv(self, c: Container, argv: list[str]) -> list[str]:
        return self.podman_argv(c.host, "exec", self.container_name(c), *argv)

    def remove_container(self, c: Container) -> None:
        sh(["ip", "netns", "del", c.netns], check=False)
        keys = {str(info.get("NetworkSettings", {}).get("SandboxKey"))
                for info in self._inspect(c.host, self.container_name(c))}
        self.podman(c.host, "rm", "-f", "-t", "0", self.container_name(c), check=False,
                    timeout=120)
        remove_runtime_netns(self.tb.run_dir, only=keys)

    def destroy(self) -> None:
        for host in self.tb.hosts:
            if host.name in self._ready:
                with contextlib.suppress(Exception):
                    names = self.podman(host, "ps", "-aq", check=False).stdout.split()
                    if names:
                        self._inspect(host, *names)
                    self.podman(host, "rm", "-a", "-f", "-t", "0", check=False, timeout=120)
            unmount_below(self.root(host))
        remove_runtime_netns(self.tb.run_dir)
