"""`weft-cni` through the real executable and the real reference plugins (/usr/lib/cni or
/opt/cni/bin), in network namespaces these tests create: one playing the host, others the
containers."""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from helpers import requires
from weft.integrations.cni.plugin import REFERENCE_PLUGIN_DIRS
from weft.integrations.cni.runtime import (
    cni_add,
    cni_check,
    cni_del,
    cni_version,
    default_cni_path,
)
from weft.integrations.cni.spec import CniError, ErrorCode
from weft_lab.testbed import NETNS_PREFIX, RUNS_DIR, Testbed, remove_run

pytestmark = [
    pytest.mark.netns,
    requires(any((Path(d) / "bridge").exists() for d in REFERENCE_PLUGIN_DIRS),
             "needs the CNI reference plugins (Debian containernetworking-plugins)"),
]

WEFT_CNI = Path(sys.executable).parent / "weft-cni"
CNI_PATH = default_cni_path()  # WEFT_CNI's directory, then the reference plugins
SUBNET_ENV = ("FLANNEL_NETWORK=198.19.0.0/16\nFLANNEL_SUBNET={gateway}/{prefix}\n"
              "FLANNEL_MTU={mtu}\nFLANNEL_IPMASQ=true\n")

def ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *argv], capture_output=True, text=True, check=check)


@dataclass
class CniHost:
    """A host namespace with a subnet.env, and container namespaces made on demand.

    Names follow the testbed's `weft-<run>-...` scheme with an owner.pid, so a crashed
    run's leftovers are removed by `weft testbed down`."""

    run_id: str
    run_dir: Path
    netns: str
    containers: list[str] = field(default_factory=list)

    @property
    def subnet_env(self) -> Path:
        return self.run_dir / "subnet.env"

    @property
    def data_dir(self) -> Path:
        return self.run_dir / "cni"

    def write_subnet_env(self, subnet: str, mtu: int = 1450) -> None:
        net = ipaddress.ip_network(subnet)
        self.subnet_env.write_text(SUBNET_ENV.format(gateway=net.network_address + 1,
                                                     prefix=net.prefixlen, mtu=mtu))

    def conf(self, **overrides: Any) -> dict[str, Any]:
        conf: dict[str, Any] = {"cniVersion": "1.0.0", "name": "weft", "type": "weft-cni",
                                "subnetFile": str(self.subnet_env),
                                "dataDir": str(self.data_dir)}
        conf.update(overrides)
        return conf

    def container(self) -> str:
        name = f"{NETNS_PREFIX}{self.run_id}-c{len(self.containers) + 1}"
        ip("netns", "add", name)
        self.containers.append(name)
        return name

    def add(self, container: str, conf: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return cni_add(conf or self.conf(), f"/var/run/netns/{container}", container, "eth0",
                       self.netns, CNI_PATH)

    def delete(self, container: str, prev: Mapping[str, Any] | None = None,
               conf: Mapping[str, Any] | None = None) -> None:
        cni_del(conf or self.conf(), f"/var/run/netns/{container}", container, "eth0",
                self.netns, CNI_PATH, prev_result=prev)

    def check(self, container: str, prev: Mapping[str, Any],
              conf: Mapping[str, Any] | None = None) -> None:
        cni_check(conf or self.conf(), f"/var/run/netns/{container}", container, "eth0",
                  self.netns, CNI_PATH, prev_result=prev)

    def raw(self, command: str, stdin: bytes, container: str = "c-raw",
            **env: str) -> tuple[int, dict[str, Any]]:
        """weft-cni exactly as a runtime execs it; (exit code, parsed stdout)."""
        full = {"PATH": os.environ["PATH"], "CNI_COMMAND": command,
                "CNI_CONTAINERID": container, "CNI_NETNS": f"/var/run/netns/{container}",
                "CNI_IFNAME": "eth0", "CNI_PATH": CNI_PATH}
        full.update(env)
        full = {k: v for k, v in full.items() if v != "-"}  # "-": leave the variable out
        proc = subprocess.run(["ip", "netns", "exec", self.netns, str(WEFT_CNI)], input=stdin,
                              capture_output=True, env=full, timeout=60, check=False)
        return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}


