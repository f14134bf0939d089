"""Every metric family of the agent's --metrics-addr, scraped from a running agent, with a
value this test caused: renewals counted as the log counts them, a store event applied
incrementally, one that changed nothing, a bad record (a peer error, one reconcile error),
the peers' probes (h2 reachable, a store-only peer not), packets from a non-member dropped
by the ingress filter, the store gone (store errors). (weft_peer_* of backend "auto" are in
test_auto.py; the backend's counters and reconcile passes in test_mesh.py.)"""

from __future__ import annotations

import json
import sys

import pytest

from etcd_server import requires_etcd
from helpers import metric, scrape, wait_for
from weft.core.constants import DEFAULT_ETCD_PREFIX
from weft_lab.testbed import Host, Testbed

pytestmark = [pytest.mark.netns, pytest.mark.etcd, requires_etcd]

TTL = 4  # renewals every 2 s
FAKE = "198.19.200.0/24"  # a peer that only exists in the store
BAD = "198.19.201.0/24"  # a record that is not a usable lease
VXLAN_PORT = 8472


def _key(subnet: str) -> str:
    return f"{DEFAULT_ETCD_PREFIX}/subnets/{subnet.replace('/', '-')}"


def _lease(public_ip: str, mac: str) -> str:
    return json.dumps({"PublicIP": public_ip, "BackendType": "vxlan",
                       "BackendData": {"VNI": 1, "VtepMAC": mac}})


SEND = """
import socket, sys
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    for _ in range(int(sys.argv[3])):
        s.sendto(b"not vxlan from a member", (sys.argv[1], int(sys.argv[2])))
"""


def test_every_agent_metric_family_moves_with_what_happened() -> None:
    with Testbed(hosts=2, containers_per_host=1, store="etcd", lease_ttl=TTL,
                 config=json.dumps({"Network": "198.19.0.0/16", "Backend": {"Type": "vxlan"}}),
                 agent_args=["--metrics-addr", "127.0.0.1:9464"]) as tb:
        tb.start()
        h1 = tb.hosts[0]

        def now(name: str, **labels: str) -> float:
            value = metric(scrape(h1.netns), name, **labels)
            assert value is not None, f"{name}{labels} not exported"
            return value

        def status_revision(host: Host) -> int:
            return int(tb.host_status(host)["revision"])

        # Renewals: the counter is the log's count of "lease renewed" (read around it).
        wait_for("two renewals", lambda: now("weft_lease_renewals_total") >= 2)
        before = tb.agent_log(h1).count("lease renewed")
        renewals = now("weft_lease_renewals_total")
        after = tb.agent_log(h1).count("lease renewed")
        assert before <= renewals <= after, (before, renewals, after)

        # A new peer in the store: applied as an incremental update, and a peer more.
        updates = now("weft_incremental_update_total")
        peers = now("weft_peers")
        tb.etcd.etcdctl("put", _key(FAKE), _lease("198.18.0.77", "02:00:00:00:00:77"))
        wait_for("the store's peer applied", lambda: FAKE in tb.host_status(h1)["peers"])
        wait_for("the update counted", lambda: now("weft_incremental_update_total") > updates)
        assert now("weft_incremental_update_total") == updates + 1
        assert now("weft_peers") == peers + 1

        # Peer health, with no label per peer: h2 answers its probes, the store-only peer
        # never does (unreachable after its misses); the RTTs and the loss move with them.
        wait_for("h2 reachable by the probes",
                 lambda: now("weft_peer_health", state="reachable") == 1)
        wait_for("the store-only peer unreachable",
                 lambda: now("weft_peer_health", state="unreachable") == 1)
        assert now("weft_peer_probe_rtt_seconds_count") > 0
        answered = now("weft_peer_health_probes_answered_total")
        assert 0 < answered < now("weft_peer_health_probes_sent_total")
        assert 0 < now("weft_peer_probe_loss_ratio") <= 0.5
        # Exported by reason (a peer's probes that arrive before this host knows the peer
        # count here at start-up; the non-member case itself: test_peer_health.py).
        assert now("weft_peer_health_probes_dropped_total", reason="non_member") >= 0

        # The same record written again: an event that changes nothing, counted as such.
        unchanged = now("weft_store_events_unchanged_total")
        updates = now("weft_incremental_update_total")
        tb.etcd.etcdctl("put", _key(FAKE), _lease("198.18.0.77", "02:00:00:00:00:77"))
        revision = max(int(s["Status"]["header"]["revision"]) for s in json.loads(
            tb.etcd.etcdctl("endpoint", "status", "-w", "json").stdout))
        wait_for("h1 to handle the rewrite", lambda: status_revision(h1) >= revision)
        assert now("weft_store_events_unchanged_total") == unchanged + 1
        assert now("weft_incremental_update_total") == updates

        # A record that is no usable lease: one peer error while it is there, one reconcile
        # error counted when it appeared; gone, the gauge is back and the count stays.
        assert now("weft_peer_errors") == 0
        errors = now("weft_reconcile_errors_total")
        tb.etcd.etcdctl("put", _key(BAD), _lease("198.18.0.78", "not-a-mac"))
        wait_for("the bad record reported", lambda: now("weft_peer_errors") == 1,
                 seen=lambda: tb.host_status(h1)["errors"])
        assert now("weft_reconcile_errors_total") == errors + 1
        tb.etcd.etcdctl("del", _key(BAD))
        wait_for("the error cleared", lambda: now("weft_peer_errors") == 0,
                 seen=lambda: tb.host_status(h1)["errors"])
        assert now("weft_reconcile_errors_total") == errors + 1

        # Datagrams to the VXLAN port from a host that holds no lease: dropped, counted.
        dropped = metric(scrape(h1.netns), "weft_ingress_dropped_packets_total",
                         backend="vxlan", reason="non_member") or 0.0
        outsider = tb.add_underlay_node("out", "198.18.0.200")
        tb.run(outsider, [sys.executable, "-c", SEND, str(h1.underlay_ip), str(VXLAN_PORT),
                          "7"])
        wait_for("7 drops counted", lambda: now(
            "weft_ingress_dropped_packets_total", backend="vxlan", reason="non_member")
            >= dropped + 7)
        assert now("weft_ingress_dropped_packets_total", backend="vxlan",
                   reason="non_member") == dropped + 7

        # The store gone: each failed store operation counted, as each is logged.
        assert now("weft_store_errors_total") == 0
        for i in range(len(tb.etcd.members)):
            tb.etcd.kill(i)
        wait_for("store errors counted", lambda: now("weft_store_errors_total") >= 2, 60)
        logged = sum(tb.agent_log(h1).count(line) for line in (
            "store unavailable; retrying", "lease renewal failed; retrying",
            "watch lost the store"))
        counted = now("weft_store_errors_total")
        logged_after = sum(tb.agent_log(h1).count(line) for line in (
            "store unavailable; retrying", "lease renewal failed; retrying",
            "watch lost the store"))
        assert logged <= counted <= logged_after, (logged, counted, logged_after)
        for i in range(len(tb.etcd.members)):
            tb.etcd.restart(i, wait=False)
        tb.etcd.wait_healthy()
        tb.etcd.etcdctl("del", _key(FAKE))
        tb.wait_converged(60)
