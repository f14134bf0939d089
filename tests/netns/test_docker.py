"""Docker as the seed ran it: a real dockerd per host, configured only from subnet.env.

Each testbed host runs Debian's dockerd (inside the host's namespace) started with the
flags `weft docker-opts` printed from the `subnet.env` the host's agent wrote; containers
are `docker run` containers of a locally imported busybox image. One testbed per backend
is shared by this module's tests (building one costs ~15 s); each test leaves it working.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers import PingProbe, missing, requires, weft_forward_accepts
from helpers import network_config as config
from weft.host.forward_accept import COMMENT as FORWARD_COMMENT
from weft.integrations.subnet_env import read_subnet_env
from weft_lab.runtimes.cleanup import NETNS_LEDGER
from weft_lab.runtimes.docker import DockerRuntime
from weft_lab.testbed import RUNS_DIR, Container, Host, Testbed, list_netns

pytestmark = [
    pytest.mark.netns,
    requires(shutil.which("dockerd") is not None and Path("/bin/busybox").exists(),
             "needs Debian's docker.io and busybox-static "
             "(scripts/setup.sh --runtimes installs them)"),
]


@pytest.fixture(scope="module")
def docker_bed(request: pytest.FixtureRequest) -> Iterator[Testbed]:
    with Testbed(hosts=3, containers_per_host=2, config=config(request.param),
                 runtime="docker", log_level="info") as tb:
        tb.start()
        yield tb


def runtime(tb: Testbed) -> DockerRuntime:
    assert isinstance(tb.runtime, DockerRuntime)
    return tb.runtime


def in_container_ping(tb: Testbed, src: Container, dst: Container, *, size: int = 56) -> bool:
    """busybox ping from inside the container (its own binary, its own stack)."""
    proc = tb.container_exec(src, ["ping", "-c", "1", "-W", "2", "-s", str(size),
                                   str(dst.ip)], check=False, timeout=20)
    return proc.returncode == 0


def ping_during(tb: Testbed, src: Container, dst: Container,
                action: Callable[[], None], count: int = 200) -> tuple[int, int]:
    """(sent, received) of a 50 ms ping from inside `src` to `dst` while `action` runs.

    Entered with nsenter, not `docker exec`: an exec session dies with the dockerd it
    went through, while the container itself lives on (--live-restore)."""
    pid = runtime(tb).docker(src.host, "inspect", "-f", "{{.State.Pid}}",
                             runtime(tb).container_name(src)).stdout.strip()
    # The machine's ping (iputils: -D timestamps each reply) in the container's network.
    ping = PingProbe(["nsenter", "-t", pid, "-n", "ping", "-D", "-n", "-i", "0.05",
                      "-c", str(count), str(dst.ip)])
    try:
        ping.wait_replies_after("before the action", 0.0, count=5)
        action()
        out = ping.wait_done(60)
    finally:
        ping.stop()
    m = re.search(r"(\d+) packets transmitted, (\d+) (?:packets )?received", out)
    assert m is not None, out
    return int(m.group(1)), int(m.group(2))


def forward_rules(tb: Testbed, host: Host) -> list[str]:
    return tb.run(host.netns, ["iptables", "-S", "FORWARD"]).stdout.splitlines()


@pytest.mark.parametrize("docker_bed", ["vxlan", "udp"], indirect=True)
def test_docker_full_mesh_configured_from_subnet_env(docker_bed: Testbed) -> None:
    tb = docker_bed
    leases = {lease.public_ip: lease for lease in tb.leases()}
    for host in tb.hosts:
        env = read_subnet_env(host.subnet_env_path)
        # dockerd was started with exactly docker-opts' flags from this subnet.env
        pid = int((DockerRuntime.root(host) / "dockerd.pid").read_text())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        assert f"--bip={env.gateway}/{env.subnet.prefixlen}" in argv
        assert f"--mtu={env.mtu}" in argv
        assert "--ip-masq=false" in argv  # weft masquerades; docker must not again
        bridge = json.loads(runtime(tb).docker(host, "network", "inspect", "bridge").stdout)
        assert bridge[0]["IPAM"]["Config"][0]["Gateway"] == str(env.gateway)
        for c in (c for c in tb.containers if c.host is host):
            assert c.ip in leases[host.underlay_ip].subnet
            mtu = tb.container_exec(c, ["cat", "/sys/class/net/eth0/mtu"]).stdout.strip()
            assert mtu == str(env.mtu)
    failed = [(s.name, d.name) for s in tb.containers for d in tb.containers
              if s is not d and not any(in_container_ping(tb, s, d) for _ in range(3))]
    assert not failed
    # a full-size packet crosses: the container's MTU fits the overlay's
    c1, c2 = tb.containers[0], tb.containers[-1]
    overlay_mtu = read_subnet_env(c1.host.subnet_env_path).mtu
    assert in_container_ping(tb, c1, c2, size=overlay_mtu - 28)  # 20 IP + 8 ICMP


@pytest.mark.parametrize("docker_bed", ["vxlan"], indirect=True)
def test_ping_across_agent_restarts_loses_nothing(docker_bed: Testbed) -> None:
    tb = docker_bed

    def restart_agents() -> None:
        for host in tb.hosts:
            assert tb.stop_agent(host) == 0
            tb.start_agent(host)
        tb.wait_converged(30)

    sent, received = ping_during(tb, tb.containers[0], tb.containers[3], restart_agents)
    assert received == sent


@pytest.mark.parametrize("docker_bed", ["vxlan"], indirect=True)
def test_ping_across_dockerd_restarts_with_agent_restarted_before_or_after(
        docker_bed: Testbed) -> None:
    """--live-restore keeps containers up; dockerd re-applies its FORWARD chains."""
    tb = docker_bed
    h1, h2, _ = tb.hosts

    def restart() -> None:
        runtime(tb).restart_host(h1)  # dockerd, then weft's agent
        assert tb.stop_agent(h1) == 0
        tb.start_agent(h1)
        assert tb.stop_agent(h2) == 0  # weft's agent, then dockerd
        tb.start_agent(h2)
        runtime(tb).restart_host(h2)
        tb.wait_converged(30)

    sent, received = ping_during(tb, tb.containers[0], tb.containers[2], restart)
    assert received == sent
    for host in (h1, h2):
        rules = forward_rules(tb, host)
        assert any("DOCKER-USER" in r for r in rules)
        assert sum(FORWARD_COMMENT in r for r in rules) == weft_forward_accepts()


@pytest.mark.parametrize("docker_bed", ["vxlan"], indirect=True)
def test_dockerd_started_before_the_agent_drop_policy(docker_bed: Testbed) -> None:
    """A host boots: forwarding off, dockerd first (it turns forwarding on and sets
    FORWARD's policy to DROP), weft's agent after it; the overlay still carries traffic."""
    tb = docker_bed
    h3 = tb.hosts[2]
    assert tb.stop_agent(h3) == 0
    runtime(tb).stop_host(h3)
    tb.run(h3.netns, ["sysctl", "-qw", "net.ipv4.ip_forward=0"])
    tb.run(h3.netns, ["iptables", "-P", "FORWARD", "ACCEPT"])
    runtime(tb).start_host(h3)
    assert "-P FORWARD DROP" in forward_rules(tb, h3)
    tb.start_agent(h3)
    tb.wait_converged(30)
    assert "-P FORWARD DROP" in forward_rules(tb, h3)
    for c in (c for c in tb.containers if c.host is h3):
        for other in (o for o in tb.containers if o.host is not h3):
            assert any(in_container_ping(tb, other, c) for _ in range(3)), (other.name, c.name)
            assert any(in_container_ping(tb, c, other) for _ in range(3)), (c.name, other.name)


CRASHING_RUN = """
import sys, time
from weft_lab.testbed import Testbed
tb = Testbed(hosts=1, containers_per_host=1, runtime=sys.argv[1], log_level="info")
tb.build()
tb.start()
print(tb.run_id, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("kind", ["docker", "podman"])
def test_testbed_down_removes_what_a_killed_run_started(kind: str) -> None:
    if shutil.which(kind) is None:
        missing(f"needs {kind}")
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_RUN, kind],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        run_id = proc.stdout.readline().strip()
        assert run_id, "the run did not come up"
    finally:
        proc.kill()  # SIGKILL: no cleanup of its own
        proc.wait()
    run_dir = RUNS_DIR / run_id
    assert (run_dir / "h1").exists()
    ledger = run_dir / NETNS_LEDGER  # podman's own /run/netns/netns-<uuid> files
    runtime_netns = ledger.read_text().split() if ledger.exists() else []
    if kind == "podman":
        assert runtime_netns
        assert all(Path(p).exists() for p in runtime_netns)
    subprocess.run([sys.executable, "-m", "weft", "testbed", "down"], check=True, timeout=120)
    assert not [p for p in runtime_netns if Path(p).exists()]
    assert run_id not in Path("/proc/self/mountinfo").read_text()
    assert not run_dir.exists()
    assert not [n for n in list_netns() if n.startswith(f"weft-{run_id}-")]
    assert not list(Path("/sys/fs/cgroup").glob(f"*/weft-{run_id}-*"))
    leftover = subprocess.run(["pgrep", "-f", f"weft-runs/{run_id}/"], capture_output=True,
                              text=True, check=False).stdout.split()
    assert not leftover
