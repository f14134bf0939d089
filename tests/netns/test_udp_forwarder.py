"""The udp data plane end to end: real TUN devices, real UDP sockets, real kernels in
namespaces, driven by real `weft agent` processes on the testbed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

from forged import LISTENER, PACKETS
from helpers import wait_for
from weft_lab.testbed import Host, Testbed

pytestmark = pytest.mark.netns

CONFIG = json.dumps({"Network": "198.19.0.0/16", "Backend": {"Type": "udp"}})
PORT = 8285

# A TCP sink: prints how many bytes arrived and their sha256.
SINK = textwrap.dedent("""
    import hashlib, socket, sys
    srv = socket.create_server(("0.0.0.0", int(sys.argv[1])))
    print("ready", flush=True)
    conn, _ = srv.accept()
    h, n = hashlib.sha256(), 0
    while chunk := conn.recv(1 << 20):
        h.update(chunk); n += len(chunk)
    print(n, h.hexdigest(), flush=True)
""")

# A TCP source: sends SIZE pseudo-random bytes, prints their count and sha256.
SOURCE = textwrap.dedent("""
    import hashlib, random, socket, sys
    host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    data = random.Random(5).randbytes(size)
    with socket.create_connection((host, port), timeout=60) as s:
        s.sendall(data)
    print(size, hashlib.sha256(data).hexdigest(), flush=True)
""")

# Sends weft-encapsulated datagrams built independently of weft's codec:
#   argv: target_ip port kind count inner_src inner_dst [source_port]
# kind "garbage": random bytes; "wellformed": header + vnet header + IPv4/UDP to
# inner_dst:7777 carrying b"forged-<src>". With source_port (root, a raw socket): sent
# from that port, as the member's forwarder would.
FORGER = PACKETS + textwrap.dedent("""
    target, port, kind, count, src, dst = sys.argv[1:7]
    wellformed = weft_udp(inner_ipv4(src, dst, b"forged-" + src.encode()))
    sport = int(sys.argv[7]) if len(sys.argv) > 7 else 0
    if sport:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(int(count)):
        d = os.urandom(1 + i % 1400) if kind == "garbage" else wellformed
        if sport:  # our own UDP header, checksum 0 (none, allowed over IPv4)
            s.sendto(struct.pack("!HHHH", sport, int(port), 8 + len(d), 0) + d, (target, 0))
        else:
            s.sendto(d, (target, int(port)))
    print("sent", count, flush=True)
