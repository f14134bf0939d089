"""The agent heals what it owns: each fault under a running `ping -i 0.05` between
containers on different hosts, with the periodic resync a day away, so whatever brings the
state back is the event triggers (rtnetlink, `nft monitor`, inotify, the store's watch).

Each case asserts the state is back and traffic flows again, and records as a figure (not a
bound) how long recovery took (from the fault until the state is back and traffic flows)
and how many pings were lost: the table printed at the end of the run (and written to
$WEFT_FIGURES) is the one in the docs' self-healing section.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sys
import time
from collections.abc import Iterator

import pytest

from helpers import (
    DATA_PLANES,
    DEADLINE,
    Record,
    check_data_plane,
    kernel_wireguard_missing,
    measure,
    missing,
    record_figure,
    requires,
    sqlite_put,
    wait_for,
    weft_forward_accepts,
)
from helpers import network_config as config
from weft.core.constants import CNI_BRIDGE, NFT_TABLE, UDP_DEVICE, WIREGUARD_DEVICE
from weft.host.forward_accept import COMMENT as FORWARD_COMMENT
from weft_lab.testbed import Host, Testbed

pytestmark = pytest.mark.netns

NO_RESYNC = ["--resync-interval", "86400"]  # the longest allowed: a day
VXLAN_DEVICE = "weft.vx1"


# --- measuring ------------------------------------------------------------------------

# --- kernel state helpers ---------------------------------------------------------------


def link(tb: Testbed, host: Host, name: str) -> dict[str, object] | None:
    proc = tb.run(host.netns, ["ip", "-j", "link", "show", "dev", name], check=False)
    if proc.returncode != 0:
        return None
    links: list[dict[str, object]] = json.loads(proc.stdout or "[]")
    return links[0] if links else None


def link_up(tb: Testbed, host: Host, name: str) -> bool:
    info = link(tb, host, name)
    return info is not None and "UP" in info.get("flags", [])  # type: ignore[operator]


def has_peer_routes(tb: Testbed, host: Host) -> bool:
    subnets = {tb.host_status(h)["subnet"] for h in tb.hosts if h is not host}
    return subnets <= tb.weft_routes(host).keys()


def nft_table(tb: Testbed, host: Host) -> bool:
    proc = tb.run(host.netns, ["nft", "list", "table", "ip", NFT_TABLE], check=False)
    return proc.returncode == 0 and "masquerade" in proc.stdout


def forward_rules(tb: Testbed, host: Host) -> int:
    out = tb.run(host.netns, ["iptables", "-w", "5", "-S", "FORWARD"], check=False).stdout
    return out.count(FORWARD_COMMENT)


def status_answers(tb: Testbed, host: Host) -> bool:
    try:
        return bool(tb.host_status(host).get("subnet"))
    except Exception:
        return False


# --- vxlan: one testbed for the cases that leave it standing ---------------------------


@pytest.fixture(scope="module", params=list(DATA_PLANES))
def vxlan_testbed(request: pytest.FixtureRequest) -> Iterator[Testbed]:
    """Each case on the fast path (the default) and on the nftables path alone."""
    with Testbed(hosts=2, containers_per_host=1, config=config("vxlan"),
                 agent_args=[*NO_RESYNC, *DATA_PLANES[request.param]]) as tb:
        tb.start()
        check_data_plane(tb, request.param)
        yield tb


@pytest.fixture
def vxlan(vxlan_testbed: Testbed) -> Iterator[Testbed]:
    """The shared testbed, which each test must leave as it found it: converged, without
    errors, and carrying traffic both ways (checked after each test)."""
    yield vxlan_testbed
    tb = vxlan_testbed
    tb.wait_converged(DEADLINE)
    c1, c2 = tb.containers
    assert tb.ping(c1.netns, c2.ip, count=2), "the test left the testbed without traffic"
    assert tb.ping(c2.netns, c1.ip, count=2), "the test left the testbed without traffic"


def test_vxlan_device_deleted(vxlan: Testbed, record_property: Record) -> None:
    tb, h1 = vxlan, vxlan.hosts[0]
    mac = link(tb, h1, VXLAN_DEVICE)["address"]  # type: ignore[index]
    measure(tb, record_property, "vxlan device deleted (`ip link del weft.vx1`)",
            lambda: tb.run(h1.netns, ["ip", "link", "del", VXLAN_DEVICE]),
            lambda: link_up(tb, h1, VXLAN_DEVICE) and has_peer_routes(tb, h1))
    assert link(tb, h1, VXLAN_DEVICE)["address"] == mac  # type: ignore[index]
    assert "VXLAN device missing; recreating it" in tb.agent_log(h1)


def test_vxlan_device_mac_changed_is_put_back(vxlan: Testbed, record_property: Record) -> None:
    tb, h1 = vxlan, vxlan.hosts[0]
    mac = link(tb, h1, VXLAN_DEVICE)["address"]  # type: ignore[index]
    measure(tb, record_property, "vxlan device MAC changed (`ip link set weft.vx1 address ...`)",
            lambda: tb.run(h1.netns, ["ip", "link", "set", VXLAN_DEVICE, "address",
                                      "02:de:ad:be:ef:01"]),
            lambda: link(tb, h1, VXLAN_DEVICE)["address"] == mac)  # type: ignore[index]
    assert "VXLAN device MAC changed; putting it back" in tb.agent_log(h1)


def test_vxlan_device_set_down(vxlan: Testbed, record_property: Record) -> None:
    tb, h1 = vxlan, vxlan.hosts[0]
    measure(tb, record_property, "vxlan device set down",
            lambda: tb.run(h1.netns, ["ip", "link", "set", VXLAN_DEVICE, "down"]),
            lambda: link_up(tb, h1, VXLAN_DEVICE) and has_peer_routes(tb, h1))


def test_peer_route_deleted(vxlan: Testbed, record_property: Record) -> None:
    tb, h1 = vxlan, vxlan.hosts[0]
    subnet = tb.host_status(tb.hosts[1])["subnet"]
    measure(tb, record_property, "a peer's route deleted (`ip route del`)",
            lambda: tb.run(h1.netns, ["ip", "route", "del", subnet]),
            lambda: has_peer_routes(tb, h1))


def test_peer_rebuilt_with_a_new_mac_is_followed_at_once(vxlan: Testbed, record_property: Record) -> None:
    tb, h1, h2 = vxlan, vxlan.hosts[0], vxlan.hosts[1]
    old = link(tb, h2, VXLAN_DEVICE)["address"]  # type: ignore[index]

    def rebuild() -> None:  # a reboot: the device is gone, the agent starts afresh
        assert tb.stop_agent(h2, signal.SIGKILL) != 0
        tb.run(h2.netns, ["ip", "link", "del", VXLAN_DEVICE])
        tb.start_agent(h2)

    def followed() -> bool:
        new = link(tb, h2, VXLAN_DEVICE)
        if new is None or new["address"] == old:
            return False
        neigh = tb.run(h1.netns, ["ip", "neigh", "show", "dev", VXLAN_DEVICE]).stdout
        fdb = tb.run(h1.netns, ["bridge", "fdb", "show", "dev", VXLAN_DEVICE]).stdout
        return str(new["address"]) in neigh and str(new["address"]) in fdb

    measure(tb, record_property, "peer's vxlan device rebuilt with a new MAC (agent restarted)", rebuild,
            followed)
    neigh = tb.run(h1.netns, ["ip", "neigh", "show", "dev", VXLAN_DEVICE]).stdout
    assert str(old) not in neigh
    tb.wait_converged(20)


def test_nft_table_deleted(vxlan: Testbed, record_property: Record) -> None:
    tb, h1 = vxlan, vxlan.hosts[0]
    assert nft_table(tb, h1)
    measure(tb, record_property, "`nft delete table ip weft`",
            lambda: tb.run(h1.netns, ["nft", "delete", "table", "ip", NFT_TABLE]),
            lambda: nft_table(tb, h1))


def test_nft_ruleset_flushed(vxlan: Testbed, record_property: Record) -> None:
    tb, h1 = vxlan, vxlan.hosts[0]
    measure(tb, record_property, "`nft flush ruleset`",
            lambda: tb.run(h1.netns, ["nft", "flush", "ruleset"]),
            # A flushed ruleset leaves FORWARD accepting everything with no rule of anyone
            # else, where weft adds no accepts (weft.host.forward_accept); the table is back.
            lambda: nft_table(tb, h1) and forward_rules(tb, h1) == 0)


@requires(shutil.which("iptables") is not None, "needs iptables")
def test_forward_chain_flushed_under_a_drop_policy(vxlan: Testbed, record_property: Record) -> None:
    tb = vxlan
    for host in tb.hosts:  # Docker's policy
        tb.run(host.netns, ["iptables", "-w", "5", "-P", "FORWARD", "DROP"])
    try:
        h1 = tb.hosts[0]
        measure(tb, record_property, "FORWARD flushed under a DROP policy",
                lambda: tb.run(h1.netns, ["iptables", "-w", "5", "-F", "FORWARD"]),
                lambda: forward_rules(tb, h1) == weft_forward_accepts())
    finally:
        for host in tb.hosts:
            tb.run(host.netns, ["iptables", "-w", "5", "-P", "FORWARD", "ACCEPT"])


def test_subnet_env_removed(vxlan: Testbed, record_property: Record) -> None:
    tb, h1 = vxlan, vxlan.hosts[0]
    before = h1.subnet_env_path.read_text()
    measure(tb, record_property, "subnet.env removed",
            lambda: h1.subnet_env_path.unlink(),
            lambda: h1.subnet_env_path.exists())
    assert h1.subnet_env_path.read_text() == before


def test_state_dir_removed(vxlan: Testbed, record_property: Record) -> None:
    tb, h1 = vxlan, vxlan.hosts[0]
    measure(tb, record_property, "state dir removed (`rm -r`)",
            # The agent may put a file back before rmdir (its repair races the rm):
            # the fault happened all the same.
            lambda: shutil.rmtree(h1.state_dir, ignore_errors=True),
            lambda: h1.state_dir.is_dir() and status_answers(tb, h1))
    assert tb.host_status(h1)["subnet"]


def test_second_agent_on_one_state_dir_refuses_and_names_the_holder(vxlan: Testbed) -> None:
    tb, h1 = vxlan, vxlan.hosts[0]
    holder = tb.run(h1.netns, ["pgrep", "-f", "--", f"--state-dir {h1.state_dir}"]).stdout.split()
    proc = tb.run(h1.netns, [*tb_agent_argv(tb, h1)], check=False, timeout=30)
    assert proc.returncode != 0
    message = proc.stderr.strip() or proc.stdout.strip()
    assert "another weft agent" in message, message
    assert any(f"pid {pid}" in message for pid in holder), (holder, message)
    assert "Traceback" not in message
    assert len(message.splitlines()) == 1, message
    tb.check_alive(h1)
    tb.wait_converged(10)


def tb_agent_argv(tb: Testbed, host: Host) -> list[str]:
    return [sys.executable, "-m", "weft", "agent", "--store", tb.store_url,
            "--iface", "eth0", "--public-ip", str(host.underlay_ip),
            "--subnet-file", str(host.run_dir / "other-subnet.env"),
            "--state-dir", str(host.state_dir), "--log-level", "info"]


# --- the other backends' devices ------------------------------------------------------


def test_udp_tun_device_deleted(record_property: Record) -> None:
    with Testbed(hosts=2, containers_per_host=1, config=config("udp", Port=8300),
                 agent_args=NO_RESYNC) as tb:
        tb.start()
        h1 = tb.hosts[0]
        measure(tb, record_property, "udp TUN device deleted (`ip link del weft.udp0`)",
                lambda: tb.run(h1.netns, ["ip", "link", "del", UDP_DEVICE]),
                # udp routes the whole Network to its TUN; the forwarder knows the peers
                lambda: link_up(tb, h1, UDP_DEVICE)
                and "198.19.0.0/16" in tb.weft_routes(h1))


@pytest.mark.parametrize("implementation", ["wireguard-go", "kernel"])
def test_wireguard_device_deleted(record_property: Record, implementation: str) -> None:
    if implementation == "kernel" and (reason := kernel_wireguard_missing()) is not None:
        pytest.skip(reason)  # a kernel feature: not something the CI installs
    if implementation == "wireguard-go" and shutil.which("wireguard-go") is None:
        missing("needs wireguard-go")
    cfg = config("wireguard", PersistentKeepaliveInterval=0, Implementation=implementation)
    with Testbed(hosts=2, containers_per_host=1, config=cfg, agent_args=NO_RESYNC) as tb:
        tb.start()
        h1 = tb.hosts[0]
        measure(tb, record_property, f"wireguard device deleted ({implementation})",
                lambda: tb.run(h1.netns, ["ip", "link", "del", WIREGUARD_DEVICE]),
                lambda: link_up(tb, h1, WIREGUARD_DEVICE)
                and "198.19.0.0/16" in tb.weft_routes(h1))


# --- a host that comes back after its lease was taken ---------------------------------


@pytest.mark.parametrize("plane", list(DATA_PLANES))
def test_host_returning_after_its_lease_was_taken_moves_to_a_new_subnet(
    record_property: Record, plane: str,
) -> None:
    ttl = 3.0
    with Testbed(hosts=3, containers_per_host=1, config=config("vxlan"), lease_ttl=ttl,
                 agent_args=DATA_PLANES[plane]) as tb:
        tb.start()
        check_data_plane(tb, plane)
        h1, h2, h3 = tb.hosts
        old = tb.host_status(h1)["subnet"]
        assert tb.stop_agent(h1, signal.SIGKILL) != 0
        key = f"subnets/{old.replace('/', '-')}"
        wait_for("the lease to expire", lambda: not any(
            str(lease.subnet) == old for lease in tb.leases()), ttl + 30, interval=0.2,
            seen=tb.leases)
        # Another host (a new one, at 198.18.0.99) takes the free subnet, as
        # create-if-absent would; it renews it by hand for the rest of the test.
        taker = json.dumps({"PublicIP": "198.18.0.99", "BackendType": "vxlan",
                            "BackendData": {"VNI": 1, "VtepMAC": "02:00:00:00:00:99"}})
        store = str(tb.run_dir / "store.db")
        sqlite_put(store, key, taker, time.time() + 3600, public_ip="198.18.0.99")
        gateway = _bridge_addresses(tb, h1)
        assert any(a.startswith(old.rsplit(".", 1)[0]) for a in gateway), gateway
        started = time.time()
        tb.start_agent(h1)

        def moved() -> str | None:
            tb.check_alive(h1)
            with contextlib.suppress(Exception):  # the status socket comes up with it
                subnet = tb.host_status(h1)["subnet"]
                if subnet and subnet != old:
                    return str(subnet)
            return None

        new = str(wait_for("h1 to take a new subnet", moved, DEADLINE,
                           seen=lambda: tb.agent_log(h1)[-3000:]))
        took = time.time() - started
        prefix = old.rsplit(".", 1)[0] + "."
        assert not [a for a in _bridge_addresses(tb, h1) if a.startswith(prefix)]
        env = h1.subnet_env_path.read_text()
        assert f"FLANNEL_SUBNET={new.rsplit('.', 1)[0]}.1/24" in env, env
        log = tb.agent_log(h1)
        assert "previous subnet is held by another host now" in log
        assert "stranded_containers" in log
        assert "ExceptionGroup" not in log
        assert "Traceback" not in log
        # The others route the new subnet to h1, and the old one to its new holder.
        wait_for("h2 and h3 to route h1's new subnet",
                 lambda: all(new in tb.weft_routes(h) for h in (h2, h3)), DEADLINE,
                 seen=lambda: tb.weft_routes(h2))
        took = max(took, time.time() - started)
        # h1 carries on with its new lease: it renews it (every ttl/2), and is still up.
        renewed = tb.agent_log(h1).count("lease renewed")

        def renewed_again() -> bool:
            tb.check_alive(h1)
            return tb.agent_log(h1).count("lease renewed") > renewed

        wait_for("h1 to renew its new lease", renewed_again, DEADLINE,
                 seen=lambda: tb.agent_log(h1)[-2000:])
        record_figure(record_property, "host back after its lease was taken: new subnet", took)


def _bridge_addresses(tb: Testbed, host: Host) -> list[str]:
    out = tb.run(host.netns, ["ip", "-j", "addr", "show", "dev", CNI_BRIDGE]).stdout
    return [a["local"] for link in json.loads(out or "[]") for a in link.get("addr_info", [])
            if a.get("family") == "inet"]
