"""`weft doctor` on running testbeds: each check is broken for real, fails with its advice,
and passes again once mended. Few testbeds (each costs seconds to build): one vxlan pair
for the host's own state, the firewall and the peers; three vxlan hosts for a pair broken
one way (`--cluster`); one host with two containers under br_netfilter and a DROP policy;
one udp pair across a router for the path MTU; one host with a real dockerd for Docker's
bridge."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from helpers import wait_for
from weft.host.forward_accept import COMMENT as FORWARD_COMMENT
from weft_lab.runtimes.docker import DockerRuntime
from weft_lab.testbed import Host, Testbed

pytestmark = pytest.mark.netns

BR_NETFILTER = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")


def config(backend: str) -> str:
    return json.dumps({"Network": "198.19.0.0/16", "Backend": {"Type": backend}})


def doctor(tb: Testbed, host: Host, *extra: str) -> tuple[int, dict[str, Any]]:
    proc = tb.weft("doctor", "--json", "--store", tb.store_url, "--state-dir",
                   str(host.state_dir), "--subnet-file", str(host.subnet_env_path), *extra,
                   netns=host.netns, check=False)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def check(report: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in report["checks"] if c["name"] == name)
    return found


def wait_check(tb: Testbed, host: Host, name: str, result: str,
               timeout: float = 60.0) -> dict[str, Any]:
    """Run `weft doctor` until the check `name` has `result` (exit status 1 exactly when a
    check fails); the last report when the wait runs out."""
    last: list[dict[str, Any]] = [{}]

    def found() -> dict[str, Any]:
        rc, report = doctor(tb, host)
        last[0] = report
        assert (rc == 0) == all(c["result"] != "fail" for c in report["checks"])
        c = check(report, name)
        return c if c["result"] == result else {}

    return wait_for(f"{name} to {result}", found, timeout, interval=0.5, seen=lambda: last[0])


def wait_all_pass(tb: Testbed, host: Host, timeout: float = 60.0) -> None:
    def failing() -> list[dict[str, Any]]:
        _, report = doctor(tb, host)
        return [c for c in report["checks"] if c["result"] == "fail"]

    wait_for("every check to pass", lambda: not failing(), timeout, interval=0.5,
             seen=failing)


def ip(tb: Testbed, host: Host, *args: str) -> None:
    tb.run(host.netns, ["ip", *args])


def iptables(tb: Testbed, host: Host, *args: str) -> subprocess.CompletedProcess[str]:
    return tb.run(host.netns, ["iptables", *args])


def subnet_of(tb: Testbed, host: Host) -> str:
    return next(str(x.subnet) for x in tb.leases() if x.public_ip == host.underlay_ip)


def test_doctor_on_vxlan_finds_each_fault_and_passes_once_mended(tmp_path: Path) -> None:
    with Testbed(hosts=2, containers_per_host=2, config=config("vxlan")) as tb:
        tb.start()
        a, b = tb.hosts
        wait_all_pass(tb, a)
        wait_all_pass(tb, b)
        a_subnet = subnet_of(tb, a)
        # The VXLAN device's offload is read (its kernel is past the known bad ones).
        _, report = doctor(tb, a)
        assert "checksum offload weft.vx1 on" in check(report, "VXLAN offload")["message"]

        # This host's address moved: the lease names one the interface no longer has.
        ip(tb, a, "addr", "del", f"{a.underlay_ip}/24", "dev", "eth0")
        ip(tb, a, "addr", "add", "198.18.0.99/24", "dev", "eth0")
        lease = wait_check(tb, a, "lease", "fail")
        assert f"names {a.underlay_ip}, which is no longer on eth0 (it has 198.18.0.99)" \
            in lease["message"]
        assert "restart the agent" in lease["message"]
        ip(tb, a, "addr", "del", "198.18.0.99/24", "dev", "eth0")
        ip(tb, a, "addr", "add", f"{a.underlay_ip}/24", "dev", "eth0")
        wait_check(tb, a, "lease", "pass")

        # subnet.env held stale (a file mounted over it: the agent cannot rewrite it).
        stale = tmp_path / "stale.env"
        stale.write_text(a.subnet_env_path.read_text().replace("FLANNEL_MTU=1450",
                                                               "FLANNEL_MTU=1500"))
        subprocess.run(["mount", "--bind", str(stale), str(a.subnet_env_path)], check=True)
        try:
            env = wait_check(tb, a, "subnet.env", "fail")
            assert "is stale: FLANNEL_MTU=1500, the overlay's is 1450" in env["message"]
        finally:
            subprocess.run(["umount", str(a.subnet_env_path)], check=True)
        wait_check(tb, a, "subnet.env", "pass")
        # b reaches a again (the address move above made a unreachable from b for a while,
        # and a's probes heard since then would tell b the way from a still works).
        wait_check(tb, b, "peers", "pass")

        # The agent stopped; meanwhile subnet.env is deleted and FORWARD drops with weft's
        # accepts gone (nothing puts them back while it is down).
        tb.stop_agent(a)
        a.subnet_env_path.unlink()
        iptables(tb, a, "-P", "FORWARD", "DROP")
        for rule in iptables(tb, a, "-S", "FORWARD").stdout.splitlines():
            if FORWARD_COMMENT in rule:
                tb.run(a.netns, ["sh", "-c", f"iptables {rule.replace('-A', '-D', 1)}"])
        rc, report = doctor(tb, a)
        assert rc == 1
        assert check(report, "agent")["result"] == "fail"
        assert "start it (`systemctl start weft`)" in check(report, "agent")["message"]
        assert check(report, "subnet.env")["result"] == "fail"
        assert "is missing" in check(report, "subnet.env")["message"]
        forward = check(report, "FORWARD")
        assert forward["result"] == "fail"
        assert "the FORWARD policy is DROP" in forward["message"]
        assert "weft's accepts are missing" in forward["message"]
        # ... and its peer sees it unreachable, with the plane and since when; asked over
        # the overlay, the stopped side does not answer.
        peers = wait_check(tb, b, "peers", "fail")
        assert f"{a_subnet} ({a.underlay_ip}) on vxlan for" in peers["message"]
        assert "check that their agent runs" in peers["message"]
        # Probes of a's heard at b after b gave up on a (a stopping) may first read as a
        # one-way break; once they are older than the detection bound, a is silent.
        silent = f"{a_subnet}: no answer to {subnet_of(tb, b)}"

        def failing() -> list[str]:
            return list(doctor(tb, b, "--cluster")[1]["cluster"]["failing"])

        wait_for("b's doctor --cluster to find a silent", lambda: silent in " ".join(failing()),
                 timeout=30, seen=failing)
        tb.start_agent(a)
        wait_all_pass(tb, a)
        wait_check(tb, b, "peers", "pass")
        _, mesh = doctor(tb, b, "--cluster")
        assert mesh["cluster"]["failing"] == []
        assert mesh["cluster"]["answered"] == 1

        # The encapsulation port blocked on b: named, and the peers' probes fail.
        iptables(tb, b, "-I", "INPUT", "-p", "udp", "--dport", "8472", "-j", "DROP")
        other = wait_check(tb, b, "other rules", "fail")
        assert "drops UDP port 8472" in other["message"]
        wait_check(tb, b, "peers", "fail")
        # a's packets die on b, b's reach a: the way from a to b is named, from either side.
        wait_pairs(tb, a, [(a_subnet, subnet_of(tb, b), "one way", "works")])
        iptables(tb, b, "-D", "INPUT", "-p", "udp", "--dport", "8472", "-j", "DROP")
        wait_all_pass(tb, b)


def cluster(tb: Testbed, host: Host) -> tuple[int, dict[str, Any]]:
    rc, report = doctor(tb, host, "--cluster")
    mesh: dict[str, Any] = report["cluster"]
    assert (rc == 0) == (report["ok"] and not mesh["failing"])
    return rc, mesh


def wait_pairs(tb: Testbed, host: Host, want: list[tuple[str, str, str, str]],
               timeout: float = 60.0) -> dict[str, Any]:
    """Ask `weft doctor --cluster --json` on `host` until its failing pairs are `want`
    ((from, to, broken, other way)); the last answer when the wait runs out."""
    last: list[dict[str, Any]] = [{}]

    def found() -> dict[str, Any]:
        _, mesh = cluster(tb, host)
        last[0] = mesh
        got = [(p["from"], p["to"], p["broken"], p["other_way"]) for p in mesh["pairs"]]
        return mesh if got == want else {}

    return wait_for(f"the pairs {want} from {host.name}", found, timeout, interval=0.5,
                    seen=lambda: last[0])


def test_doctor_cluster_names_a_pair_broken_one_way_and_its_side() -> None:
    """Three hosts; c's firewall drops what b sends it (an nftables rule in c's namespace,
    b's address only), so b's packets never arrive at c while c's arrive at b. Asked from
    the third host, from b and from c, `weft doctor --cluster` names the pair and the way
    that fails, and every pair passes once the rule is gone."""
    with Testbed(hosts=3, containers_per_host=0, config=config("vxlan")) as tb:
        tb.start()
        a, b, c = tb.hosts
        sa, sb, sc = (subnet_of(tb, h) for h in (a, b, c))
        for host in (a, b, c):
            wait_pairs(tb, host, [])
        rule = ["nft", "add", "rule", "inet", "blocked", "input", "ip", "saddr",
                str(b.underlay_ip), "udp", "dport", "8472", "drop"]
        tb.run(c.netns, ["nft", "add", "table", "inet", "blocked"])
        tb.run(c.netns, ["nft", "add", "chain", "inet", "blocked", "input",
                         "{ type filter hook input priority 0; }"])
        tb.run(c.netns, rule)

        # From a, which reaches both: b -> c fails, c -> b works.
        mesh = wait_pairs(tb, a, [(sb, sc, "one way", "works")])
        assert mesh["answered"] == 2
        line = mesh["failing"][0]
        assert line.startswith(f"{sb} -> {sc}: packets from {sb} ({b.underlay_ip}) do not "
                               f"arrive at {sc} ({c.underlay_ip}); the other way works")
        assert f"look for what drops {b.underlay_ip}'s packets on {c.underlay_ip}" in line
        # The text names it too, and doctor exits 1.
        text = tb.weft("doctor", "--cluster", "--store", tb.store_url, "--state-dir",
                       str(a.state_dir), "--subnet-file", str(a.subnet_env_path),
                       netns=a.netns, check=False)
        assert text.returncode == 1
        assert f"fail {sb} -> {sc}: packets from {sb}" in " ".join(text.stdout.split())
        # From b, whose packets are lost: c does not answer it, yet b hears c.
        wait_pairs(tb, b, [(sb, sc, "one way", "works")])
        # From c, which hears nothing from b while a reaches b: b's way to c is broken;
        # whether c's packets reach b is not known from c alone.
        mesh = wait_pairs(tb, c, [(sb, sc, "one way", "unknown")])
        assert f"{sb}'s agent runs ({sa} hears or reaches it)" in mesh["failing"][0]

        tb.run(c.netns, ["nft", "delete", "table", "inet", "blocked"])
        for host in (a, b, c):
            mesh = wait_pairs(tb, host, [])
            assert mesh["answered"] == 2
        rc, _ = cluster(tb, a)
        assert rc == 0


def weft0_accept(tb: Testbed, host: Host) -> list[str]:
    """weft's FORWARD accept for packets bridged on weft0 (overlay to overlay), as listed."""
    return [r for r in iptables(tb, host, "-S", "FORWARD").stdout.splitlines()
            if FORWARD_COMMENT in r and "-i weft0 -o weft0" in r]