""")


def python_in(tb: Testbed, netns: str, script: str, *args: object,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return tb.run(netns, [sys.executable, "-c", script, *map(str, args)], timeout=timeout)


def spawn_python(netns: str, script: str, *args: object) -> subprocess.Popen[str]:
    proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", script,
                             *map(str, args)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def backend_status(tb: Testbed, host: Host) -> dict[str, Any]:
    status: dict[str, Any] = tb.host_status(host)["backend_status"]
    return status


def test_large_tcp_transfer_arrives_intact_in_batches() -> None:
    size = 50 << 20
    with Testbed(hosts=2, containers_per_host=1, config=CONFIG) as tb:
        tb.start()
        src, dst = tb.containers
        sink = spawn_python(dst.netns, SINK, 5001)
        try:
            sent = python_in(tb, src.netns, SOURCE, dst.ip, 5001, size).stdout.split()
            received, _ = sink.communicate(timeout=60)
        finally:
            sink.kill()
        assert received.split() == sent
        assert sent[0] == str(size)
        tx = backend_status(tb, src.host)
        rx = backend_status(tb, dst.host)
        assert tx["offloads"]["tun_tso"], tx["offloads"]
        assert tx["offloads"]["udp_gso"], tx["offloads"]
        assert rx["offloads"]["udp_gro"], rx["offloads"]
        # Batching is what makes Python fast enough: far fewer system calls than
        # datagrams on the wire, and super-packets far larger than the overlay MTU.
        assert tx["tx"]["bytes"] >= size
        assert tx["tx"]["datagrams"] >= 4 * tx["tx"]["batches"], tx["tx"]
        assert rx["rx"]["datagrams"] >= 4 * rx["rx"]["batches"], rx["rx"]
        assert rx["rx"]["bytes"] / rx["rx"]["packets"] > 4 * rx["mtu"], rx["rx"]
        # Every datagram is small enough for the underlay: none was IP-fragmented.
        frag = tb.run(dst.host.netns, ["cat", "/proc/net/snmp"]).stdout
        ip_rows = [line.split() for line in frag.splitlines() if line.startswith("Ip:")]
        reasm = dict(zip(ip_rows[0], ip_rows[1], strict=True))["ReasmReqds"]
        assert reasm == "0"


def test_without_offloads_the_transfer_still_arrives_intact() -> None:
    config = json.dumps({"Network": "198.19.0.0/16",
                         "Backend": {"Type": "udp", "Offloads": False}})
    with Testbed(hosts=2, containers_per_host=1, config=config) as tb:
        tb.start()
        src, dst = tb.containers
        sink = spawn_python(dst.netns, SINK, 5001)
        try:
            sent = python_in(tb, src.netns, SOURCE, dst.ip, 5001, 5 << 20).stdout.split()
            received, _ = sink.communicate(timeout=60)
        finally:
            sink.kill()
        assert received.split() == sent
        status = backend_status(tb, src.host)
        assert not any(status["offloads"][k] for k in ("tun_tso", "udp_gso", "udp_gro"))
        assert "offloads disabled by the Offloads option" in status["offloads"]["fallbacks"]
        assert status["tx"]["datagrams"] == status["tx"]["batches"]


def test_forged_datagrams_are_dropped_and_counted_while_members_talk() -> None:
    with Testbed(hosts=2, containers_per_host=1, config=CONFIG) as tb:
        tb.start()
        src, dst = tb.containers
        h1, h2 = tb.hosts
        intruder = tb.add_underlay_node("intr", "198.18.0.99")
        h1_tun_ip = next(str(lease.subnet.network_address) for lease in tb.leases()
                         if lease.public_ip == h1.underlay_ip)
        listener = spawn_python(dst.netns, LISTENER, 8)
        ping = subprocess.Popen(["ip", "netns", "exec", src.netns, "ping", "-q", "-i", "0.02",
                                 "-c", "150", "-W", "1", str(dst.ip)],
                                stdout=subprocess.PIPE, text=True)
        try:
            target = (h2.underlay_ip, PORT)
            # A non-member: garbage, and well-formed datagrams claiming a member's source.
            python_in(tb, intruder, FORGER, *target, "garbage", 300, src.ip, dst.ip)
            python_in(tb, intruder, FORGER, *target, "wellformed", 300, src.ip, dst.ip)
            # The member's IP but another port: any process on that host.
            python_in(tb, h1.netns, FORGER, *target, "wellformed", 30, h1_tun_ip, dst.ip)
            # The member itself (its port): garbage, and a packet whose inner source is not
            # in its subnet.
            python_in(tb, h1.netns, FORGER, *target, "garbage", 100, src.ip, dst.ip, PORT)
            python_in(tb, h1.netns, FORGER, *target, "wellformed", 50, "198.19.250.9", dst.ip,
                      PORT)
            # ...and one honest packet from the member's own overlay address, encoded by
            # this test rather than by weft: it must arrive.
            python_in(tb, h1.netns, FORGER, *target, "wellformed", 1, h1_tun_ip, dst.ip, PORT)
            ping_out, _ = ping.communicate(timeout=60)
            heard, _ = listener.communicate(timeout=30)
        finally:
            ping.kill()
            listener.kill()
        assert " 0% packet loss" in ping_out, ping_out
        assert heard.split() == [f"forged-{h1_tun_ip}"]
        # Non-members (the intruder, and the member's IP from another port) never reach
        # the forwarder: the ingress filter drops and counts them.
        assert tb.host_status(h2)["ingress"]["dropped"]["non_member"] == 630
        drops = backend_status(tb, h2)["rx"]["drops"]
        assert drops.get("unknown_peer", 0) == 0, drops
        assert drops.get("spoofed_source") == 50, drops
        # The member's garbage: every datagram counted under some reason, none delivered.
        member_garbage = sum(v for k, v in drops.items()
                             if k not in ("unknown_peer", "spoofed_source"))
        assert member_garbage >= 100 - 2, drops  # a random 1-byte-header might parse
        assert tb.host_status(h2)["errors"] == {}


def test_restart_keeps_the_device_and_route_and_traffic_resumes() -> None:
    with Testbed(hosts=2, containers_per_host=1, config=CONFIG) as tb:
        tb.start()
        src, dst = tb.containers
        h1 = tb.hosts[0]

        def device() -> tuple[str, str]:
            link = tb.run(h1.netns, ["ip", "-o", "link", "show", "weft.udp0"]).stdout
            route = tb.run(h1.netns, ["ip", "route", "show", "proto", "87"]).stdout
            # "linkdown" while no process holds the TUN: the route stays, traffic waits
            return link.split(":")[0], route.replace(" linkdown", "").strip()

        before = device()
        assert "198.19.0.0/16 dev weft.udp0" in before[1]
        assert tb.stop_agent(h1) == 0
        assert device() == before  # persistent TUN: same device, route still there
        tb.start_agent(h1)
        tb.wait_converged(30)
        assert device() == before
        wait_for("traffic after the restart", lambda: tb.ping(src.netns, dst.ip), 30,
                 interval=0.2)


# Opens a forwarder on a fresh TUN device, brings it up, waits until both its threads are
# blocked in the kernel, closes it, and says whether each thread ended: without the wake-up
# (close() joins each for 2 s and gives up) they would still be blocked, alive.
CLOSE_WAKES = textwrap.dedent("""
    import ipaddress, subprocess, sys, time
    from weft.backends.udp.daemon import open_forwarder
    from weft.backends.udp.tun import delete_tun
    dev = sys.argv[1]
    fwd = open_forwarder(dev, ipaddress.ip_address(sys.argv[2]), 8399, 1500, 4, 24)
    fwd.start()
    subprocess.run(["ip", "link", "set", dev, "up"], check=True)
    threads = list(fwd._threads)

    def blocked(t):  # asleep in the kernel (a read), not running Python
        with open(f"/proc/self/task/{t.native_id}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "S"

    deadline = time.monotonic() + 30
    while not all(blocked(t) for t in threads):
        assert time.monotonic() < deadline, "the threads never blocked"
        time.sleep(0.01)
    fwd.close()
    print(*(t.is_alive() for t in threads), fwd.running)
    delete_tun(dev)
""")


def test_close_wakes_both_blocked_threads() -> None:
    with Testbed(hosts=1, containers_per_host=0, config=CONFIG) as tb:
        host = tb.hosts[0]
        out = python_in(tb, host.netns, CLOSE_WAKES, "weft.t0", host.underlay_ip)
        assert out.stdout.split() == ["False", "False", "False"], out.stdout + out.stderr
        assert "did not stop" not in out.stderr, out.stderr
        assert "weft.t0" not in tb.run(host.netns, ["ip", "-br", "link"]).stdout


def test_resync_recreates_a_deleted_device() -> None:
    with Testbed(hosts=2, containers_per_host=1, config=CONFIG,
                 agent_args=["--resync-interval", "1"]) as tb:
        tb.start()
        src, dst = tb.containers
        index_before = tb.run(src.host.netns, ["ip", "-o", "link", "show", "weft.udp0"]).stdout
        tb.run(src.host.netns, ["ip", "link", "del", "weft.udp0"])
        deadline = time.monotonic() + 15
        while not tb.ping(src.netns, dst.ip, wait=0.5):
            assert time.monotonic() < deadline, tb.agent_log(src.host)[-2000:]
        route = tb.run(src.host.netns, ["ip", "route", "show", "proto", "87"]).stdout
        assert "198.19.0.0/16 dev weft.udp0" in route
        index_after = tb.run(src.host.netns, ["ip", "-o", "link", "show", "weft.udp0"]).stdout
        assert index_after.split(":")[0] != index_before.split(":")[0]  # a new device
        assert "udp data plane missing; recreating it" in tb.agent_log(src.host)
