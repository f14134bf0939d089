"""The testbed: N hosts as network namespaces on one underlay bridge, containers as
namespaces on those hosts, attached through `weft-cni` like a runtime would.

    netns weft-<run>-ul      bridge br0 (the underlay "switch"; nothing in the root netns)
    netns weft-<run>-h1      eth0 198.18.0.11/24, `weft agent`, bridge weft0 from CNI
    netns weft-<run>-h1c1    eth0 from the bridge plugin, an address of h1's subnet

Every name carries the run id, so runs never collide; each run records its owner's pid
in its run directory, and `remove_leftovers` (`weft testbed down`) removes the runs
whose owner is gone. The context manager always cleans up, pass or fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from weft.backends.wireguard.userspace import private_socket_dir_argv
from weft.core.constants import ROUTE_PROTOCOL
from weft.core.errors import UsageError, WeftError
from weft.core.lease import Lease
from weft.host.files import private_dir, write_private
from weft.integrations.cni.runtime import default_cni_path
from weft_lab.nodes import Container as Container
from weft_lab.nodes import Host as Host
from weft_lab.runtimes import RUNTIMES
from weft_lab.runtimes.base import ContainerRuntime
from weft_lab.runtimes.cleanup import remove_runtime_leftovers
from weft_lab.runtimes.docker import DockerRuntime
from weft_lab.runtimes.podman import PodmanRuntime
from weft_lab.shell import TestbedError as TestbedError
from weft_lab.shell import netns_exec as netns_exec
from weft_lab.shell import sh as sh

NETNS_PREFIX = "weft-"
RUNS_DIR = Path("/tmp/weft-runs")
UNDERLAY_NET = ipaddress.IPv4Network("198.18.0.0/24")
# A routed underlay (`routed_hosts`): the last hosts sit on a second segment, reached
# through two router namespaces joined by one link (the one whose MTU can be lowered).
ROUTED_NET = ipaddress.IPv4Network("198.18.1.0/24")
ROUTER_LINK = ("198.18.2.1", "198.18.2.2")
ROUTER_IP = {UNDERLAY_NET: "198.18.0.254", ROUTED_NET: "198.18.1.254"}
OPERATOR_IP = ipaddress.IPv4Address("198.18.0.1")
# The IPv6 underlay segment (`underlay="dual"` or `"ipv6"`): host i holds ...::(10 + i).
UNDERLAY6_NET = ipaddress.IPv6Network("2001:db8:ff::/64")
UNDERLAYS = ("ipv4", "dual", "ipv6")
DEFAULT_CONFIG = '{"Network": "198.19.0.0/16", "Backend": {"Type": "vxlan"}}'
CNI_PATH = default_cni_path()  # this venv's weft-cni, then the reference plugins
# How weft-cni attaches containers: the reference plugin it delegates to.
ATTACHMENTS = ("bridge", "ptp")


class Testbed:
    __test__ = False

    def __init__(
        self,
        hosts: int = 3,
        containers_per_host: int = 2,
        config: str = DEFAULT_CONFIG,
        store: str = "sqlite",
        etcd_members: int = 1,
        lease_ttl: float = 3600.0,
        agent_args: Sequence[str] = (),
        log_level: str = "debug",
        attach: str = "bridge",
        agent_cpus: Sequence[int] = (),
        runtime: str = "netns",
        routed_hosts: int = 0,
        underlay: str = "ipv4",
        ipv4_only_hosts: int = 0,
    ) -> None:
        """`underlay`: the hosts' underlay families: IPv4 addresses, both (IPv6 on the
        same segment beside IPv4), or IPv6 only. `ipv4_only_hosts`: with "dual", the last
        hosts get no IPv6 address (a mixed underlay)."""
        if os.geteuid() != 0:
            raise UsageError("the testbed needs root to create network namespaces")
        if attach not in ATTACHMENTS:
            raise UsageError(f"container attachment {attach!r}: use {' or '.join(ATTACHMENTS)}")
        if underlay not in UNDERLAYS or (underlay != "ipv4" and routed_hosts):
            raise UsageError(f"underlay {underlay!r}: use {', '.join(UNDERLAYS)} (IPv6 only "
                             "on one segment)")
        if runtime not in RUNTIMES:
            raise UsageError(f"container runtime {runtime!r}: use {', '.join(RUNTIMES)}")
        self.run_id = secrets.token_hex(3)
        self.run_dir = RUNS_DIR / self.run_id
        self.config = config
        self.store_kind = store
        # The underlay namespace doubles as the operator's machine: its bridge holds
        # OPERATOR_IP, and a store server for the run (etcd) listens there.
        self.store_url = f"sqlite://{self.run_dir / 'store.db'}"
        if store not in ("sqlite", "etcd"):
            raise UsageError(f"testbed store {store!r}: use sqlite or etcd")
        self.etcd: Any = None
        self.etcd_members = etcd_members
        self.lease_ttl = lease_ttl
        self.agent_args = list(agent_args)
        self.log_level = log_level
        self.underlay = f"{NETNS_PREFIX}{self.run_id}-ul"
        if not 0 <= routed_hosts <= hosts:
            raise UsageError(f"routed_hosts {routed_hosts}: between 0 and hosts ({hosts})")
        self.routed_hosts = routed_hosts
        self._hosts_total = hosts
        self.underlay_family = underlay
        self.hosts = [
            Host(i, f"{NETNS_PREFIX}{self.run_id}-h{i}",
                 ipaddress.IPv4Address(int(self._segment(i).network_address) + 10 + i),
                 self.run_dir / f"h{i}", attach,
                 agent_cpus[(i - 1) % len(agent_cpus)] if agent_cpus else None)
            for i in range(1, hosts + 1)
        ]
        for host in self.hosts:
            six = UNDERLAY6_NET.network_address + 10 + host.index
            if underlay == "ipv6":
                host.underlay_ip = six
            elif underlay == "dual" and host.index <= hosts - ipv4_only_hosts:
                host.underlay_ip6 = six
        self.containers = [
            Container(h, j, f"{NETNS_PREFIX}{self.run_id}-h{h.index}c{j}")
            for h in self.hosts for j in range(1, containers_per_host + 1)
        ]
        self._extra_netns: list[str] = []
        self.runtime_name = runtime
        # None: containers are bare namespaces attached by weft-cni right here.
        self.runtime: ContainerRuntime | None = (
            DockerRuntime(self) if runtime == "docker"
            else PodmanRuntime(self) if runtime == "podman" else None)

    # --- context management -------------------------------------------------------------

    def __enter__(self) -> Testbed:
        try:
            self.build()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.destroy()

    def _segment(self, index: int) -> ipaddress.IPv4Network:
        """The underlay segment of host `index`: the routed one for the last hosts."""
        return ROUTED_NET if index > self._hosts_total - self.routed_hosts else UNDERLAY_NET

    def all_netns(self) -> list[str]:
        return ([c.netns for c in self.containers] + [h.netns for h in self.hosts]
                + self._extra_netns + [self.underlay])

    # --- building -----------------------------------------------------------------------

    def build(self) -> None:
        # Root writes logs, pid files and the store here: the parent must be root's alone
        # (a local user who made /tmp/weft-runs first is refused, not obeyed) and the run
        # directory new and private (mkdir fails if anything is already there).
        private_dir(RUNS_DIR, "testbed runs directory")
        os.mkdir(self.run_dir, 0o700)
        write_private(self.run_dir / "owner.pid", str(os.getpid()), "testbed owner file")
        sh(["ip", "netns", "add", self.underlay])
        u = ["ip", "-n", self.underlay]
        sh([*u, "link", "add", "br0", "type", "bridge"])
        sh([*u, "link", "set", "br0", "up"])
        sh([*u, "link", "set", "lo", "up"])
        sh([*u, "addr", "add", f"{OPERATOR_IP}/{UNDERLAY_NET.prefixlen}", "dev", "br0"])
        if self.underlay_family != "ipv4":
            sh([*u, "addr", "add", f"{UNDERLAY6_NET.network_address + 1}/64", "dev", "br0",
                "nodad"])
        if self.store_kind == "etcd":
            self._start_etcd()
        if self.routed_hosts:
            self._build_router()
        for host in self.hosts:
            host.run_dir.mkdir(parents=True, exist_ok=True)
            self._attach_to_underlay(host.netns, f"h{host.index}", host.underlay_ip,
                                     self._segment(host.index), host.underlay_ip6)
        for c in self.containers if self.runtime is None else ():
            sh(["ip", "netns", "add", c.netns])
            sh(["ip", "-n", c.netns, "link", "set", "lo", "up"])
        self.write_config(self.config)

    def _attach_to_underlay(self, netns: str, port: str,
                            ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
                            segment: ipaddress.IPv4Network = UNDERLAY_NET,
                            ip6: ipaddress.IPv6Address | None = None) -> None:
        sh(["ip", "netns", "add", netns])
        bridge = "br1" if segment == ROUTED_NET else "br0"
        sh(["ip", "-n", self.underlay, "link", "add", port, "type", "veth", "peer", "name",
            "eth0", "netns", netns])
        sh(["ip", "-n", self.underlay, "link", "set", port, "master", bridge, "up"])
        n = ["ip", "-n", netns]
        for address in (ip, ip6):
            if isinstance(address, ipaddress.IPv6Address):  # no DAD: usable at once
                sh([*n, "addr", "add", f"{address}/64", "dev", "eth0", "nodad"])
            elif address is not None:
                sh([*n, "addr", "add", f"{address}/{segment.prefixlen}", "dev", "eth0"])
        sh([*n, "link", "set", "eth0", "up"])
        sh([*n, "link", "set", "lo", "up"])
        if self.routed_hosts:  # the other segment is through the router
            other = UNDERLAY_NET if segment == ROUTED_NET else ROUTED_NET
            sh([*n, "route", "add", str(other), "via", ROUTER_IP[segment]])

    @property
    def routers(self) -> tuple[str, str]:
        """The router namespaces: on the first segment, on the routed one."""
        return (f"{NETNS_PREFIX}{self.run_id}-ra", f"{NETNS_PREFIX}{self.run_id}-rb")

    def _build_router(self) -> None:
        """Segment br0 -- ra ==link== rb -- br1: two routers and the link between them, so
        the link's MTU can be smaller than both segments' (a path MTU below the hosts')."""
        sh(["ip", "-n", self.underlay, "link", "add", "br1", "type", "bridge"])
        sh(["ip", "-n", self.underlay, "link", "set", "br1", "up"])
        ra, rb = self.routers
        for netns in (ra, rb):
            sh(["ip", "netns", "add", netns])
            self._extra_netns.append(netns)
            sh(["ip", "-n", netns, "link", "set", "lo", "up"])
            sh(netns_exec(netns, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]))
        sh(["ip", "-n", ra, "link", "add", "link0", "type", "veth", "peer", "name", "link0",
            "netns", rb])
        for netns, segment, bridge, (mine, theirs), far in (
                (ra, UNDERLAY_NET, "br0", ROUTER_LINK, ROUTED_NET),
                (rb, ROUTED_NET, "br1", ROUTER_LINK[::-1], UNDERLAY_NET)):
            port = f"{bridge}-{netns[-2:]}"
            sh(["ip", "-n", self.underlay, "link", "add", port, "type", "veth", "peer",
                "name", "eth0", "netns", netns])
            sh(["ip", "-n", self.underlay, "link", "set", port, "master", bridge, "up"])
            n = ["ip", "-n", netns]
            sh([*n, "addr", "add", f"{ROUTER_IP[segment]}/{segment.prefixlen}", "dev", "eth0"])
            sh([*n, "addr", "add", f"{mine}/30", "dev", "link0"])
            sh([*n, "link", "set", "eth0", "up"])
            sh([*n, "link", "set", "link0", "up"])
            sh([*n, "route", "add", str(far), "via", theirs])

    def set_router_link_mtu(self, mtu: int) -> None:
        """The MTU of the link between the routers (both ends): a smaller path MTU."""
        for netns in self.routers:
            sh(["ip", "-n", netns, "link", "set", "link0", "mtu", str(mtu)])

    def add_underlay_node(self, name: str, ip: str) -> str:
        """An extra namespace on the underlay (e.g. a host that holds no lease)."""
        netns = f"{NETNS_PREFIX}{self.run_id}-{name}"
        self._extra_netns.append(netns)
        self._attach_to_underlay(netns, name[:15], ipaddress.IPv4Address(ip))
        return netns

    def weft(self, *args: str, netns: str | None = None, check: bool = True,
             timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "weft", *args]
        return sh(netns_exec(netns, argv) if netns else argv, check=check, timeout=timeout)

    def _start_etcd(self) -> None:
        from weft_lab.etcd_local import LocalEtcd

        self.etcd = LocalEtcd(members=self.etcd_members, base_dir=self.run_dir / "etcd",
                              netns=self.underlay,
                              host=str(OPERATOR_IP))
        self.etcd.start()
        self.store_url = self.etcd.url

    def operator(self, *args: str, input: str | None = None,
                 check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `weft ARGS --store <this run's store>` on the operator's machine."""
        argv = netns_exec(self.underlay, [sys.executable, "-m", "weft", *args,
                                          "--store", self.store_url])
        return sh(argv, input=input, check=check)

    def write_config(self, config: str) -> None:
        proc = self.operator("config", "set", "-", input=config, check=False)
        if proc.returncode != 0:
            raise TestbedError(f"config rejected: {proc.stderr.strip()}")

    def leases(self) -> list[Lease]:
        """Every lease in the store, read as an operator would (`weft status --json`)."""
        proc = self.operator("status", "--json", "--state-dir", str(self.run_dir / "none"),
                             check=False)
        # 3: no agent answers on the operator's machine (there is none); the leases stand.
        if proc.returncode not in (0, 3):
            raise TestbedError(f"weft status failed ({proc.returncode}): {proc.stderr.strip()}")
        return [
            Lease(ipaddress.ip_network(item["subnet"]), ipaddress.ip_address(item["public_ip"]),
                  item["backend"],
                  ipv6_subnet=ipaddress.IPv6Network(item["ipv6_subnet"])
                  if "ipv6_subnet" in item else None,
                  public_ipv6=ipaddress.IPv6Address(item["public_ipv6"])
                  if item.get("public_ipv6") else None)
            for item in json.loads(proc.stdout)["leases"]
        ]

    # --- agents -------------------------------------------------------------------------

    def start(self, timeout: float = 60.0, hosts: Sequence[Host] | None = None) -> None:
        """Start every agent (or those of `hosts`, the others left for the test to start
        later), attach their containers, wait for a view converged among them."""
        hosts = self.hosts if hosts is None else list(hosts)
        for host in hosts:
            self.start_agent(host)
        for host in hosts:
            self.wait_subnet_env(host, timeout)
        if self.runtime is not None:
            for host in hosts:  # dockerd reads the subnet.env the agent just wrote
                self.runtime.start_host(host)
        for c in self.containers:
            if c.host in hosts:
                self.attach(c)
        self.wait_converged(timeout, hosts=hosts)

    def start_agent(self, host: Host, extra_args: Sequence[str] = (), *,
                    pin_public_ip: bool = True) -> None:
        """`pin_public_ip=False`: the agent takes eth0's address (and follows it)."""
        if host.agent is not None and host.agent.poll() is None:
            raise TestbedError(f"agent on {host.name} is already running")
        pinned = ["--public-ip", str(host.underlay_ip)] if pin_public_ip else []
        argv = [sys.executable, "-m", "weft", "agent", "--store", self.store_url,
                "--iface", "eth0", *pinned,
                "--subnet-file", str(host.subnet_env_path), "--state-dir", str(host.state_dir),
                "--lease-ttl", str(self.lease_ttl), "--log-level", self.log_level,
                *self.agent_args, *host.agent_args, *extra_args]
        log = host.log_path.open("ab")
        # Separate machines have separate /run/wireguard: give each host's agent (and the
        # wireguard-go it starts) its own, kept across agent restarts (weft.backends.wireguard).
        argv = private_socket_dir_argv(host.run_dir / "wireguard", argv)
        if host.cpu is not None:
            # A host's processes stay on its CPU, as on a separate machine; the udp
            # forwarder's threads and wireguard-go inherit it.
            argv = ["taskset", "-c", str(host.cpu), *argv]
        host.agent = subprocess.Popen(netns_exec(host.netns, argv), stdout=log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True)
        log.close()

    def stop_agent(self, host: Host, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if host.agent is None:
            return 0
        proc, host.agent = host.agent, None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()

    def agent_log(self, host: Host) -> str:
        try:
            return host.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def check_alive(self, host: Host) -> None:
        """A TestbedError with the end of its log if `host`'s agent has exited."""
        if host.agent is not None and host.agent.poll() is not None:
            raise TestbedError(f"agent on {host.name} exited with {host.agent.returncode}:\n"
                               + self.agent_log(host)[-3000:])

    def wait_subnet_env(self, host: Host, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not host.subnet_env_path.exists():
            self.check_alive(host)
            if time.monotonic() > deadline:
                raise TestbedError(f"{host.name} wrote no subnet.env in {timeout}s:\n"
                                   + self.agent_log(host)[-3000:])
            time.sleep(0.05)

    def weft_routes(self, host: Host) -> dict[str, dict[str, Any]]:
        """The routes weft installed on `host` (its route protocol), by destination."""
        out = self.run(host.netns, ["ip", "-j", "route", "show", "proto",
                                    str(ROUTE_PROTOCOL)]).stdout
        return {r["dst"]: r for r in json.loads(out or "[]")}

    def host_status(self, host: Host) -> dict[str, Any]:
        from weft.agent.status import query_status

        return asyncio.run(query_status(host.state_dir))

    def wait_converged(self, timeout: float = 60.0, hosts: Sequence[Host] | None = None) -> None:
        """Until each running agent sees exactly the other running agents as peers."""
        hosts = [h for h in (hosts or self.hosts) if h.agent is not None]
        deadline = time.monotonic() + timeout
        while True:
            statuses = {}
            for h in hosts:
                self.check_alive(h)
                with contextlib.suppress(WeftError, OSError, json.JSONDecodeError):
                    statuses[h.name] = self.host_status(h)
            subnets = {s.get("subnet") for s in statuses.values()}
            if len(statuses) == len(hosts) and all(
                set(s["peers"]) == subnets - {s["subnet"]} and not s["errors"]
                for s in statuses.values()
            ):
                return
            if time.monotonic() > deadline:
                raise TestbedError(f"agents did not converge in {timeout}s: "
                                   f"{json.dumps(statuses, indent=1)[-3000:]}")
            time.sleep(0.1)

    # --- containers ---------------------------------------------------------------------

    def attach(self, c: Container) -> None:
        from weft.integrations.cni.runtime import cni_add

        if self.runtime is not None:
            self.runtime.run_container(c)
            return
        result = cni_add(c.host.cni_conf(), netns_path=f"/var/run/netns/{c.netns}",
                         container_id=c.container_id, ifname="eth0", host_netns=c.host.netns,
                         cni_path=CNI_PATH)
        ips = result.get("ips") or []
        if not ips:
            raise TestbedError(f"CNI gave {c.name} no address: {result}")
        c.ip = ipaddress.ip_interface(ips[0]["address"]).ip
        six = [ipaddress.ip_interface(ip["address"]).ip for ip in ips[1:]]
        c.ip6 = next((ip for ip in six if isinstance(ip, ipaddress.IPv6Address)), None)

    def detach(self, c: Container) -> None:
        from weft.integrations.cni.runtime import cni_del

        if self.runtime is not None:
            self.runtime.remove_container(c)
            return
        cni_del(c.host.cni_conf(), netns_path=f"/var/run/netns/{c.netns}",
                container_id=c.container_id, ifname="eth0", host_netns=c.host.netns,
                cni_path=CNI_PATH)

    # --- traffic ------------------------------------------------------------------------

    def run(self, netns: str, argv: Sequence[str], check: bool = True,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return sh(netns_exec(netns, argv), check=check, timeout=timeout)

    def container_exec(self, c: Container, argv: Sequence[str], check: bool = True,
                       timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run argv in container c: inside the real container for docker and podman (its
        image's binaries), in its namespace for the netns runtime."""
        if self.runtime is None:
            return self.run(c.netns, argv, check=check, timeout=timeout)
        return sh(self.runtime.exec_argv(c, list(argv)), check=check, timeout=timeout)

    def ping(self, netns: str, dst: object, count: int = 1, wait: float = 2.0) -> bool:
        proc = self.run(netns, ["ping", "-c", str(count), "-W", str(wait), "-i", "0.2",
                                "-q", str(dst)], check=False, timeout=count * wait + 10)
        return proc.returncode == 0

    def ping_across_agent_restarts(self, src: Container, dst: Container,
                                   count: int = 120) -> str:
        """Restart every agent (SIGTERM, start again) while `src` pings `dst` every 50 ms;
        return ping's summary, so a caller can assert how much was lost."""
        ping = subprocess.Popen(
            netns_exec(src.netns, ["ping", "-i", "0.05", "-c", str(count), "-W", "1",
                                   str(dst.ip)]), stdout=subprocess.PIPE, text=True)
        try:
            time.sleep(1.0)
            for host in self.hosts:
                code = self.stop_agent(host, signal.SIGTERM)
                if code != 0:
                    raise TestbedError(f"agent on {host.name} exited with {code} on SIGTERM")
                self.start_agent(host)
            self.wait_converged(30)
            out, _ = ping.communicate(timeout=30)
        finally:
            ping.kill()
            ping.wait()
        return out

    def connectivity(self, retries: int = 3, ipv6: bool = False
                     ) -> dict[tuple[str, str], bool]:
        """Every container to every other container: (src, dst) -> reached. `ipv6`: to
        each one's IPv6 address of a dual-stack network (`Container.ip6`)."""
        matrix: dict[tuple[str, str], bool] = {}
        for src in self.containers:
            for dst in self.containers:
                if src is dst:
                    continue
                target = dst.ip6 if ipv6 else dst.ip
                ok = target is not None and any(self.ping(src.netns, target)
                                                for _ in range(retries))
                matrix[(src.name, dst.name)] = ok
        return matrix

    # --- teardown -----------------------------------------------------------------------

    def destroy(self) -> None:
        if self.runtime is not None:
            with contextlib.suppress(Exception):
                self.runtime.destroy()
        for host in self.hosts:
            with contextlib.suppress(Exception):
                self.stop_agent(host, signal.SIGKILL, timeout=5)
        if self.etcd is not None:
            with contextlib.suppress(Exception):
                self.etcd.stop()
        remove_run(self.run_id, self.all_netns())


def _kill_netns_processes(netns: str) -> None:
    proc = sh(["ip", "netns", "pids", netns], check=False, timeout=10)
    for pid in proc.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def remove_run(run_id: str, netns: Sequence[str] = ()) -> list[str]:
    """Remove one run: its processes, namespaces and files."""
    prefix = f"{NETNS_PREFIX}{run_id}-"
    names = set(netns) | {n for n in list_netns() if n.startswith(prefix)}
    for name in names:
        _kill_netns_processes(name)
    remove_runtime_leftovers(run_id, RUNS_DIR / run_id)  # containers of docker, podman
    removed = []
    for name in sorted(names, key=lambda n: n.endswith("-ul")):  # underlay last
        if sh(["ip", "netns", "del", name], check=False, timeout=20).returncode == 0:
            removed.append(name)
    shutil.rmtree(RUNS_DIR / run_id, ignore_errors=True)
    return removed


def list_netns() -> list[str]:
    proc = sh(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def _owner_alive(run_id: str) -> bool:
    try:
        pid = int((RUNS_DIR / run_id / "owner.pid").read_text())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def remove_leftovers() -> list[str]:
    """Remove every run whose owner process is gone (runs in progress are left alone)."""
    runs = {n[len(NETNS_PREFIX):].split("-", 1)[0] for n in list_netns()
            if n.startswith(NETNS_PREFIX)}
    if RUNS_DIR.exists():
        runs |= {p.name for p in RUNS_DIR.iterdir()}
    removed: list[str] = []
    for run_id in sorted(runs):
        if not _owner_alive(run_id):
            removed += remove_run(run_id)
    return removed
