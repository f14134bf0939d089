"""podman through weft-cni: `podman run --network weft`, the reference plugins behind it.

podman (CNI backend, runc) runs in each testbed host's namespace and calls weft-cni from
the `weft` conflist in its own network_config_dir. A recorder in front of the real
weft-cni notes each CNI_COMMAND podman issues, then execs weft-cni unchanged.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import requires
from weft_lab.runtimes.podman import PodmanRuntime
from weft_lab.testbed import Container, Testbed

pytestmark = [
    pytest.mark.netns,
    requires(shutil.which("podman") is not None and Path("/bin/busybox").exists(),
             "needs Debian's podman and busybox-static "
             "(scripts/setup.sh --runtimes installs them)"),
]

CONFIG = json.dumps({"Network": "198.19.0.0/16", "Backend": {"Type": "vxlan"}})


def record_cni_commands(tb: Testbed) -> Path:
    """Put a recorder named weft-cni first in podman's plugin path; return its log."""
    assert isinstance(tb.runtime, PodmanRuntime)
    bin_dir = tb.run_dir / "cni-recorder"
    bin_dir.mkdir(parents=True)
    log = tb.run_dir / "cni-commands.log"
    real = Path(sys.executable).parent / "weft-cni"
    wrapper = bin_dir / "weft-cni"
    wrapper.write_text(f'#!/bin/sh\necho "$CNI_COMMAND $CNI_CONTAINERID" >> {log}\n'
                       f'exec {real} "$@"\n')
    wrapper.chmod(0o755)
    tb.runtime.plugin_dirs.insert(0, str(bin_dir))
    return log


@pytest.fixture(scope="module")
def podman_bed() -> Iterator[tuple[Testbed, Path]]:
    with Testbed(hosts=2, containers_per_host=1, config=CONFIG, runtime="podman",
                 log_level="info") as tb:
        log = record_cni_commands(tb)
        tb.start()
        yield tb, log


def podman_id(tb: Testbed, c: Container) -> str:
    assert isinstance(tb.runtime, PodmanRuntime)
    return tb.runtime.podman(c.host, "inspect", "-f", "{{.Id}}", c.netns).stdout.strip()


def allocations(_tb: Testbed, c: Container) -> set[str]:
    """The addresses host-local holds on c's host."""
    ipam = c.host.run_dir / "cni" / "ipam" / "weft"
    return {p.name for p in ipam.iterdir() if p.name[0].isdigit()} if ipam.exists() else set()


def test_podman_containers_reach_each_other_across_hosts(
        podman_bed: tuple[Testbed, Path]) -> None:
    tb, _ = podman_bed
    leases = {lease.public_ip: lease for lease in tb.leases()}
    c1, c2 = tb.containers
    for c in tb.containers:
        assert c.ip in leases[c.host.underlay_ip].subnet
        mtu = tb.container_exec(c, ["cat", "/sys/class/net/eth0/mtu"]).stdout.strip()
        assert f"FLANNEL_MTU={mtu}\n" in c.host.subnet_env_path.read_text()
    for src, dst in ((c1, c2), (c2, c1)):
        ok = any(tb.container_exec(src, ["ping", "-c", "1", "-W", "2", str(dst.ip)],
                                   check=False).returncode == 0 for _ in range(3))
        assert ok, (src.name, dst.name)


def test_podman_run_adds_and_rm_deletes_through_weft_cni(
        podman_bed: tuple[Testbed, Path]) -> None:
    tb, log = podman_bed
    host = tb.hosts[0]
    extra = Container(host, 9, f"{tb.hosts[0].netns}c9")
    before = allocations(tb, extra)
    tb.attach(extra)  # podman run --network weft
    cid = podman_id(tb, extra)
    assert f"ADD {cid}" in log.read_text().splitlines()
    assert allocations(tb, extra) == before | {str(extra.ip)}
    assert (host.run_dir / "cni" / f"{cid}:eth0").exists()  # weft-cni saved the delegate
    peer = tb.containers[1]
    assert any(tb.container_exec(extra, ["ping", "-c", "1", "-W", "2", str(peer.ip)],
                                 check=False).returncode == 0 for _ in range(3))
    tb.detach(extra)  # podman rm -f
    assert f"DEL {cid}" in log.read_text().splitlines()
    assert allocations(tb, extra) == before  # host-local's address is free again
    assert not (host.run_dir / "cni" / f"{cid}:eth0").exists()


def test_podman_restart_is_del_then_add_and_never_check(
        podman_bed: tuple[Testbed, Path]) -> None:
    """podman 4.3 with CNI never calls CHECK (not at run, restart or rm); `podman
    restart` is a DEL and a fresh ADD, and the restarted container is on the overlay."""
    tb, log = podman_bed
    c, peer = tb.containers
    assert isinstance(tb.runtime, PodmanRuntime)
    cid = podman_id(tb, c)
    mark = len(log.read_text().splitlines())
    tb.runtime.restart_container(c)
    new = [line for line in log.read_text().splitlines()[mark:] if cid in line]
    assert new == [f"DEL {cid}", f"ADD {cid}"]  # (and VERSION, libcni's probe)
    assert not any(line.startswith("CHECK") for line in log.read_text().splitlines())
    assert allocations(tb, c) == {str(c.ip)}  # the old address was freed by the DEL
    assert any(tb.container_exec(c, ["ping", "-c", "1", "-W", "2", str(peer.ip)],
                                 check=False).returncode == 0 for _ in range(3))


def sandbox_key(tb: Testbed, c: Container) -> Path:
    assert isinstance(tb.runtime, PodmanRuntime)
    out = tb.runtime.podman(c.host, "inspect", "-f", "{{.NetworkSettings.SandboxKey}}",
                            c.netns).stdout.strip()
    return Path(out)


def test_a_restarted_container_leaves_no_namespace_behind() -> None:
    """`podman restart` gives the container a fresh /run/netns/netns-<uuid>; neither
    that one nor the first outlives the run."""
    with Testbed(hosts=1, containers_per_host=1, config=CONFIG, runtime="podman",
                 log_level="info") as tb:
        tb.start()
        assert isinstance(tb.runtime, PodmanRuntime)
        (c,) = tb.containers
        keys = {sandbox_key(tb, c)}
        tb.runtime.restart_container(c)
        keys.add(sandbox_key(tb, c))
        assert all(k.parent == Path("/run/netns") for k in keys)
        assert tb.container_exec(c, ["ip", "-4", "addr", "show", "eth0"]).stdout.count(
            str(c.ip)) == 1
    assert not [k for k in keys if k.exists()]
