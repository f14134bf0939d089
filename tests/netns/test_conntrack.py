"""Overlay traffic skips conntrack, and destination NAT elsewhere on a host keeps it
tracked (weft.host.masquerade): both sides, in namespaces, on the real kernel."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from helpers import DATA_PLANES, FASTPATH_TOOLS, check_data_plane, wait_for
from weft_lab.testbed import Host, Testbed

pytestmark = pytest.mark.netns

CONFIG = json.dumps({"Network": "198.19.0.0/16", "Backend": {"Type": "vxlan"}})
# A service address on the client's host, DNATed to a container on the other host (what
# kube-proxy does for a ClusterIP). In the benchmarking range, inside the namespaces.
SERVICE_IP = "198.18.200.10"
# Counts forwarded / delivered packets by conntrack state, in a table of the test's own.
PROBE = """\
table ip probe {
    chain forward {
        type filter hook forward priority 0; ct state untracked counter
    }
    chain input {
        type filter hook input priority 0; udp dport 8472 ct state untracked counter
    }
}
"""
SERVE = """\
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 8080)); s.listen(8); s.settimeout(60)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"served"); c.close()
"""
CONNECT = """\
import socket, sys
s = socket.create_connection((sys.argv[1], 80), timeout=3)
print(s.recv(16).decode())
"""


def counters(tb: Testbed, host: Host) -> list[int]:
    out = tb.run(host.netns, ["nft", "-j", "list", "table", "ip", "probe"]).stdout
    return [e["counter"]["packets"] for item in json.loads(out)["nftables"]
            for e in item.get("rule", {}).get("expr", []) if "counter" in e]


def conntrack_status(tb: Testbed, host: Host) -> dict[str, Any]:
    status: dict[str, Any] = tb.host_status(host)["conntrack"]
    return status


def wait_overlay(tb: Testbed, host: Host, overlay: str) -> dict[str, Any]:
    """The host's conntrack status once its overlay traffic is `overlay` (fails after
    20 s with the status it last had)."""
    def reached() -> dict[str, Any] | None:
        status = conntrack_status(tb, host)
        return status if status["overlay"] == overlay else None

    status = wait_for(f"{host.name}'s overlay traffic {overlay}", reached, 20,
                      interval=0.2, seen=lambda: conntrack_status(tb, host))
    assert status is not None
    return status


@pytest.mark.parametrize("plane", list(DATA_PLANES))
def test_overlay_traffic_skips_conntrack_unless_told_to_track(plane: str) -> None:
    # No peer probes: they cross the overlay too, and would move the counters this test
    # reads between two pings of its own.
    with Testbed(hosts=2, containers_per_host=1, config=CONFIG,
                 agent_args=[*DATA_PLANES[plane], "--probe-period", "0"]) as tb:
        tb.start()
        check_data_plane(tb, plane)
        c1, c2 = tb.containers
        h2 = c2.host
        assert conntrack_status(tb, h2) == {"mode": "auto", "overlay": "untracked",
                                            "reason": "no destination NAT on this host"}
        subprocess.run(["ip", "netns", "exec", h2.netns, "nft", "-f", "-"], input=PROBE,
                       text=True, check=True)
        assert tb.ping(c1.netns, c2.ip, count=3)
        forwarded, encapsulated = counters(tb, h2)
        if plane == "fastpath" and FASTPATH_TOOLS:
            # The decapsulated echo requests passed netfilter by, straight into c2.
            assert forwarded == 0
        else:
            assert forwarded >= 3  # the decapsulated echo requests, forwarded untracked
        assert encapsulated >= 3  # the VXLAN packets carrying them, received untracked
        # Told to track, the same traffic is tracked again: the counters stand still.
        tb.stop_agent(h2)
        tb.start_agent(h2, ["--overlay-conntrack", "track"])
        tb.wait_converged()
        assert conntrack_status(tb, h2)["overlay"] == "tracked"
        # The fast path stands down: tracked traffic must meet conntrack.
        assert not tb.host_status(h2)["fastpath"]["active"]
        assert tb.ping(c1.netns, c2.ip, count=3)
        assert counters(tb, h2) == [forwarded, encapsulated]


def test_outside_to_a_remote_container_through_this_host_gets_its_replies() -> None:
    """Masqueraded into the overlay, replies come back to the host's own overlay address:
    those stay tracked, or they would never be un-masqueraded."""
    with Testbed(hosts=2, containers_per_host=1, config=CONFIG) as tb:
        tb.start()
        c1, c2 = tb.containers
        outside = tb.add_underlay_node("out", "198.18.0.200")
        tb.run(outside, ["ip", "route", "add", "198.19.0.0/16", "via", str(c1.host.underlay_ip)])
        assert conntrack_status(tb, c1.host)["overlay"] == "untracked"
        assert tb.ping(outside, c2.ip, count=2)


def _serve(tb: Testbed, netns: str, ip: str) -> subprocess.Popen[str]:
    server = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", SERVE, ip],
                              stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    assert server.stdout.readline().strip() == "ready"
    return server


def _through_service(tb: Testbed, netns: str) -> subprocess.CompletedProcess[str]:
    return tb.run(netns, [sys.executable, "-c", CONNECT, SERVICE_IP], check=False, timeout=20)


def test_a_service_dnat_on_the_clients_host_keeps_its_replies_tracked() -> None:
    # The default resync (60 s) is far beyond the waits below: `nft monitor` seeing the
    # DNAT rule is what makes the agent decide again.
    with Testbed(hosts=2, containers_per_host=1, config=CONFIG) as tb:
        tb.start()
        c1, c2 = tb.containers
        h1 = c1.host
        server = _serve(tb, c2.netns, str(c2.ip))
        try:
            assert conntrack_status(tb, h1)["overlay"] == "untracked"
            # kube-proxy (or Docker publishing a port) arrives after the agent.
            subprocess.run(["ip", "netns", "exec", h1.netns, "nft", "-f", "-"], check=True,
                           text=True, input=(
                               "table ip svc {\n chain pre {\n  type nat hook prerouting "
                               f"priority dstnat;\n  ip daddr {SERVICE_IP} tcp dport 80 "
                               f"dnat to {c2.ip}:8080\n }}\n}}\n"))
            status = wait_overlay(tb, h1, "tracked")
            assert status == {"mode": "auto", "overlay": "tracked", "reason": (
                "destination NAT in ip svc: its replies over the overlay need conntrack")}
            # The fast path (on by default) stands down with it: a reply it carried would
            # pass conntrack by and never be un-DNATed.
            wait_for("the fast path standing down",
                     lambda: not tb.host_status(h1)["fastpath"]["active"],
                     seen=lambda: tb.host_status(h1)["fastpath"])
            fastpath = tb.host_status(h1)["fastpath"]
            assert "destination NAT in ip svc" in fastpath["reason"], fastpath
            done = _through_service(tb, c1.netns)
            assert done.stdout.strip() == "served", done.stderr
            # Forced to untrack, the reply from c2 is never un-DNATed: c1 sees it come
            # from c2's address, not the service's, and the connection fails. This is
            # why `auto` watches for destination NAT.
            tb.stop_agent(h1)
            tb.start_agent(h1, ["--overlay-conntrack", "untrack"])
            tb.wait_converged()
            status = conntrack_status(tb, h1)
            assert status["overlay"] == "untracked"
            assert "ip svc will not see its replies" in status["reason"]
            assert _through_service(tb, c1.netns).returncode != 0
        finally:
            server.kill()
            server.wait()
