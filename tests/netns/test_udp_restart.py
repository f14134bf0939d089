"""A udp host's agent restarts (kill -9, an upgrade) while its forwarder, a process of its
own, keeps forwarding: no more pings lost than vxlan's kernel data plane loses, one
forwarder per host afterwards (adopted, not duplicated), and a forwarder that dies under
a running agent is started again by it. The times and pings lost are figures
(helpers.record_figure), not bounds."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import PingProbe, metric, record_figure, scrape, wait_for
from weft.backends.udp.control import CONTROL_SOCKET, ControlError, ForwarderSpec, request
from weft.backends.udp.daemon import MODULE
from weft_lab.testbed import Container, Host, Testbed, netns_exec

pytestmark = pytest.mark.netns

Record = Callable[[str, object], None]  # pytest's record_property

RESTARTS = 5
NETWORK = "198.19.0.0/16"


def config(backend: str) -> str:
    return json.dumps({"Network": NETWORK, "Backend": {"Type": backend}})


def backend_status(tb: Testbed, host: Host) -> dict[str, Any]:
    status: dict[str, Any] = tb.host_status(host)["backend_status"]
    return status


def forwarders(tb: Testbed, host: Host) -> list[int]:
    """The udp forwarder processes in `host`'s network namespace."""
    pids = tb.run(host.netns, ["ip", "netns", "pids", host.netns], check=False).stdout.split()
    found = []
    for pid in pids:
        with contextlib.suppress(OSError):
            if MODULE.encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                found.append(int(pid))
    return found


@contextlib.contextmanager
def pinging(src: Container, dst: Container, ipv6: bool = False) -> Iterator[PingProbe]:
    """`ping -i 0.05` from `src` to `dst` (its IPv6 address with `ipv6`), its replies read
    as they come; 20 answered before the body runs, so a first loss is counted."""
    target = dst.ip6 if ipv6 else dst.ip
    probe = PingProbe(netns_exec(src.netns, ["ping", "-D", "-n", "-i", "0.05", str(target)]))
    try:
        probe.wait_replies_after("before the fault", 0.0, count=20)
        yield probe
    finally:
        probe.stop()


def more_replies(probe: PingProbe, what: str, count: int = 20) -> None:
    """Until `count` replies came from now on (traffic flows; a loss before is counted)."""
    probe.wait_replies_after(what, time.time(), count=count)


def lost(probe: PingProbe) -> tuple[int, list[int]]:
    """(pings from the first answered to the last answered, those never answered)."""
    replies = set(probe.replies)
    first, last = min(replies), max(replies)
    return last - first + 1, sorted(set(range(first, last + 1)) - replies)


def kill_9_restarts(tb: Testbed, host: Host, probe: PingProbe) -> float:
    """Kill `host`'s agent with SIGKILL and start it again, RESTARTS times, each time
    until it is back in the mesh and the pings are answered; the mean time that took."""
    took = 0.0
    for _ in range(RESTARTS):
        started = time.monotonic()
        assert tb.stop_agent(host, signal.SIGKILL) != 0
        tb.start_agent(host)
        tb.wait_converged(60)
        took += time.monotonic() - started
        more_replies(probe, "after the restart", 10)
    return took / RESTARTS


RESULTS: dict[str, tuple[int, list[int]]] = {}


@pytest.mark.parametrize("backend", ["vxlan", "udp"])
def test_kill_9_restarts_lose_no_more_pings_than_vxlan(backend: str,
                                                       record_property: Record) -> None:
    with Testbed(hosts=2, containers_per_host=1, config=config(backend),
                 agent_args=["--metrics-addr", "127.0.0.1:9464"]) as tb:
        tb.start()
        h1, h2 = tb.hosts
        src, dst = tb.containers
        before = {h.name: forwarders(tb, h) for h in tb.hosts}
        with pinging(src, dst) as probe:
            took = kill_9_restarts(tb, h1, probe)
            more_replies(probe, "after the last restart")
        sent, missing = lost(probe)
        RESULTS[backend] = (sent, missing)
        record_figure(record_property, f"{backend}: agent killed (kill -9) and restarted, "
                      f"{RESTARTS} times (seconds: back in the mesh, each)", took,
                      pings_lost=len(missing), pings=sent)
        if backend == "udp":
            # The same forwarder process on each host: it outlived every agent and was
            # adopted by the next one, never duplicated.
            after = {h.name: forwarders(tb, h) for h in tb.hosts}
            assert after == before, (before, after)
            assert all(len(pids) == 1 for pids in after.values()), after
            assert backend_status(tb, h1)["forwarder_pid"] == before[h1.name][0]
            assert "udp forwarder adopted" in tb.agent_log(h1)
            assert backend_status(tb, h1)["running"] is True
            # The counters reach the metrics through each new agent and never went back
            # to zero: every ping this run sent was counted by the one forwarder.
            counted = metric(scrape(h1.netns), "weft_backend_events_total",
                             counter="tx_packets")
            assert counted is not None
            assert counted >= sent
        else:
            assert before == {h1.name: [], h2.name: []}
    if backend == "udp":
        # vxlan's kernel data plane is the bar (run first in this module: 0 lost so far).
        bar = len(RESULTS["vxlan"][1]) if "vxlan" in RESULTS else 0
        assert len(missing) <= bar, (RESULTS, missing)