@pytest.fixture
def host() -> Iterator[CniHost]:
    run_id = secrets.token_hex(3)
    run_dir = RUNS_DIR / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "owner.pid").write_text(str(os.getpid()))
    h = CniHost(run_id, run_dir, f"{NETNS_PREFIX}{run_id}-h1")
    try:
        ip("netns", "add", h.netns)
        ip("-n", h.netns, "link", "set", "lo", "up")
        h.write_subnet_env("198.19.5.0/24")
        yield h
    finally:
        remove_run(run_id, [*h.containers, h.netns])


def addresses(netns: str, dev: str = "eth0") -> list[str]:
    out = ip("-n", netns, "-j", "addr", "show", "dev", dev, check=False).stdout
    return [f"{a['local']}/{a['prefixlen']}" for link in json.loads(out or "[]")
            for a in link["addr_info"] if a["family"] == "inet"]


def link_exists(netns: str, dev: str) -> bool:
    return ip("-n", netns, "link", "show", "dev", dev, check=False).returncode == 0


def ping(netns: str, dst: str, *extra: str) -> bool:
    return subprocess.run(["ip", "netns", "exec", netns, "ping", "-c", "1", "-W", "2", *extra,
                           dst], capture_output=True, check=False).returncode == 0


def assert_spec_error(rc: int, out: dict[str, Any], code: int, *words: str) -> None:
    assert rc != 0
    assert set(out) >= {"cniVersion", "code", "msg"}, out
    assert out["code"] == code, out
    text = f"{out['msg']} {out.get('details', '')}"
    for word in words:
        assert word in text, out


# --- the data plane a runtime gets ----------------------------------------------------------


def test_version_lists_the_supported_spec_versions() -> None:
    info = cni_version("weft-cni", CNI_PATH)
    assert info["cniVersion"] == "1.0.0"
    assert {"0.3.1", "0.4.0", "1.0.0"} <= set(info["supportedVersions"])


@pytest.mark.parametrize("version", ["1.0.0", "0.4.0", "0.3.1"])
def test_add_gives_an_address_of_the_host_subnet_with_mtu_and_default_route(
        host: CniHost, version: str) -> None:
    c = host.container()
    result = host.add(c, host.conf(cniVersion=version))
    assert result["cniVersion"] == version
    (addr,) = addresses(c)
    assert ipaddress.ip_interface(addr) in ipaddress.ip_network("198.19.5.0/24")
    assert addr != "198.19.5.1/24"  # the gateway is the bridge's
    assert addr.split("/")[0] in json.dumps(result["ips"])
    (link,) = json.loads(ip("-n", c, "-j", "link", "show", "dev", "eth0").stdout)
    assert link["mtu"] == 1450
    routes = json.loads(ip("-n", c, "-j", "route", "show", "default").stdout)
    assert [r["gateway"] for r in routes] == ["198.19.5.1"]
    # the host side: bridge weft0 holds the gateway address, the container reaches it
    assert addresses(host.netns, "weft0") == ["198.19.5.1/24"]
    assert ping(c, "198.19.5.1")


def test_two_containers_on_one_host_reach_each_other_with_full_mtu(host: CniHost) -> None:
    a, b = host.container(), host.container()
    ra, rb = host.add(a), host.add(b)
    ip_b = ipaddress.ip_interface(rb["ips"][0]["address"]).ip
    assert ip_b != ipaddress.ip_interface(ra["ips"][0]["address"]).ip
    # 1450 - 28 bytes of IP+ICMP header: the biggest unfragmented ping fits, one more doesn't
    assert ping(a, str(ip_b), "-M", "do", "-s", "1422")
    assert not ping(a, str(ip_b), "-M", "do", "-s", "1423")