@pytest.mark.skipif(not BR_NETFILTER.exists(), reason=(
    "br_netfilter is not loaded (this test does not load it: it would stay loaded for every "
    "namespace; `modprobe br_netfilter` to run it)"))
def test_containers_on_one_bridge_reach_each_other_under_br_netfilter_and_docker_drop() -> None:
    """With br_netfilter, two containers on one host's weft0 talk through iptables FORWARD;
    under Docker's DROP policy the agent's accept for weft0 (overlay to overlay only) is what
    lets them: it is added, put back when deleted, and the doctor's check passes with it and
    fails without it. Nobody else's rule is touched."""
    with Testbed(hosts=1, containers_per_host=2, config=config("vxlan")) as tb:
        (a,) = tb.hosts
        # Per namespace: this host's own switch, whatever the machine's default is.
        tb.run(a.netns, ["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"])
        others = ["-s", "198.18.250.1/32", "-j", "ACCEPT"]  # another tool's rule
        iptables(tb, a, "-A", "FORWARD", *others)
        tb.start()
        c1, c2 = tb.containers
        assert tb.ping(c1.netns, c2.ip)
        iptables(tb, a, "-P", "FORWARD", "DROP")  # what dockerd does
        wait_for("the agent's accept for weft0", lambda: weft0_accept(tb, a), timeout=60)
        assert weft0_accept(tb, a) == [
            "-A FORWARD -s 198.19.0.0/16 -d 198.19.0.0/16 -i weft0 -o weft0 -m comment "
            f'--comment "{FORWARD_COMMENT}" -j ACCEPT']
        assert tb.ping(c1.netns, c2.ip)
        br = wait_check(tb, a, "br_netfilter", "pass")
        assert "every container bridge's own traffic is accepted" in br["message"]

        # Deleted by hand: put back, like the other accepts.
        tb.run(a.netns, ["sh", "-c", "iptables " + weft0_accept(tb, a)[0].replace(
            "-A FORWARD", "-D FORWARD", 1)])
        wait_for("the accept for weft0 put back", lambda: weft0_accept(tb, a), timeout=60)
        assert tb.ping(c1.netns, c2.ip)

        # Without it (the agent stopped first: it would put it back), the containers lose
        # each other and the doctor says what to do.
        tb.stop_agent(a)
        tb.run(a.netns, ["sh", "-c", "iptables " + weft0_accept(tb, a)[0].replace(
            "-A FORWARD", "-D FORWARD", 1)])
        assert not tb.ping(c1.netns, c2.ip, wait=1)
        rc, report = doctor(tb, a)
        br = check(report, "br_netfilter")
        assert rc == 1
        assert br["result"] == "fail"
        assert "containers on this host cannot reach each other; the agent adds its accept " \
               "for weft0 on its next pass" in br["message"]
        tb.start_agent(a)
        wait_check(tb, a, "br_netfilter", "pass")
        assert tb.ping(c1.netns, c2.ip)

        # Leaving for good takes weft's accepts away, and only those.
        tb.stop_agent(a)
        tb.start_agent(a, ["--release-on-exit"])
        tb.wait_converged(60)
        assert tb.stop_agent(a) == 0
        forward = iptables(tb, a, "-S", "FORWARD").stdout
        assert FORWARD_COMMENT not in forward
        assert "-A FORWARD -s 198.18.250.1/32 -j ACCEPT" in forward


