"""A host is who it is, not where it is (issue 25): a second host that finds its address in
another host's live lease refuses to start, and the live owner's traffic never notices; the
owner puts back its record when something else writes over it."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator

import pytest

from etcd_server import ETCD_AVAILABLE, ETCD_MISSING_REASON
from helpers import Record, measure, missing, ping_probe, sqlite_put
from helpers import network_config as config
from weft.core.constants import DEFAULT_ETCD_PREFIX
from weft_lab.testbed import Testbed

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module", params=["sqlite", "etcd"])
def tb(request: pytest.FixtureRequest) -> Iterator[Testbed]:
    if request.param == "etcd" and not ETCD_AVAILABLE:
        missing(ETCD_MISSING_REASON)
    with Testbed(hosts=2, containers_per_host=1, config=config("vxlan"),
                 store=request.param) as bed:
        bed.start()
        yield bed


def key(subnet: str) -> str:
    return f"subnets/{subnet.replace('/', '-')}"


def store_record(tb: Testbed, subnet: str) -> dict[str, str]:
    """The record of `subnet` as the store holds it (read as an operator would)."""
    if tb.store_kind == "etcd":
        value = tb.etcd.etcdctl("get", f"{DEFAULT_ETCD_PREFIX}/{key(subnet)}",
                                "--print-value-only").stdout.strip()
        return json.loads(value) if value else {}
    import sqlite3

    db = sqlite3.connect(str(tb.run_dir / "store.db"), timeout=30)
    try:
        row = db.execute("SELECT value FROM leases WHERE key = ?", (key(subnet),)).fetchone()
    finally:
        db.close()
    return json.loads(row[0]) if row else {}


def write_over(tb: Testbed, subnet: str, value: str) -> None:
    """Something else writes the record (no deletion first)."""
    if tb.store_kind == "etcd":
        tb.etcd.etcdctl("put", f"{DEFAULT_ETCD_PREFIX}/{key(subnet)}", value)
    else:
        sqlite_put(tb.run_dir / "store.db", key(subnet), value, time.time() + 3600,
                   "198.18.0.99")


def test_a_second_host_at_a_live_hosts_address_refuses_and_the_owner_keeps_its_traffic(
        tb: Testbed) -> None:
    h1 = tb.hosts[0]
    owner = tb.host_status(h1)
    # A clone (a copied config, every Vagrant VM at 10.0.2.15 behind its own NAT): h1's
    # address really on one of its interfaces, so only the lease can tell. It does not
    # answer ARP for it on the shared underlay (as separate NATs would not).
    clone = tb.add_underlay_node("clone", "198.18.0.77")
    for argv in (["sysctl", "-q", "-w", "net.ipv4.conf.all.arp_ignore=1"],
                 ["ip", "link", "add", "dup0", "type", "veth", "peer", "name", "dup1"],
                 ["ip", "addr", "add", f"{h1.underlay_ip}/32", "dev", "dup0"],
                 ["ip", "link", "set", "dup0", "up"]):
        tb.run(clone, argv)
    own = tb.run_dir / "clone"
    probe = ping_probe(tb.containers[1], tb.containers[0])
    try:
        probe.wait_replies_after("before", 0.0, count=5)
        proc = tb.run(clone, [sys.executable, "-m", "weft", "agent", "--store", tb.store_url,
                              "--iface", "dup0", "--public-ip", str(h1.underlay_ip),
                              "--subnet-file", str(own / "subnet.env"),
                              "--state-dir", str(own / "state"), "--log-level", "warning"],
                      check=False, timeout=30)
        refused = time.time()
        probe.wait_replies_after("after the refusal", refused, count=10)
    finally:
        probe.stop()
    assert proc.returncode != 0
    assert owner["host_id"]
    message = (proc.stderr.strip() or proc.stdout.strip())
    assert len(message.splitlines()) == 1, message
    for named in (str(h1.underlay_ip), owner["subnet"], owner["host_id"]):
        assert named in message, (named, message)
    lost, _ = probe.outage(refused)
    assert lost == 0
    # Nothing of the clone's reached the kernel, and the owner is as it was.
    links = json.loads(tb.run(clone, ["ip", "-j", "link"]).stdout)
    assert not [x["ifname"] for x in links if x["ifname"].startswith("weft")]
    after = tb.host_status(h1)
    assert (after["subnet"], after["host_id"], after["notices"]) == (
        owner["subnet"], owner["host_id"], {})
    assert store_record(tb, owner["subnet"])["HostID"] == owner["host_id"]
    tb.wait_converged(10)


def test_the_owner_puts_back_its_record_written_over_by_something_else(
        tb: Testbed, record_property: Record) -> None:
    h1 = tb.hosts[0]
    owner = tb.host_status(h1)
    subnet = owner["subnet"]
    forged = json.dumps({"PublicIP": "198.18.0.99", "BackendType": "vxlan",
                         "BackendData": {"VNI": 1, "VtepMAC": "02:00:00:00:00:99"}})

    def put_back() -> bool:
        record = store_record(tb, subnet)
        return (record.get("HostID") == owner.get("host_id")
                and record.get("PublicIP") == str(h1.underlay_ip))

    measure(tb, record_property, f"own lease record written over (put back, {tb.store_kind})",
            lambda: write_over(tb, subnet, forged),
            put_back, src=tb.containers[1], dst=tb.containers[0])
    assert "own lease record was written over by something else" in tb.agent_log(h1)
    tb.wait_converged(10)
    assert tb.host_status(h1)["notices"] == {}
