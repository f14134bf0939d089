"""Per-peer health, pure: the probe schedule's rate bound and spread, and what a probe's
outcome does to a peer's record (time passed in)."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import logging
import socket
from collections import Counter
from typing import TypeVar

import pytest

from helpers import wait_for
from weft.agent.peer_health import (
    PACKETS_PER_PROBE,
    HealthBook,
    ProbePolicy,
    ProbeSchedule,
    where_to_look,
)
from weft.agent.probe_keeper import ProbeKeeper, targets
from weft.agent.prober import HEALTH_PORT, SUMMARY_MAX, summary_answer
from weft.backends.auto import wire
from weft.core.lease import Lease

K = TypeVar("K", int, str)


def run(schedule: ProbeSchedule[K], start: float, end: float, tick: float
        ) -> list[tuple[float, K]]:
    sent: list[tuple[float, K]] = []
    t = start
    while t < end:
        sent.extend((t, peer) for peer in schedule.due(t))
        t += tick
    return sent


def test_interval_is_the_period_until_the_cap_binds() -> None:
    policy = ProbePolicy(period=2.0, max_packets_per_second=200.0)
    assert policy.interval(10) == 2.0
    assert policy.interval(200) == 2.0
    assert policy.interval(1_000) == 10.0
    assert policy.interval(5_000) == 50.0


@pytest.mark.parametrize("peers", [3, 100, 1_000, 5_000])
def test_the_packet_rate_never_exceeds_the_cap(peers: int) -> None:
    policy = ProbePolicy(period=2.0, max_packets_per_second=200.0)
    schedule: ProbeSchedule[int] = ProbeSchedule(policy)
    schedule.set_peers(range(peers), 0.0)
    sent = run(schedule, 0.0, 120.0, 0.01)
    per_second = Counter(int(t) for t, _ in sent)
    # The bucket holds a tenth of a second's tokens: one second never carries more.
    assert max(per_second.values()) * PACKETS_PER_PROBE <= 200 + 20
    interval = policy.interval(peers)
    if interval * 2 <= 120:  # every peer got its turn, about every interval
        probed = Counter(peer for _, peer in sent)
        assert len(probed) == peers
        assert min(probed.values()) >= int(120 / interval) - 1


def test_new_peers_are_spread_over_the_interval_not_bunched() -> None:
    schedule: ProbeSchedule[str] = ProbeSchedule(ProbePolicy(period=10.0,
                                                             max_packets_per_second=1e6))
    schedule.set_peers([f"198.19.{i}.0/24" for i in range(100)], 0.0)
    sent = run(schedule, 0.0, 10.0, 0.1)
    per_second = Counter(int(t) for t, _ in sent)
    assert len(sent) == 100
    assert max(per_second.values()) <= 25  # no second gets most of them


def test_each_peer_keeps_its_period() -> None:
    schedule: ProbeSchedule[str] = ProbeSchedule(ProbePolicy(period=1.0))
    schedule.set_peers(["a", "b"], 0.0)
    sent = run(schedule, 0.0, 10.0, 0.05)
    times = [t for t, p in sent if p == "a"]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps
    assert all(0.95 <= g <= 1.1 for g in gaps)


def test_a_missed_peer_is_probed_again_at_once_within_the_cap() -> None:
    schedule: ProbeSchedule[str] = ProbeSchedule(ProbePolicy(period=50.0,
                                                             max_packets_per_second=20.0))
    schedule.set_peers(["a", "b"], 0.0)
    first = run(schedule, 0.0, 50.0, 0.05)
    assert sorted(p for _, p in first) == ["a", "b"]
    schedule.soon("a", 51.0)
    assert schedule.due(51.0) == ["a"]
    schedule.soon("b", 51.01)
    assert schedule.due(51.01) == []  # the cap: 10 probes/s, the token spent
    assert schedule.due(51.11) == ["b"]


def test_the_detection_bound_follows_the_interval() -> None:
    policy = ProbePolicy()
    assert policy.detection_bound(10) == 2.0 + 3 * 1.0 + 1.0
    assert policy.detection_bound(5_000) == 50.0 + 3 * 1.0 + 1.0


def test_a_removed_peer_is_never_probed_again() -> None:
    schedule: ProbeSchedule[str] = ProbeSchedule(ProbePolicy(period=1.0))
    schedule.set_peers(["a", "b"], 0.0)
    run(schedule, 0.0, 2.0, 0.05)
    schedule.set_peers(["b"], 2.0)
    assert {p for _, p in run(schedule, 2.0, 6.0, 0.05)} == {"b"}
    assert len(schedule) == 1


def book() -> HealthBook[str]:
    b: HealthBook[str] = HealthBook(ProbePolicy(misses=3, window=10))
    b.set_peers({"p": ("vxlan", "198.18.0.12")}, 0.0)
    return b


def test_misses_make_a_peer_unreachable_and_one_answer_brings_it_back() -> None:
    b = book()
    kw = {"full_size": 1450, "small_size": 576}
    assert b.result("p", 1.0, rtt=0.001, small=True, **kw) is None  # unknown -> reachable
    assert b.peers["p"].state == "reachable"
    assert b.result("p", 2.0, rtt=None, small=False, **kw) is None
    assert b.result("p", 3.0, rtt=None, small=False, **kw) is None
    assert b.result("p", 4.0, rtt=None, small=False, **kw) == "down"
    assert (b.peers["p"].state, b.peers["p"].since) == ("unreachable", 4.0)
    assert b.result("p", 5.0, rtt=None, small=False, **kw) is None  # said once
    assert b.result("p", 6.0, rtt=0.002, small=True, **kw) == "back"
    row = b.rows(16.0)["p"]
    assert (row["state"], row["since_s"], row["plane"]) == ("reachable", 10.0, "vxlan")
    assert row["loss"] == pytest.approx(4 / 6, abs=0.001)
    assert row["rtt_ms"] == {"median": 1.0, "p99": 2.0}
    assert row["pmtu"] == 1450


def test_misses_before_the_first_answer_are_not_loss() -> None:
    b = book()
    kw = {"full_size": 1450, "small_size": 576}
    b.result("p", 1.0, rtt=None, small=False, **kw)
    b.result("p", 2.0, rtt=0.001, small=True, **kw)
    assert b.rows(3.0)["p"]["loss"] == 0.0


def test_only_the_small_probe_answered_says_the_mtu_is_the_problem() -> None:
    b = book()
    for t in range(3):
        b.result("p", float(t), rtt=None, small=True, full_size=1450, small_size=576)
    row = b.rows(3.0)["p"]
    assert (row["state"], row["pmtu"], row["loss"]) == ("unreachable", 576, 1.0)


def test_a_peer_heard_but_not_reached_is_named_until_its_probes_stop_arriving() -> None:
    """The way from a peer works while its own probes arrive: `hears` names the unreachable
    peers heard within the detection bound (the way back from here is the broken one)."""
    b = book()
    kw = {"full_size": 1450, "small_size": 576}
    bound = b.policy.detection_bound(1)
    b.heard("p", 1.5)  # its last probe before it went down (its agent stopping)
    for t in range(3):
        b.result("p", float(t), rtt=None, small=False, **kw)
    assert b.hears(2.5) == []  # heard only before it went unreachable: its agent may be gone
    assert b.hears(3.0) == []
    b.heard("p", 2.5)
    assert b.hears(2.6) == []  # one probe since: maybe the last of an agent stopping
    b.heard("p", 3.0)
    b.heard("stranger", 3.0)  # not a peer: ignored
    assert b.hears(3.0 + bound) == ["p"]
    row = b.rows(4.0)["p"]
    assert (row["heard_s"], row["hears"]) == (1.0, True)
    assert b.hears(3.0 + bound + 0.1) == []
    b.result("p", 5.0, rtt=0.001, small=True, **kw)
    assert b.hears(5.0) == []  # reachable: nothing to tell apart


def test_a_summary_cut_short_names_only_heard_peers_it_still_lists() -> None:
    down = [f"198.19.{i // 256}.{i % 256}/32" for i in range(100)]
    data = summary_answer(1, {"counts": {}, "unreachable": down, "hears": down[::7]})
    body = json.loads(wire.body(data))
    assert body["truncated"]
    assert body["hears"]
    assert set(body["hears"]) <= set(body["unreachable"])


def test_the_window_bounds_the_samples() -> None:
    b = book()
    for t in range(50):
        b.result("p", float(t), rtt=0.001 * (t + 1), small=True, full_size=1450,
                 small_size=576)
    assert len(b.peers["p"].samples) == 10
    assert b.rows(50.0)["p"]["rtt_ms"]["median"] == 45.0


def test_where_to_look_names_the_longest_unreachable_peer_first() -> None:
    report = {"peer_health": {"peers": {
        "198.19.1.0/24": {"state": "unreachable", "since_s": 5, "plane": "vxlan",
                          "public_ip": "198.18.0.11"},
        "198.19.2.0/24": {"state": "unreachable", "since_s": 50, "plane": "vxlan",
                          "public_ip": "198.18.0.12"},
        "198.19.3.0/24": {"state": "reachable", "since_s": 50, "plane": "vxlan"}}}}
    line = where_to_look(report)
    assert line.startswith("look first at peer 198.19.2.0/24 (198.18.0.12): unreachable on "
                           "vxlan for 50s (and 1 more)")
    assert where_to_look({"host_errors": {"files": "no space"}, **report}).startswith(
        "look first at this host: files: no space")
    well = {"peer_health": {"peers": {"a": {"state": "reachable"}}}}
    assert where_to_look(well) == "all well: 1 of 1 peers reachable, no errors"


def test_a_summary_answer_fits_one_small_datagram_whatever_the_peers() -> None:
    down = [f"198.19.{i // 256}.{i % 256}/32" for i in range(5_000)]
    data = summary_answer(9, {"counts": {"unreachable": 5_000}, "unreachable": down})
    assert len(data) <= SUMMARY_MAX
    assert wire.decode(data) == wire.Probe(wire.SUMMARY_ANSWER, "host-gw", 9)
    assert b'"truncated":true' in wire.body(data)


def test_metrics_count_peers_by_state_with_no_label_per_peer() -> None:
    """5,000 peers, a few series: counts by state, the mean loss, an RTT histogram."""
    from prometheus_client import generate_latest

    from weft.agent.metrics import AgentMetrics
    from weft.agent.prober import HealthProber

    metrics = AgentMetrics()
    prober = HealthProber(ipaddress.ip_address("127.0.0.1"), 1500, port=0,
                          on_rtt=metrics.probe_rtt.observe)
    try:
        peers = {ipaddress.ip_network(f"198.19.{i // 256}.{i % 256}/32"): ("vxlan", "198.18.0.1")
                 for i in range(5_000)}
        prober.book.set_peers(peers, 0.0)
        for i, peer in enumerate(peers):
            for t in range(3):
                prober.book.result(peer, float(t), rtt=None if i < 10 else 0.001,
                                   small=False, full_size=1500, small_size=576)
        metrics.probe_rtt.observe(0.001)
        metrics.export_peer_health(lambda: prober)
        text = generate_latest(metrics.registry).decode()
    finally:
        prober.close()
    assert 'weft_peer_health{state="reachable"} 4990.0' in text
    assert 'weft_peer_health{state="unreachable"} 10.0' in text
    assert "weft_peer_probe_loss_ratio 0.002" in text
    assert 'weft_peer_probe_rtt_seconds_bucket{le="0.001"} 1.0' in text
    assert len([line for line in text.splitlines() if line.startswith("weft_peer")]) < 40


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_two_probers_probe_each_other_and_drop_a_non_member() -> None:
    """The edge on real sockets (loopback addresses stand in for two overlay addresses):
    each answers the other, a stranger's probe is dropped and counted, a member gets the
    summary, and a peer that stops answering turns unreachable."""
    from weft.agent.prober import HealthProber, ask_summaries

    port = _free_port()
    policy = ProbePolicy(period=0.1, timeout=0.3, misses=2)
    a_ip, b_ip = ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("127.0.0.2")
    a_net, b_net = ipaddress.ip_network("198.19.1.0/24"), ipaddress.ip_network("198.19.2.0/24")
    a = HealthProber(a_ip, 1500, policy, port=port)
    b = HealthProber(b_ip, 1500, policy, port=port)
    try:
        a.set_targets({b_net: (b_ip, "vxlan", "198.18.0.12")})
        b.set_targets({a_net: (a_ip, "vxlan", "198.18.0.11")})
        a.start()
        b.start()
        wait_for("a reaches b", lambda: a.status()["counts"]["reachable"] == 1)
        row = a.status()["peers"][str(b_net)]
        assert (row["plane"], row["pmtu"], row["loss"]) == ("vxlan", 1500, 0.0)
        assert row["rtt_ms"]["median"] > 0
        wait_for("b's own probes heard at a",
                 lambda: a.status()["peers"][str(b_net)]["heard_s"] is not None)

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
            stranger.bind(("127.0.0.3", 0))
            stranger.sendto(wire.encode(wire.Probe(wire.HEALTH_REQUEST, "host-gw", 1), 100),
                            ("127.0.0.1", port))
            stranger.sendto(b"not a probe", ("127.0.0.1", port))
        wait_for("the stranger's probe counted", lambda: a.counters.dropped_non_member == 1)
        wait_for("the garbage counted", lambda: a.counters.dropped_malformed == 1)

        # b asks a for its summary from an address a knows (its own: a member).
        answers = ask_summaries(b_ip, {str(a_net): a_ip}, port=port, timeout=3.0)
        assert answers[str(a_net)] == {"counts": {"reachable": 1, "unreachable": 0,
                                                  "unknown": 0}, "unreachable": [],
                                       "hears": []}

        b.close()
        wait_for("b unreachable from a", lambda: a.status()["counts"]["unreachable"] == 1)
        assert a.summary()["unreachable"] == [str(b_net)]
        # b's probes stopped with it: a hears it no more once the detection bound passed.
        wait_for("b no longer heard", lambda: a.summary()["hears"] == [])
    finally:
        a.close()
        b.close()


def _lease(subnet: str, ip: str) -> Lease:
    return Lease(ipaddress.ip_network(subnet), ipaddress.ip_address(ip), "vxlan")


def test_targets_name_each_peer_by_its_overlay_address_and_plane() -> None:
    peers = {x.subnet: x for x in (_lease("198.19.2.0/24", "198.18.0.12"),
                                   _lease("198.19.3.0/24", "198.18.0.13"))}
    chosen = {ipaddress.ip_network("198.19.3.0/24"): "udp"}
    assert targets(peers, chosen, "auto") == {
        ipaddress.ip_network("198.19.2.0/24"): (ipaddress.ip_address("198.19.2.0"), "auto",
                                                "198.18.0.12"),
        ipaddress.ip_network("198.19.3.0/24"): (ipaddress.ip_address("198.19.3.0"), "udp",
                                                "198.18.0.13")}


def test_a_prober_that_cannot_start_is_retried_not_fatal(
        caplog: pytest.LogCaptureFixture) -> None:
    """Its port taken on the overlay address: a warning, and the keeper keeps running."""
    import asyncio

    own = _lease("198.19.9.0/24", "198.18.0.19")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND: no such address here
        squatter.bind(("198.19.9.0", HEALTH_PORT))
        keeper = ProbeKeeper(ProbePolicy(), backend_type="vxlan", lease=lambda: own,
                             mtu=lambda: 1450, peers=dict, backend_status=dict)

        async def run_a_while() -> bool:
            task = asyncio.create_task(keeper.run())
            await asyncio.to_thread(wait_for, "the warning", lambda: any(
                r.getMessage() == "peer probes cannot start; retrying"
                for r in caplog.records))
            alive = not task.done()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return alive

        with caplog.at_level(logging.WARNING, logger="weft.agent"):
            assert asyncio.run(run_a_while())
    assert keeper.prober is None


def test_a_peers_answer_that_is_no_summary_counts_as_no_answer() -> None:
    """`weft doctor --cluster` asks peers it does not control: an answer nested past the
    JSON parser's depth, or one that is not an object, is no answer (the rest still read)."""
    from threading import Thread

    from weft.agent.prober import ask_summaries

    port = _free_port()
    bodies = {"127.0.0.4": b"[" * 30000, "127.0.0.5": b"[1]", "127.0.0.6": b'{"counts": {}}'}
    with contextlib.ExitStack() as stack:
        agents = []
        for addr in bodies:
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            sock.bind((addr, port))
            agents.append(sock)

        def answer(sock: socket.socket) -> None:
            with contextlib.suppress(OSError):  # closed at the end
                _, asker = sock.recvfrom(0x10000)
                text = bodies[sock.getsockname()[0]]
                sock.sendto(wire.encode(wire.Probe(wire.SUMMARY_ANSWER, "host-gw", 0),
                                        wire.HEADER_SIZE + len(text), text), asker)

        for sock in agents:
            Thread(target=answer, args=(sock,), daemon=True).start()
        peers = {addr: ipaddress.ip_address(addr) for addr in bodies}
        answers = ask_summaries(ipaddress.ip_address("127.0.0.1"), peers, port=port,
                                timeout=0.6)
    assert answers == {"127.0.0.4": None, "127.0.0.5": None, "127.0.0.6": {"counts": {}}}
