"""The agent's command line on the paths a user meets less often: an interface that does
not exist, no masquerading (`--no-ip-masq`), the network config changed in the store under
running agents, and `--release-on-exit` against a store that refuses it."""

from __future__ import annotations

import json
import signal

import pytest

from etcd_server import ROOT_USER, enable_auth, requires_etcd
from helpers import metric, scrape, source_seen, wait_for
from weft.core.constants import DEFAULT_ETCD_PREFIX, NFT_TABLE, VXLAN_DEVICE_PREFIX
from weft_lab.testbed import Host, Testbed

pytestmark = pytest.mark.netns

VXLAN = json.dumps({"Network": "198.19.0.0/16", "Backend": {"Type": "vxlan"}})


def weft_devices(tb: Testbed, host: Host) -> list[str]:
    out = tb.run(host.netns, ["ip", "-j", "link", "show"]).stdout
    return [link["ifname"] for link in json.loads(out or "[]")
            if link["ifname"].startswith(VXLAN_DEVICE_PREFIX)]


def test_a_bad_iface_is_one_clear_error_and_nothing_is_set_up() -> None:
    with Testbed(hosts=1, containers_per_host=0, config=VXLAN) as tb:
        host = tb.hosts[0]
        tb.start_agent(host, ["--iface", "nosuch0"])  # the last --iface is the one used
        assert host.agent is not None
        assert host.agent.wait(timeout=60) != 0
        log = tb.agent_log(host)
        assert "nosuch0" in log, log
        assert "Traceback" not in log
        assert not host.subnet_env_path.exists()
        assert weft_devices(tb, host) == []
        assert tb.leases() == []  # no lease taken for a host that cannot run


def test_no_ip_masq_installs_no_masquerade_and_leaves_it_to_the_bridge_plugin() -> None:
    """flannel's --ip-masq=false: the agent masquerades nothing, subnet.env says so, and
    the CNI plugin hands masquerading to the bridge plugin (as flannel's does)."""
    with Testbed(hosts=2, containers_per_host=1, config=VXLAN,
                 agent_args=["--no-ip-masq"]) as tb:
        tb.start()
        c1, c2 = tb.containers
        h1 = tb.hosts[0]
        assert "FLANNEL_IPMASQ=false" in h1.subnet_env_path.read_text()
        listed = tb.run(h1.netns, ["nft", "list", "table", "ip", NFT_TABLE], check=False)
        assert listed.returncode != 0, listed.stdout  # no masquerade table of weft's
        nat = tb.run(h1.netns, ["iptables", "-w", "5", "-t", "nat", "-S", "POSTROUTING"]).stdout
        assert "CNI-" in nat, nat  # the bridge plugin's own
        # What the bridge plugin's rule does (all but its own subnet and multicast): the
        # outside sees the host, a container on another host sees h1's VXLAN address.
        outside = tb.add_underlay_node("out", "198.18.0.200")
        assert source_seen(tb, c1.netns, outside, "198.18.0.200") == str(h1.underlay_ip)
        vtep = json.loads(tb.run(h1.netns, ["ip", "-j", "addr", "show", "dev",
                                            f"{VXLAN_DEVICE_PREFIX}1"]).stdout)
        vtep_ip = vtep[0]["addr_info"][0]["local"]
        assert source_seen(tb, c1.netns, c2.netns, c2.ip) == vtep_ip
        assert all(tb.connectivity().values())


def test_a_config_changed_under_running_agents_is_refused_loudly_until_restored() -> None:
    with Testbed(hosts=2, containers_per_host=1, config=VXLAN,
                 agent_args=["--resync-interval", "1", "--metrics-addr",
                             "127.0.0.1:9464"]) as tb:
        tb.start()
        c1, c2 = tb.containers
        routes = {h.name: tb.weft_routes(h) for h in tb.hosts}

        def notices(h: Host) -> dict[str, str]:
            return dict(tb.host_status(h)["notices"])

        def passes(h: Host) -> float:
            return metric(scrape(h.netns), "weft_reconcile_total") or 0.0

        tb.write_config(json.dumps({"Network": "198.19.0.0/16",
                                    "Backend": {"Type": "host-gw"}}))
        for host in tb.hosts:
            notice = str(wait_for(f"{host.name} to say so",
                                  lambda h=host: notices(h).get("config"),  # type: ignore[misc]
                                  30, seen=lambda h=host: notices(h)))  # type: ignore[misc]
            assert "restart `weft agent` on every host" in notice, notice
        # Two more resyncs (each a full pass): still refused, said once, not per check.
        before = {h.name: passes(h) for h in tb.hosts}
        for host in tb.hosts:
            wait_for(f"two more passes on {host.name}",
                     lambda h=host: passes(h) >= before[h.name] + 2)  # type: ignore[misc]
            assert tb.agent_log(host).count("config change refused") == 1
            assert "config" in notices(host)
        # Nothing was applied: the same vxlan routes, and traffic.
        assert {h.name: tb.weft_routes(h) for h in tb.hosts} == routes
        assert tb.ping(c1.netns, c2.ip, count=2)
        # The config as it was: the notice goes.
        tb.write_config(VXLAN)
        for host in tb.hosts:
            wait_for(f"{host.name}'s notice gone",
                     lambda h=host: "config" not in notices(h),  # type: ignore[misc]
                     30, seen=lambda h=host: notices(h))  # type: ignore[misc]


@requires_etcd
@pytest.mark.etcd
def test_release_on_exit_against_a_refusing_store_still_removes_the_data_plane() -> None:
    with Testbed(hosts=2, containers_per_host=1, store="etcd", config=VXLAN,
                 agent_args=["--etcd-username", "weft", "--etcd-password", "secret",
                             "--etcd-allow-plaintext-auth", "--release-on-exit"]) as tb:
        grant = ("weft", f"{DEFAULT_ETCD_PREFIX}/", "--prefix=true")
        enable_auth(tb.etcd, grant[1])
        tb.start()
        leaving = tb.hosts[1]
        subnet = tb.host_status(leaving)["subnet"]
        assert weft_devices(tb, leaving)
        tb.etcd.etcdctl(ROOT_USER, "role", "revoke-permission", *grant)
        assert tb.stop_agent(leaving, signal.SIGTERM) == 0
        log = tb.agent_log(leaving)
        assert "could not release the lease" in log
        assert "permission denied" in log
        # The data plane went all the same; the lease stays in the store until it expires.
        assert weft_devices(tb, leaving) == []
        assert tb.weft_routes(leaving) == {}
        assert not leaving.subnet_env_path.exists()
        key = f"{DEFAULT_ETCD_PREFIX}/subnets/{subnet.replace('/', '-')}"
        held = tb.etcd.etcdctl(ROOT_USER, "get", key, "--print-value-only").stdout
        assert str(leaving.underlay_ip) in held
