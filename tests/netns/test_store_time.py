"""The store and time (issue 25): a renewal is never outlived by its own backoff, and a store
that goes back in time (etcd restored from a snapshot) is re-asserted at once and never
gives a live host's subnet to another.

Whole agents in the namespace testbed on a real etcd; waits are on conditions (the agents'
own state and log lines), and the pings lost are counted by sequence number.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from test_faults import RESULTS, PingProbe, Recovery, config

from etcd_server import ETCD_AVAILABLE, ETCD_MISSING_REASON
from weft_lab.testbed import Host, Testbed

pytestmark = [
    pytest.mark.netns,
    pytest.mark.etcd,
    pytest.mark.skipif(not ETCD_AVAILABLE, reason=ETCD_MISSING_REASON),
]


def wait_for(what: str, check: Callable[[], bool], tb: Testbed, timeout: float = 60,
             detail: Callable[[], object] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        for h in tb.hosts:
            tb._check_alive(h)
        assert time.monotonic() < deadline, f"not {what} in {timeout} s: {detail()}"
        time.sleep(0.1)


def log_since(tb: Testbed, host: Host, offset: int) -> str:
    return tb.agent_log(host)[offset:]


def test_a_short_lease_outlives_a_long_store_outage_and_no_peer_drops_after() -> None:
    """TTL 6 s, etcd gone for 30 s: the data plane holds meanwhile, and once etcd is back
    every agent renews before etcd's restored leases run out (etcd gives them a full TTL
    again on its start), so no host drops a peer after the store returns."""
    ttl, outage = 6.0, 30.0
    with Testbed(hosts=2, containers_per_host=1, config=config("vxlan"), store="etcd",
                 lease_ttl=ttl) as tb:
        tb.start()
        c1, c2 = tb.containers
        probe = PingProbe(tb, c1, c2)
        try:
            assert probe.wait_reply_after(time.time(), 5)
            tb.etcd.kill(0)
            down = time.time()
            # The outage: until every agent's lease has been over for most of it.
            wait_for("every lease long over", lambda: all(
                tb.host_status(h)["lease_expires_in"] <= -(outage - ttl) for h in tb.hosts),
                tb, timeout=outage + 30)
            offsets = [len(tb.agent_log(h)) for h in tb.hosts]
            tb.etcd.restart(0)
            back = time.time()
            # Three renewals each (one per half TTL): past the moment etcd's restored
            # leases would have run out had nobody renewed them.
            wait_for("renewed three times since the store came back", lambda: all(
                log_since(tb, h, o).count("lease renewed") >= 3
                for h, o in zip(tb.hosts, offsets, strict=True)), tb, timeout=60)
            assert probe.wait_reply_after(time.time(), 5)
        finally:
            probe.stop()
        for h, o in zip(tb.hosts, offsets, strict=True):
            after = log_since(tb, h, o)
            said = "\n".join(line for line in after.splitlines() if '"debug"' not in line)
            assert "peer removed" not in after, said[-3000:]
            assert "lease lost" not in after, said[-3000:]
        lost, _ = probe.outage(down)
        print(f"\netcd down {back - down:.0f} s with a {ttl:.0f} s TTL: {lost} pings lost")
        RESULTS.append(Recovery(f"etcd down {back - down:.0f} s, lease TTL {ttl:.0f} s",
                                0.0, lost))
        assert lost == 0
        tb.wait_converged(10)