def test_delegate_overrides_reach_the_bridge(host: CniHost) -> None:
    c = host.container()
    host.add(c, host.conf(delegate={"bridge": "weftx", "hairpinMode": True}))
    assert addresses(host.netns, "weftx") == ["198.19.5.1/24"]
    assert not link_exists(host.netns, "weft0")


def test_ptp_attachment_routes_each_container_without_a_bridge(host: CniHost) -> None:
    ptp = host.conf(delegate={"type": "ptp"})
    a, b = host.container(), host.container()
    ra, rb = host.add(a, ptp), host.add(b, ptp)
    ip_a = ipaddress.ip_interface(ra["ips"][0]["address"]).ip
    ip_b = ipaddress.ip_interface(rb["ips"][0]["address"]).ip
    assert {ip_a, ip_b} <= set(ipaddress.ip_network("198.19.5.0/24").hosts())
    assert not link_exists(host.netns, "weft0")
    # the container's default route points at the gateway, which sits on the host end
    # of its veth; the host routes each container address to its own veth
    routes = json.loads(ip("-n", a, "-j", "route", "show", "default").stdout)
    assert [r["gateway"] for r in routes] == ["198.19.5.1"]
    host_routes = json.loads(ip("-n", host.netns, "-j", "route", "show", f"{ip_a}/32").stdout)
    (veth,) = [r["dev"] for r in host_routes]
    assert "198.19.5.1/32" in addresses(host.netns, veth)
    (link,) = json.loads(ip("-n", a, "-j", "link", "show", "dev", "eth0").stdout)
    assert link["mtu"] == 1450
    # neighbours on one host go through the host's routing, with the full overlay MTU
    ip("netns", "exec", host.netns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    assert ping(a, str(ip_b), "-M", "do", "-s", "1422")
    host.check(a, ra, ptp)
    host.delete(a, ra, ptp)
    assert not link_exists(a, "eth0")
    assert not link_exists(host.netns, veth)
    assert ping(b, "198.19.5.1")


@requires(shutil.which("iptables") is not None,
          "the bridge plugin masquerades through iptables, not installed")
@pytest.mark.parametrize("agent_masquerades", [True, False])
def test_bridge_masquerades_only_when_the_agent_does_not(host: CniHost,
                                                          agent_masquerades: bool) -> None:
    host.subnet_env.write_text(host.subnet_env.read_text().replace(
        "FLANNEL_IPMASQ=true", f"FLANNEL_IPMASQ={str(agent_masquerades).lower()}"))
    c = host.container()

    def nat_rules() -> str:
        return subprocess.run(["ip", "netns", "exec", host.netns, "iptables", "-t", "nat",
                               "-S", "POSTROUTING"], capture_output=True, text=True,
                              check=True).stdout

    result = host.add(c)
    assert ("CNI-" in nat_rules()) is not agent_masquerades
    host.delete(c, result)
    assert "CNI-" not in nat_rules()


def test_del_removes_the_interface_and_releases_the_address(host: CniHost) -> None:
    # a /30 leaves exactly one container address next to the gateway
    host.write_subnet_env("198.19.6.0/30")
    first, second = host.container(), host.container()
    result = host.add(first)
    assert addresses(first) == ["198.19.6.2/30"]
    with pytest.raises(CniError) as full:  # the only address is taken
        host.add(second)
    assert "198.19.6" in str(full.value) or "no IP addresses available" in str(full.value)
    host.delete(second)  # the runtime cleans up the failed ADD
    host.delete(first, result)
    assert not link_exists(first, "eth0")
    assert not list(host.data_dir.glob(f"{first}*"))  # the saved delegate config is gone
    host.add(second)
    assert addresses(second) == ["198.19.6.2/30"]


def test_del_is_idempotent_and_succeeds_for_a_container_that_is_gone(host: CniHost) -> None:
    host.write_subnet_env("198.19.6.0/30")
    c, d = host.container(), host.container()
    result = host.add(c)
    ip("netns", "del", c)  # the container died with its namespace
    host.containers.remove(c)
    host.delete(c, result)
    host.delete(c, result)
    # DEL without a namespace at all, for a container weft never saw
    cni_del(host.conf(), None, "never-added", "eth0", host.netns, CNI_PATH)
    # the address went back to the pool, and no veth is left on the bridge
    host.add(d)
    assert addresses(d) == ["198.19.6.2/30"]
    bridged = json.loads(ip("-n", host.netns, "-j", "link", "show", "master", "weft0").stdout)
    assert len(bridged) == 1


def test_del_works_after_subnet_env_is_gone(host: CniHost) -> None:
    c = host.container()
    result = host.add(c)
    host.subnet_env.unlink()  # the agent is down; the container still must go
    host.delete(c, result)
    assert not link_exists(c, "eth0")


def test_check_passes_on_a_healthy_container(host: CniHost) -> None:
    c = host.container()
    result = host.add(c)
    before = addresses(c)
    # As a runtime execs it: the spec's success is exit 0 with nothing on stdout.
    rc, out = host.raw("CHECK", json.dumps(host.conf(prevResult=result)).encode(), c)
    assert (rc, out) == (0, {})
    host.check(c, result)  # through the runtime library: no CniError either
    assert addresses(c) == before == [result["ips"][0]["address"]]  # CHECK changed nothing


@pytest.mark.parametrize(("breakage", "words"), [
    (["link", "del", "eth0"], ["eth0", "not found"]),
    (["addr", "flush", "dev", "eth0"], ["{address}", "eth0"]),
])
def test_check_fails_on_a_broken_container(host: CniHost, breakage: list[str],
                                           words: list[str]) -> None:
    c = host.container()
    result = host.add(c)
    ip("-n", c, *breakage)
    with pytest.raises(CniError) as exc:
        host.check(c, result)
    # The bridge plugin's own spec error, passed through: it names what it found broken.
    address = result["ips"][0]["address"]
    for word in words:
        assert word.format(address=address) in exc.value.msg, exc.value


def test_check_fails_when_the_host_subnet_changed(host: CniHost) -> None:
    c = host.container()
    result = host.add(c)
    host.write_subnet_env("198.19.9.0/24")  # the agent lost its lease and got another one
    with pytest.raises(CniError) as exc:
        host.check(c, result)
    assert exc.value.code == ErrorCode.SUBNET_CHANGED
    assert "198.19.5.0/24" in exc.value.msg


def test_runs_inside_a_conflist_with_portmap(host: CniHost) -> None:
    conflist = {"cniVersion": "1.0.0", "name": "weft", "plugins": [
        {k: v for k, v in host.conf().items() if k not in ("cniVersion", "name")},
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ]}
    c = host.container()
    result = cni_add(conflist, f"/var/run/netns/{c}", c, "eth0", host.netns, CNI_PATH)
    assert addresses(c) == [result["ips"][0]["address"]]
    cni_check(conflist, f"/var/run/netns/{c}", c, "eth0", host.netns, CNI_PATH,
              prev_result=result)
    cni_del(conflist, f"/var/run/netns/{c}", c, "eth0", host.netns, CNI_PATH,
            prev_result=result)
    assert not link_exists(c, "eth0")


# --- every error is the spec's JSON error ---------------------------------------------------


def test_missing_subnet_env_says_the_agent_is_not_running(host: CniHost) -> None:
    host.subnet_env.unlink()
    rc, out = host.raw("ADD", json.dumps(host.conf()).encode())
    assert_spec_error(rc, out, ErrorCode.TRY_AGAIN_LATER, "subnet.env", "agent")
    assert out["cniVersion"] == "1.0.0"


@pytest.mark.parametrize(("command", "stdin", "env", "code", "words"), [
    ("ADD", b"{not json", {}, ErrorCode.DECODE_FAILURE, ["decode"]),
    ("ADD", b"[1, 2]", {}, ErrorCode.DECODE_FAILURE, ["object"]),
    ("FROB", None, {}, ErrorCode.INVALID_ENVIRONMENT, ["CNI_COMMAND", "FROB"]),
    ("-", None, {}, ErrorCode.INVALID_ENVIRONMENT, ["CNI_COMMAND"]),
    ("ADD", None, {"CNI_NETNS": "-"}, ErrorCode.INVALID_ENVIRONMENT, ["CNI_NETNS"]),
    ("DEL", None, {"CNI_CONTAINERID": "-", "CNI_PATH": "-"}, ErrorCode.INVALID_ENVIRONMENT,
     ["CNI_CONTAINERID", "CNI_PATH"]),
    ("ADD", None, {"CNI_CONTAINERID": "../../etc"}, ErrorCode.INVALID_ENVIRONMENT,
     ["CNI_CONTAINERID", "../../etc"]),
    ("ADD", None, {"CNI_IFNAME": "much-too-long-name"}, ErrorCode.INVALID_ENVIRONMENT,
     ["CNI_IFNAME"]),
    ("ADD", None, {"CNI_PATH": "/nonexistent"}, ErrorCode.INVALID_ENVIRONMENT,
     ["bridge", "CNI_PATH"]),
])
def test_bad_environment_or_input_is_a_spec_error(
        host: CniHost, command: str, stdin: bytes | None, env: dict[str, str], code: int,
        words: list[str]) -> None:
    c = host.container()
    rc, out = host.raw(command, json.dumps(host.conf()).encode() if stdin is None else stdin,
                       c, **env)
    assert_spec_error(rc, out, code, *words)
    assert not link_exists(host.netns, "weft0")  # nothing half-applied


@pytest.mark.parametrize(("change", "code", "words"), [
    ({"cniVersion": "9.9.9"}, ErrorCode.INCOMPATIBLE_VERSION, ["9.9.9"]),
    ({"cniVersion": "0.2.0"}, ErrorCode.INCOMPATIBLE_VERSION, ["0.2.0"]),
    ({"cniVersion": None}, ErrorCode.INVALID_NETWORK_CONFIG, ["cniVersion"]),
    ({"name": None}, ErrorCode.INVALID_NETWORK_CONFIG, ["name"]),
    ({"name": "bad name", "cniVersion": "0.4.0"}, ErrorCode.INVALID_NETWORK_CONFIG,
     ["bad name"]),
    ({"type": None}, ErrorCode.INVALID_NETWORK_CONFIG, ["type"]),
    ({"dataDir": "relative/dir"}, ErrorCode.INVALID_NETWORK_CONFIG, ["dataDir"]),
    ({"subnetFile": 42}, ErrorCode.INVALID_NETWORK_CONFIG, ["subnetFile", "42"]),
    ({"delegate": "bridge"}, ErrorCode.INVALID_NETWORK_CONFIG, ["delegate"]),
    ({"delegate": {"ipam": {"type": "dhcp"}}}, ErrorCode.UNSUPPORTED_FIELD,
     ["delegate.ipam", "dhcp"]),
    ({"delegate": {"type": "../../bin/sh"}}, ErrorCode.INVALID_NETWORK_CONFIG,
     ["delegate.type"]),
])
def test_bad_network_config_is_a_spec_error(
        host: CniHost, change: dict[str, Any], code: int, words: list[str]) -> None:
    conf = {k: v for k, v in {**host.conf(), **change}.items() if v is not None}
    c = host.container()
    rc, out = host.raw("ADD", json.dumps(conf).encode(), c)
    assert_spec_error(rc, out, code, *words)
    # the error speaks the config's version when that one is supported
    assert out["cniVersion"] == (conf["cniVersion"] if code != ErrorCode.INCOMPATIBLE_VERSION
                                 and "cniVersion" in conf else "1.0.0")
    assert not link_exists(host.netns, "weft0")
    assert not link_exists(c, "eth0")


def test_check_needs_cni_version_0_4_0(host: CniHost) -> None:
    c = host.container()
    rc, out = host.raw("CHECK", json.dumps(host.conf(cniVersion="0.3.1", prevResult={}))
                       .encode(), c)
    assert_spec_error(rc, out, ErrorCode.INCOMPATIBLE_VERSION, "CHECK")
    assert out["cniVersion"] == "0.3.1"


def test_check_of_an_unknown_container_is_error_3(host: CniHost) -> None:
    c = host.container()
    rc, out = host.raw("CHECK", json.dumps(host.conf(prevResult={"cniVersion": "1.0.0"}))
                       .encode(), c)
    assert_spec_error(rc, out, ErrorCode.UNKNOWN_CONTAINER, c)


def test_a_delegate_failure_passes_its_error_through(host: CniHost) -> None:
    # the bridge plugin itself refuses: the namespace does not exist
    rc, out = host.raw("ADD", json.dumps(host.conf()).encode(), "ghost")
    assert rc != 0
    assert set(out) >= {"cniVersion", "code", "msg"}
    assert "ghost" in out["msg"]  # the bridge's message names the netns it could not open
    # and the runtime's DEL after the failed ADD succeeds
    rc, out = host.raw("DEL", json.dumps(host.conf()).encode(), "ghost")
    assert (rc, out) == (0, {})


# --- end to end: two hosts, vxlan, attached through weft-cni --------------------------------


def test_containers_on_two_hosts_reach_each_other_over_vxlan() -> None:
    config = json.dumps({"Network": "198.19.0.0/16", "Backend": {"Type": "vxlan"}})
    with Testbed(hosts=2, containers_per_host=1, config=config) as tb:
        tb.start()
        c1, c2 = tb.containers
        subnets = []
        for c in (c1, c2):
            env = c.host.subnet_env_path.read_text()
            subnets.append(ipaddress.ip_interface(
                next(line.split("=")[1] for line in env.splitlines()
                     if line.startswith("FLANNEL_SUBNET="))).network)
            assert c.ip in subnets[-1], (c.ip, subnets[-1])
        assert subnets[0] != subnets[1]
        assert tb.ping(c1.netns, c2.ip)
        assert tb.ping(c2.netns, c1.ip)
        # the full overlay MTU (1450) crosses vxlan unfragmented
        assert ping(c1.netns, str(c2.ip), "-M", "do", "-s", "1422")
        # detach and re-attach as a runtime restarting the container would
        old = c2.ip
        tb.detach(c2)
        assert not link_exists(c2.netns, "eth0")
        assert not tb.ping(c1.netns, old)
        tb.attach(c2)
        assert tb.ping(c1.netns, c2.ip)


@pytest.mark.parametrize("netns", ["/etc/hostname", "/proc/self/ns/../ns-nope/net",
                                   "relative/netns"])
def test_del_succeeds_and_cleans_up_after_an_add_that_failed_on_a_bad_netns_path(
        host: CniHost, netns: str) -> None:
    """The spec asks DEL to succeed when what ADD would have made is gone: whatever the
    ADD failed on, the runtime's DEL after it ends it (exit 0), the saved delegate config
    goes and no address stays reserved."""
    host.write_subnet_env("198.19.6.0/30")  # one container address: a leak would show
    conf = json.dumps(host.conf()).encode()
    rc, _ = host.raw("ADD", conf, "bad-netns", CNI_NETNS=netns)
    assert rc != 0
    rc, out = host.raw("DEL", conf, "bad-netns", CNI_NETNS=netns)
    assert (rc, out) == (0, {})
    assert not [p.name for p in host.data_dir.glob("*bad-netns*")]
    c = host.container()
    host.add(c)  # the only address is free
    assert addresses(c) == ["198.19.6.2/30"]
