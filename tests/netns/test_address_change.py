"""The host's underlay address changes (issue 25): a DHCP renewal, a re-IP'd VM. Without
--public-ip the agent follows its interface: the same subnet is renewed under the new
address and peers move to it. With --public-ip, a pinned address that leaves the host is an
error (log, `errors`, `weft status`) until it is back; and --public-ip must belong to
--iface."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from helpers import Record, measure, wait_alive
from helpers import network_config as config
from weft_lab.testbed import Host, Testbed

pytestmark = pytest.mark.netns

NEW_IP = "198.18.0.42"


@pytest.fixture(scope="module")
def tb() -> Iterator[Testbed]:
    with Testbed(hosts=2, containers_per_host=1, config=config("vxlan")) as bed:
        bed.start()
        yield bed


def lease_ip(tb: Testbed, subnet: str) -> str | None:
    return next((str(lease.public_ip) for lease in tb.leases()
                 if str(lease.subnet) == subnet), None)


def test_an_unpinned_agent_follows_its_interfaces_new_address(
        tb: Testbed, record_property: Record) -> None:
    h1, h2 = tb.hosts
    tb.stop_agent(h2)
    tb.start_agent(h2, pin_public_ip=False)  # it takes eth0's address itself
    tb.wait_converged(30)
    subnet = tb.host_status(h2)["subnet"]
    assert tb.host_status(h2)["public_ip"] == str(h2.underlay_ip)
    # The old address goes after the new one comes: a secondary of the same subnet must
    # survive its primary's removal (the kernel removes it too without this).
    tb.run(h2.netns, ["sysctl", "-q", "-w", "net.ipv4.conf.eth0.promote_secondaries=1"])

    def readdress() -> None:
        tb.run(h2.netns, ["ip", "addr", "add", f"{NEW_IP}/24", "dev", "eth0"])
        tb.run(h2.netns, ["ip", "addr", "del", f"{h2.underlay_ip}/24", "dev", "eth0"])

    def followed() -> bool:
        try:
            status = tb.host_status(h2)
        except Exception:
            return False  # starting again on the new address
        return (status["public_ip"] == NEW_IP and status["subnet"] == subnet
                and lease_ip(tb, subnet) == NEW_IP
                and tb.weft_routes(h1).get(subnet, {}).get("gateway") in (None, subnet.split("/")[0])
                and NEW_IP in tb.run(h1.netns, ["bridge", "fdb", "show", "dev", "weft.vx1"]).stdout)

    try:
        try:
            measure(tb, record_property, "underlay address changed (no --public-ip: followed)",
                    readdress,
                    followed, src=tb.containers[0], dst=tb.containers[1])
        except AssertionError:
            lines = [x for x in tb.agent_log(h2).splitlines() if '"debug"' not in x]
            raise AssertionError("\n".join(lines[-30:])) from None
        assert tb.host_status(h2)["subnet"] == subnet  # the same subnet, renewed
        assert "underlay address changed; following it" in tb.agent_log(h2)
        tb.wait_converged(10)
    finally:
        tb.run(h2.netns, ["ip", "addr", "add", f"{h2.underlay_ip}/24", "dev", "eth0"],
               check=False)
        tb.run(h2.netns, ["ip", "addr", "del", f"{NEW_IP}/24", "dev", "eth0"], check=False)
    wait_alive(tb, "back on its first address",
               lambda: lease_ip(tb, subnet) == str(h2.underlay_ip))
    tb.wait_converged(20)


def public_ip_error(tb: Testbed, host: Host) -> str | None:
    try:
        error = tb.host_status(host)["errors"].get("public_ip")
    except Exception:
        return None
    return str(error) if error is not None else None


def test_a_pinned_address_that_leaves_the_host_is_an_error_until_it_is_back(
        tb: Testbed) -> None:
    h1 = tb.hosts[0]
    ip = f"{h1.underlay_ip}/24"
    tb.run(h1.netns, ["ip", "addr", "del", ip, "dev", "eth0"])
    try:
        wait_alive(tb, "the error in weft status", lambda: public_ip_error(tb, h1) is not None)
        message = public_ip_error(tb, h1)
        assert message is not None
        assert f"--public-ip {h1.underlay_ip} is no longer an address of eth0" in message
        assert "public address gone" in tb.agent_log(h1)
        cli = tb.weft("status", "--state-dir", str(h1.state_dir), "--store", tb.store_url,
                      netns=h1.netns, check=False).stdout
        assert "no longer an address of eth0" in cli
    finally:
        tb.run(h1.netns, ["ip", "addr", "add", ip, "dev", "eth0"], check=False)
        tb.run(h1.netns, ["ip", "route", "replace", "default", "dev", "eth0"], check=False)
    wait_alive(tb, "the error cleared", lambda: public_ip_error(tb, h1) is None)
    tb.wait_converged(20)


def test_a_public_ip_not_on_the_iface_is_refused_in_one_line(tb: Testbed) -> None:
    h1 = tb.hosts[0]
    run = tb.run_dir / "lo-agent"
    proc = tb.run(h1.netns, [sys.executable, "-m", "weft", "agent", "--store", tb.store_url,
                             "--iface", "lo", "--public-ip", str(h1.underlay_ip),
                             "--subnet-file", str(run / "subnet.env"),
                             "--state-dir", str(run / "state"), "--log-level", "warning"],
                  check=False, timeout=30)
    assert proc.returncode != 0
    message = proc.stderr.strip() or proc.stdout.strip()
    assert len(message.splitlines()) == 1, message
    assert f"--public-ip {h1.underlay_ip} is not an address of --iface lo" in message