def test_doctor_finds_a_path_mtu_below_the_overlay_mtu() -> None:
    """udp sends its packets with DF: a router link narrower than the underlay is a black
    hole for full-size packets, which the probes find (the small probe still passes)."""
    with Testbed(hosts=2, containers_per_host=0, config=config("udp"), routed_hosts=1) as tb:
        tb.start()
        a, b = tb.hosts
        wait_all_pass(tb, a)
        tb.set_router_link_mtu(1400)
        mtu = wait_check(tb, a, "MTU", "fail")
        assert f"({b.underlay_ip}) passes 576" in mtu["message"]
        assert "set the underlay's MTU right on every link" in mtu["message"]
        tb.set_router_link_mtu(1500)
        wait_check(tb, a, "MTU", "pass")
        wait_all_pass(tb, a)


needs_docker = pytest.mark.skipif(
    shutil.which("dockerd") is None or not Path("/bin/busybox").exists(),
    reason="needs Debian's docker.io and busybox-static")


@needs_docker
def test_doctor_finds_docker_on_the_wrong_bip() -> None:
    with Testbed(hosts=1, containers_per_host=0, config=config("vxlan"),
                 runtime="docker") as tb:
        tb.start()
        (a,) = tb.hosts
        assert isinstance(tb.runtime, DockerRuntime)
        runtime: DockerRuntime = tb.runtime
        docker = wait_check(tb, a, "Docker", "pass")
        assert "docker0 on 198.19." in docker["message"]
        runtime.stop_host(a)
        runtime.start_host(a, flags=["--bip=172.31.0.1/16"])
        docker = wait_check(tb, a, "Docker", "fail")
        assert "docker0 has 172.31.0.1/16, not in this host's subnet" in docker["message"]
        assert "start dockerd with `$(weft docker-opts)`" in docker["message"]
        runtime.stop_host(a)
        runtime.start_host(a)
        wait_check(tb, a, "Docker", "pass")