def test_a_forwarder_killed_under_a_running_agent_is_started_again(
        record_property: Record) -> None:
    with Testbed(hosts=2, containers_per_host=1, config=config("udp"),
                 agent_args=["--release-on-exit"]) as tb:
        tb.start()
        h1, _ = tb.hosts
        src, dst = tb.containers
        (old,) = forwarders(tb, h1)
        with pinging(src, dst) as probe:
            killed = time.time()
            tb.run(h1.netns, ["kill", "-9", str(old)])
            # The device loses its carrier: the agent hears it, starts a new forwarder,
            # gives it the peers.
            wait_for("a new forwarder",
                     lambda: len(new := forwarders(tb, h1)) == 1 and new[0] != old,
                     seen=lambda: forwarders(tb, h1))
            more_replies(probe, "through the new forwarder")
        missing, back = probe.outage(killed)
        record_figure(record_property, "udp forwarder process killed (kill -9)", back,
                      pings_lost=missing)
        (new,) = forwarders(tb, h1)
        status = backend_status(tb, h1)
        assert status["forwarder_pid"] == new
        assert status["peers"] == {str(lease.subnet): f"{lease.public_ip}:8285"
                                   for lease in tb.leases() if lease.public_ip != h1.underlay_ip}
        assert "udp forwarder is not answering" in tb.agent_log(h1)
        assert "udp forwarder started" in tb.agent_log(h1)
        assert tb.host_status(h1)["host_errors"] == {}
        # Leaving (--release-on-exit) stops it, with its device and control socket.
        assert tb.stop_agent(h1) == 0
        assert forwarders(tb, h1) == []
        assert "weft.udp0" not in tb.run(h1.netns, ["ip", "-br", "link"]).stdout
        assert not (h1.state_dir / CONTROL_SOCKET).exists()


