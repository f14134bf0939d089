"""The kernel's WireGuard device (`weft.backends.wireguard.kernel.KernelDevice`) on a real
kernel: configured and read back over generic netlink, and a whole mesh on it. These run
where the module exists (`ip link add type wireguard` works) and skip, with that reason,
where it does not; the messages weft sends it are unit-tested without a kernel in
tests/unit/test_wireguard_kernel_messages.py. Without the module, asking for it is a clear
error (the last test, which runs only there)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import kernel_wireguard_missing, requires
from weft.core.constants import WIREGUARD_DEVICE
from weft_lab.testbed import Testbed

pytestmark = pytest.mark.netns


@pytest.fixture
def kernel_wireguard() -> None:
    if (reason := kernel_wireguard_missing()) is not None:
        pytest.skip(reason)  # a kernel feature: not something the CI installs


def python_in(netns: str, script: str, *args: str) -> str:
    proc = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", script, *args],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


# Configures a kernel device with KernelDevice, reads it back, changes it; prints "ok".
ROUND_TRIP = """
import ipaddress, sys
from weft.backends.wireguard.kernel import KernelDevice
from weft.backends.wireguard.keys import PrivateKey
from weft.backends.wireguard.plan import DeviceChange, PeerConfig

def peer(seed, *nets, endpoint=("198.18.0.2", 51820), keepalive=0, psk=None):
    key = PrivateKey(bytes([seed]) * 31 + b"\\x40").public_key()
    ep = (ipaddress.ip_address(endpoint[0]), endpoint[1]) if endpoint else None
    return PeerConfig(key, ep, frozenset(ipaddress.ip_network(n) for n in nets), keepalive, psk)

dev = KernelDevice(sys.argv[1])
own = PrivateKey(b"\\x09" * 31 + b"\\x40")
a = peer(1, "198.19.1.0/24", "198.19.11.0/24", keepalive=25, psk=b"\\x05" * 32)
b = peer(2, "198.19.2.0/24")
c = peer(3, "2001:db8:3::/64", endpoint=("2001:db8::3", 51821))
dev.apply(DeviceChange(private_key=own, listen_port=51830, upsert=(a, b, c)))
state = dev.read()
assert state.private_key == own, "private key"
assert state.listen_port == 51830, state.listen_port
assert dict(state.peers) == {p.public_key: p for p in (a, b, c)}, state.peers

# b leaves and d takes its subnet; a loses one of its subnets.
d = peer(4, "198.19.2.0/24", endpoint=None)
a2 = peer(1, "198.19.1.0/24", keepalive=25, psk=b"\\x05" * 32)
dev.apply(DeviceChange(remove=(b.public_key,), upsert=(d, a2)))
assert dict(dev.read().peers) == {p.public_key: p for p in (a2, c, d)}, dev.read().peers
print("ok")
"""


def test_kernel_device_takes_and_reads_back_what_weft_plans(
        kernel_wireguard: None, scratch_netns: str) -> None:
    subprocess.run(["ip", "-n", scratch_netns, "link", "add", "wgk0", "type", "wireguard"],
                   check=True)
    assert python_in(scratch_netns, ROUND_TRIP, "wgk0").strip() == "ok"
    # ...and the kernel itself agrees (wireguard-tools reads it on its own).
    if shutil.which("wg") is not None:
        dump = subprocess.run(["ip", "netns", "exec", scratch_netns, "wg", "show", "wgk0",
                               "allowed-ips"], capture_output=True, text=True, check=True)
        assert sorted(dump.stdout.split()[1::2]) == sorted(
            ["198.19.1.0/24", "198.19.2.0/24", "2001:db8:3::/64"]), dump.stdout


READ_DEVICE = """
import json, sys
from weft.backends.wireguard.kernel import KernelDevice
state = KernelDevice(sys.argv[1]).read()
print(json.dumps({"peers": len(state.peers),
                  "psk": sorted({(p.psk or b"").hex() for p in state.peers.values()}),
                  "keepalive": sorted({p.keepalive for p in state.peers.values()}),
                  "handshakes": state.counters["peers_with_handshake"]}))
"""


def test_a_mesh_on_the_kernel_device_with_psk_and_keepalive(kernel_wireguard: None) -> None:
    psk = bytes(range(32))
    cfg = json.dumps({"Network": "198.19.0.0/16", "Backend": {
        "Type": "wireguard", "Implementation": "kernel", "PSK": base64.b64encode(psk).decode(),
        "PersistentKeepaliveInterval": 25}})
    with Testbed(hosts=3, containers_per_host=1, config=cfg,
                 agent_args=["--release-on-exit"]) as tb:
        tb.start()
        matrix = tb.connectivity()
        assert all(matrix.values()), [pair for pair, ok in matrix.items() if not ok]
        h1 = tb.hosts[0]
        assert tb.host_status(h1)["backend_status"]["implementation"] == "kernel"
        seen = json.loads(python_in(h1.netns, READ_DEVICE, WIREGUARD_DEVICE))
        assert seen == {"peers": 2, "psk": [psk.hex()], "keepalive": [25], "handshakes": 2}
        # No wireguard-go in any host: the kernel carries it.
        for host in tb.hosts:
            pids = subprocess.run(["ip", "netns", "pids", host.netns], capture_output=True,
                                  text=True, check=False).stdout.split()
            names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid in pids
                     if Path(f"/proc/{pid}/comm").exists()}
            assert "wireguard-go" not in names, (host.name, names)
        leaving = tb.hosts[2]
        assert tb.stop_agent(leaving) == 0  # --release-on-exit: its lease and device go
        tb.wait_converged(60)
        assert json.loads(python_in(h1.netns, READ_DEVICE, WIREGUARD_DEVICE))["peers"] == 1
        gone = tb.run(leaving.netns, ["ip", "link", "show", WIREGUARD_DEVICE], check=False)
        assert gone.returncode != 0
        assert tb.ping(tb.containers[0].netns, tb.containers[1].ip)


@requires(shutil.which("wireguard-go") is not None, "needs wireguard-go")
def test_auto_takes_the_kernel_device_where_there_is_one_else_wireguard_go() -> None:
    cfg = json.dumps({"Network": "198.19.0.0/16", "Backend": {"Type": "wireguard"}})
    expected = "wireguard-go" if kernel_wireguard_missing() else "kernel"
    with Testbed(hosts=2, containers_per_host=1, config=cfg) as tb:
        tb.start()
        assert all(tb.connectivity().values())
        for host in tb.hosts:
            assert tb.host_status(host)["backend_status"]["implementation"] == expected


def test_kernel_asked_for_without_the_module_is_a_clear_error() -> None:
    if kernel_wireguard_missing() is None:
        pytest.skip("this kernel has the WireGuard module: asking for it is no error here")
    cfg = json.dumps({"Network": "198.19.0.0/16",
                      "Backend": {"Type": "wireguard", "Implementation": "kernel"}})
    with Testbed(hosts=2, containers_per_host=1, config=cfg) as tb:
        host = tb.hosts[0]
        tb.start_agent(host)
        assert host.agent is not None
        assert host.agent.wait(timeout=30) != 0
        log = tb.agent_log(host)
        assert "no WireGuard module" in log
        assert "modprobe wireguard" in log  # and what to do
        left = tb.run(host.netns, ["ip", "link", "show", WIREGUARD_DEVICE], check=False)
        assert left.returncode != 0
        pids = subprocess.run(["ip", "netns", "pids", host.netns], capture_output=True,
                              text=True, check=False).stdout
        assert not pids.split()  # no wireguard-go started as a fallback
