"""Backend "auto": per pair the fastest data plane that carries full-size packets, chosen
by probes and changed by them. 3 hosts: h1 and h2 on one segment, h3 behind two routers."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from weft.lab.testbed import Host, Testbed

pytestmark = pytest.mark.netns

CONFIG = json.dumps({"Network": "198.19.0.0/16", "Backend": {"Type": "auto"}})


def paths(tb: Testbed, host: Host) -> dict[str, dict[str, Any]]:
    """The host's per-peer paths from `weft status`, by peer public IP."""
    status = tb.host_status(host)["backend_status"]["paths"]
    return {p["peer"]: p for p in status.values()}


def planes(tb: Testbed) -> dict[tuple[str, str], str]:
    return {(h.name, peer): p["plane"] for h in tb.hosts for peer, p in paths(tb, h).items()}


def test_l2_pair_uses_host_gw_and_routed_pairs_vxlan_full_mesh() -> None:
    with Testbed(hosts=3, containers_per_host=1, config=CONFIG, routed_hosts=1) as tb:
        tb.start()
        h1, h2, h3 = tb.hosts
        time.sleep(1.0)
        got = planes(tb)
        print(json.dumps(tb.host_status(h1)["backend_status"], indent=1))
        assert got == {
            ("h1", str(h2.underlay_ip)): "host-gw", ("h2", str(h1.underlay_ip)): "host-gw",
            ("h1", str(h3.underlay_ip)): "vxlan", ("h3", str(h1.underlay_ip)): "vxlan",
            ("h2", str(h3.underlay_ip)): "vxlan", ("h3", str(h2.underlay_ip)): "vxlan",
        }
        matrix = tb.connectivity()
        assert all(matrix.values()), [pair for pair, ok in matrix.items() if not ok]