def test_a_forwarder_of_another_spec_is_replaced(tmp_path: Path) -> None:
    """What an upgrade looks like to the agent: the running forwarder is not its own (here
    started by hand with offloads off, which the config does not say), so it goes and the
    agent's own takes its place."""
    with Testbed(hosts=2, containers_per_host=1, config=config("udp")) as tb:
        tb.start()
        h1, _ = tb.hosts
        src, dst = tb.containers
        assert tb.stop_agent(h1, signal.SIGKILL) != 0
        (adopted,) = forwarders(tb, h1)
        tb.run(h1.netns, ["kill", "-9", str(adopted)])
        wait_for("the old forwarder gone", lambda: not forwarders(tb, h1))
        with (tmp_path / "stranger.log").open("wb") as log:
            stranger = subprocess.Popen(
                netns_exec(h1.netns, [
                    sys.executable, "-m", MODULE, "--state-dir", str(h1.state_dir),
                    "--device", "weft.udp0", "--bind-ip", str(h1.underlay_ip), "--port",
                    "8285", "--underlay-mtu", "1500", "--network-version", "4",
                    "--subnet-len", "24", "--no-offloads"]),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for("the stranger's socket", (h1.state_dir / CONTROL_SOCKET).exists)
            tb.start_agent(h1)
            tb.wait_converged(60)
            assert stranger.wait(timeout=30) == 0  # asked to stop, it stopped cleanly
        finally:
            if stranger.poll() is None:
                stranger.kill()
                stranger.wait()
        (mine,) = forwarders(tb, h1)
        assert mine != stranger.pid
        status = backend_status(tb, h1)
        assert status["forwarder_pid"] == mine
        assert "offloads disabled by the Offloads option" not in status["offloads"]["fallbacks"]
        assert "replacing the udp forwarder" in tb.agent_log(h1)
        wait_for("pings through the new one", lambda: tb.ping(src.netns, dst.ip, wait=0.5))


def test_a_removed_state_directory_costs_no_ping_and_no_new_forwarder(
        record_property: Record) -> None:
    """The control socket goes with the directory; the agent finds its forwarder in /proc
    and asks it (SIGHUP) to make the socket again: adopted, not replaced."""
    with Testbed(hosts=2, containers_per_host=1, config=config("udp")) as tb:
        tb.start()
        h1, _ = tb.hosts
        src, dst = tb.containers
        (old,) = forwarders(tb, h1)

        def adopted_again() -> bool:
            try:
                return bool(backend_status(tb, h1).get("forwarder_pid") == old)
            except Exception:  # the status socket is made again too
                return False

        with pinging(src, dst) as probe:
            removed = time.time()
            # Gone at once (renamed away, then removed): `rm -r` itself races the agent,
            # which puts back what it misses while rm still walks the directory.
            gone = h1.state_dir.with_name("state.removed")
            h1.state_dir.rename(gone)
            shutil.rmtree(gone)
            wait_for("the control socket", (h1.state_dir / CONTROL_SOCKET).exists)
            wait_for("the status naming the same forwarder", adopted_again)
            answering = time.time() - removed
            more_replies(probe, "after the state directory came back")
        sent, missing = lost(probe)
        record_figure(record_property, "udp: state directory removed (seconds: the same "
                      "forwarder answering again)", answering, pings_lost=len(missing))
        assert missing == [], (sent, missing)
        assert forwarders(tb, h1) == [old]
        assert "udp forwarder answers again" in tb.agent_log(h1)


@pytest.mark.parametrize("underlay", ["ipv4", "dual"])
def test_an_upgrade_hands_the_device_and_socket_over_without_a_pause(
        tmp_path: Path, record_property: Record, underlay: str) -> None:
    """A forwarder of another version (a copy of weft with one module changed) is running
    when the agent starts: the agent's own takes its device, socket and table over (fds
    passed on the control socket) and it exits, under a ping. On a dual-stack network over
    a dual underlay, its IPv6 underlay socket too, under an IPv6 ping that crosses it."""
    import weft

    dual = underlay == "dual"
    network = json.dumps({"Network": NETWORK, "EnableIPv6": True,
                          "IPv6Network": "2001:db8:1::/48", "Backend": {"Type": "udp"}})

    older = tmp_path / "older"
    shutil.copytree(Path(weft.__file__).parent, older / "weft",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with (older / "weft" / "backends" / "udp" / "daemon.py").open("a") as f:
        f.write("# another release\n")
    with Testbed(hosts=2, containers_per_host=1, config=network if dual else config("udp"),
                 underlay=underlay) as tb:
        tb.start()
        h1, _ = tb.hosts
        src, dst = tb.containers
        hello, first = request(h1.state_dir / CONTROL_SOCKET, {"op": "hello"})
        assert ("bind_ipv6" in hello["spec"]) is dual
        argv = [sys.executable, "-m", MODULE, "--state-dir", str(h1.state_dir),
                *ForwarderSpec(**hello["spec"]).argv(), "--take-over"]
        with pinging(src, dst, ipv6=dual) as probe:
            assert tb.stop_agent(h1, signal.SIGKILL) != 0
            # The older release takes over from this one (the same hand-over, backwards)...
            with (tmp_path / "older.log").open("wb") as log:
                older_proc = subprocess.Popen(
                    ["env", f"PYTHONPATH={older}", *netns_exec(h1.netns, argv)],
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                wait_for("the older forwarder", lambda: forwarders(tb, h1) == [older_proc.pid],
                         seen=lambda: forwarders(tb, h1))
                # Its socket replaces the newer one's: a connection caught in between is
                # reset, and asked again.
                wait_for("the older forwarder answering", lambda: request(
                    h1.state_dir / CONTROL_SOCKET, {"op": "hello"})[0]["version"]
                    != hello["version"], ignore=(ControlError,))
                more_replies(probe, "through the older forwarder", 10)
                # ...and the agent, finding it, hands over to its own.
                started = time.monotonic()
                tb.start_agent(h1)
                tb.wait_converged(60)
                took = time.monotonic() - started
                assert older_proc.wait(timeout=30) == 0
            finally:
                if older_proc.poll() is None:
                    older_proc.kill()
                    older_proc.wait()
            more_replies(probe, "through the agent's own forwarder")
        sent, missing = lost(probe)
        record_figure(record_property, f"udp ({underlay} underlay): forwarder handed over to "
                      "another version and back (seconds: the agent's start)", took,
                      pings_lost=len(missing), pings=sent)
        (mine,) = forwarders(tb, h1)
        assert mine not in (first, older_proc.pid)
        status = backend_status(tb, h1)
        assert (status["forwarder_pid"], status["version"]) == (mine, hello["version"])
        assert "handing the udp forwarder over to this version" in tb.agent_log(h1)
        assert missing == [], (sent, missing)
        if dual:  # the pings crossed the IPv6 underlay socket the forwarders handed over
            assert status["ipv6_underlay"]["tx"]["packets"] > 0
            assert status["ipv6_underlay"]["rx"]["packets"] > 0
