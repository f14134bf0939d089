"""The udp forwarder's control channel, as any user, with no capabilities: the peer table's
wire form both ways, and a real forwarder (a socketpair for its device, a socket on
127.0.0.1) answering on a real Unix socket as the agent asks it."""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from weft.backends.udp.bind import open_bind
from weft.backends.udp.control import (
    ControlError,
    ForwarderSpec,
    decode_table,
    encode_table,
    forwarder_version,
    request,
)
from weft.backends.udp.daemon import Service, listen
from weft.backends.udp.forwarder import Forwarder
from weft.backends.udp.plan import Peer, PeerTable

LOOPBACK = ipaddress.IPv4Address("127.0.0.1")
V4 = PeerTable.build(4, 24, [
    Peer(ipaddress.IPv4Network("198.19.1.0/24"), ipaddress.IPv4Address("198.18.0.11"), 8285),
    Peer(ipaddress.IPv4Network("198.19.2.0/24"), ipaddress.IPv4Address("198.18.0.12"), 8300),
])
V6 = PeerTable.build(6, 64, [
    Peer(ipaddress.IPv6Network("2001:db8:1:1::/64"), ipaddress.IPv6Address("2001:db8::11"),
         8285),
])


@pytest.mark.parametrize("table", [V4, V6, PeerTable(4, 24)], ids=["v4", "v6", "empty"])
def test_a_peer_table_crosses_the_channel_unchanged(table: PeerTable) -> None:
    back = decode_table(encode_table(table))
    assert (back.version, back.subnet_len, back.routes, back.members) == (
        table.version, table.subnet_len, table.routes, table.members)
    assert back.mask == table.mask


@pytest.mark.parametrize("data", [
    {},
    [],
    {"version": 5, "subnet_len": 24, "routes": []},
    {"version": 4, "subnet_len": 33, "routes": []},
    {"version": 4, "subnet_len": 24, "routes": [[1, "198.18.0.11"]]},
    {"version": 4, "subnet_len": 24, "routes": [[1, "198.18.0.11", 0]]},
    {"version": 4, "subnet_len": 24, "routes": [[1, "198.18.0.11", True]]},
    {"version": 4, "subnet_len": 24, "routes": [[1 << 32, "198.18.0.11", 8285]]},
    {"version": 4, "subnet_len": 24, "routes": [["198.19.1.0", "198.18.0.11", 8285]]},
], ids=lambda d: repr(d)[:40])
def test_anything_else_is_refused(data: object) -> None:
    with pytest.raises(ValueError, match="peer table"):
        decode_table(data)  # type: ignore[arg-type]


SPEC = ForwarderSpec("weft.t0", str(LOOPBACK), 0, 1500, 4, 24, offloads=False)


class _Device:
    """A socketpair end in place of the TUN device (the loops never run here)."""

    name = "weft.t0"
    csum = False
    tso = False

    def __init__(self, end: socket.socket) -> None:
        self.end = end
        self.notes: list[str] = []

    @property
    def fd(self) -> int:
        return self.end.fileno()

    def wake(self) -> None:
        pass

    def close(self) -> None:
        self.end.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, Service]]:
    """A forwarder's control socket in a private directory, served in a thread."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    end, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    forwarder = Forwarder(_Device(end), open_bind(LOOPBACK, 0, False), 1500, 4, 24)
    service = Service(SPEC, forwarder)
    server, _ = listen(state / "control.sock")
    thread = threading.Thread(target=service.serve, args=(server,), daemon=True)
    thread.start()
    try:
        yield state / "control.sock", service
    finally:
        if not service.stopping:
            request(state / "control.sock", {"op": "stop"})
        thread.join(timeout=10)
        assert not thread.is_alive()
        server.close()
        service.forwarder.close()
        kernel.close()


def test_hello_names_the_version_the_spec_and_the_pid(served: tuple[Path, Service]) -> None:
    path, _ = served
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    reply, pid = request(path, {"op": "hello"})
    assert reply == {"version": forwarder_version(), "spec": SPEC.as_dict(), "pid": os.getpid()}
    assert pid == os.getpid()  # SO_PEERCRED: the process at the other end


def test_peers_set_over_the_channel_are_the_forwarders(served: tuple[Path, Service]) -> None:
    path, service = served
    assert request(path, {"op": "set_peers", "table": encode_table(V4)})[0] == {"ok": True}
    assert service.forwarder.peers.routes == V4.routes
    status, _ = request(path, {"op": "status"})
    assert status["peers"] == {"198.19.1.0/24": "198.18.0.11:8285",
                               "198.19.2.0/24": "198.18.0.12:8300"}
    assert status["counters"]["tx_packets"] == 0


def test_a_table_of_another_network_or_an_unknown_op_is_refused(
        served: tuple[Path, Service]) -> None:
    path, service = served
    with pytest.raises(ControlError, match="IPv6 /64"):
        request(path, {"op": "set_peers", "table": encode_table(V6)})
    with pytest.raises(ControlError, match="unknown op"):
        request(path, {"op": "reload"})
    with pytest.raises(ControlError, match="peer table is a JSON object"):
        request(path, {"op": "set_peers", "table": [1, 2]})
    assert service.forwarder.peers.routes == {}
    assert request(path, {"op": "hello"})[0]["pid"] == os.getpid()  # still serving


def test_the_client_never_connects_through_a_symlink(served: tuple[Path, Service],
                                                    tmp_path: Path) -> None:
    path, _ = served
    link = tmp_path / "state" / "elsewhere.sock"
    link.symlink_to(path)
    with pytest.raises(ControlError, match="not root's forwarder control socket"):
        request(link, {"op": "hello"})
    with pytest.raises(ControlError, match="no forwarder control socket"):
        request(tmp_path / "state" / "missing.sock", {"op": "hello"})


def test_stop_ends_the_serving_loop(served: tuple[Path, Service]) -> None:
    path, service = served
    assert request(path, {"op": "stop"})[0] == {"ok": True}
    assert service.stopping
