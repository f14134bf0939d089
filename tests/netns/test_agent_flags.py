"""Every agent flag checked before anything changes, and the metrics endpoint bounded
(issue 25): a --metrics-addr that cannot be bound is one line before the lease; idle
connections to the metrics port neither pile up threads nor stay open."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from helpers import network_config as config
from helpers import scrape, wait_for
from weft_lab.testbed import Host, Testbed, netns_exec

pytestmark = pytest.mark.netns

METRICS = "127.0.0.1:9464"
IDLE = 300  # connections that never send a request


@pytest.fixture(scope="module")
def tb() -> Iterator[Testbed]:
    with Testbed(hosts=2, containers_per_host=0, config=config("vxlan")) as bed:
        bed.start_agent(bed.hosts[0], ["--metrics-addr", METRICS])
        bed.wait_subnet_env(bed.hosts[0])
        yield bed


def second_agent(tb: Testbed, host: Host, metrics_addr: str) -> subprocess.CompletedProcess[str]:
    return tb.run(host.netns, [sys.executable, "-m", "weft", "agent", "--store", tb.store_url,
                               "--iface", "eth0", "--public-ip", str(host.underlay_ip),
                               "--subnet-file", str(host.subnet_env_path),
                               "--state-dir", str(host.state_dir), "--log-level", "warning",
                               "--metrics-addr", metrics_addr], check=False, timeout=60)


def nothing_changed(tb: Testbed, host: Host) -> None:
    """No lease for `host`, no subnet.env, no device of weft's."""
    assert str(host.underlay_ip) not in {str(lease.public_ip) for lease in tb.leases()}
    assert not host.subnet_env_path.exists()
    links = json.loads(tb.run(host.netns, ["ip", "-j", "link"]).stdout)
    assert not [x["ifname"] for x in links if x["ifname"].startswith("weft")]


@pytest.mark.parametrize("why", ["an address the host lacks", "a port in use"])
def test_a_metrics_address_that_cannot_be_bound_is_one_line_before_the_lease(
        tb: Testbed, why: str) -> None:
    h2 = tb.hosts[1]
    listener = None
    if why == "a port in use":
        addr = "127.0.0.1:9470"
        listener = subprocess.Popen(netns_exec(h2.netns, [
            sys.executable, "-c",
            "import socket, sys, time\n"
            "s = socket.create_server(('127.0.0.1', 9470)); print('up', flush=True)\n"
            "sys.stdin.read()"]), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert listener.stdout is not None
        assert listener.stdout.readline().strip() == "up"
    else:
        addr = "198.18.0.250:9464"
    try:
        proc = second_agent(tb, h2, addr)
    finally:
        if listener is not None:
            listener.communicate("", timeout=10)
    assert proc.returncode != 0
    message = proc.stderr.strip() or proc.stdout.strip()
    assert len(message.splitlines()) == 1, message
    assert f"--metrics-addr {addr}: cannot listen there" in message
    nothing_changed(tb, h2)


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_idle_metrics_connections_are_capped_and_closed(tb: Testbed) -> None:
    h1 = tb.hosts[0]
    assert h1.agent is not None
    pid = h1.agent.pid
    wait_for("the metrics endpoint up", lambda: scrape(h1.netns, METRICS), 30,
             ignore=(subprocess.CalledProcessError,))
    before = threads(pid)
    # IDLE connections that send nothing; the holder says how many the server closed.
    holder = subprocess.Popen(netns_exec(h1.netns, [
        sys.executable, "-c",
        "import socket, select, sys\n"
        f"conns = [socket.create_connection(('127.0.0.1', 9464)) for _ in range({IDLE})]\n"
        "print('open', flush=True)\n"
        "open_ = set(conns)\n"
        "while open_:\n"
        "    ready, _, _ = select.select(list(open_), [], [], 60)\n"
        "    if not ready:\n"
        "        print('still open', len(open_), flush=True)\n"
        "        break\n"
        "    for c in ready:\n"
        "        try:\n"
        "            data = c.recv(1)\n"
        "        except OSError:\n"
        "            data = b''\n"
        "        if not data:\n"
        "            open_.discard(c)\n"
        "            print('closed', len(open_), flush=True)\n"
        "sys.stdin.read()\n"]), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "open"
        peak = threads(pid)
        # Every idle connection is closed by the agent: over the cap at once, the rest
        # when their idle timeout runs out (the holder gives up after a minute of none).
        last = ""
        while last != "closed 0":
            last = holder.stdout.readline().strip()
            assert last.startswith("closed"), last
            peak = max(peak, threads(pid))
        # The endpoint answers again, and the agent's status too.
        wait_for("a scrape", lambda: scrape(h1.netns, METRICS), 30,
                 ignore=(subprocess.CalledProcessError,))
        assert tb.host_status(h1)["subnet"]
    finally:
        holder.communicate("", timeout=10)
    print(f"\n{IDLE} idle metrics connections: agent threads {before} -> at most {peak}")
    assert peak - before <= 8, (before, peak)  # a few workers, not a thread per connection
