"""What weft sends the kernel's WireGuard device, without a kernel: `KernelDevice.apply`
runs for real, its generic-netlink messages are built by pyroute2's own WireGuard code and
encoded to the bytes the kernel would get; those bytes are decoded again and read back by
weft's own parser. And `KernelDevice.read` is fed replies shaped as the kernel sends them
(a device dumped over several messages). The real kernel path is in
tests/netns/test_wireguard_kernel.py, where the module exists."""

from __future__ import annotations

import ipaddress
from typing import Any, ClassVar

import pytest
from pyroute2.netlink.generic.wireguard import (
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    AsyncWireGuard,
    wgmsg,
)

from weft.backends.wireguard import kernel
from weft.backends.wireguard.kernel import KernelDevice
from weft.backends.wireguard.keys import PrivateKey, PublicKey
from weft.backends.wireguard.plan import DeviceChange, PeerConfig
from weft.core.errors import KernelError


def _builder() -> Any:
    """pyroute2's WireGuard socket class without a socket: only its message-building
    methods are used (they touch no socket state)."""
    return object.__new__(AsyncWireGuard)


def _set_message(ifname: str, listen_port: int | None = None,
                 private_key: str | None = None, peer: dict[str, Any] | None = None) -> bytes:
    """The bytes of one WG_CMD_SET_DEVICE, built as pyroute2's `WireGuard.set` builds it
    (same attributes, same order), up to the socket's send."""
    builder = _builder()
    msg = wgmsg()
    msg["attrs"].append(["WGDEVICE_A_IFNAME", ifname])
    if private_key is not None:
        builder._wg_test_key(private_key)
        msg["attrs"].append(["WGDEVICE_A_PRIVATE_KEY", private_key])
    if listen_port is not None:
        msg["attrs"].append(["WGDEVICE_A_LISTEN_PORT", listen_port])
    if peer is not None:
        builder._wg_set_peer(msg, peer)
    msg["cmd"] = 1  # WG_CMD_SET_DEVICE
    msg["version"] = 1
    msg.encode()
    return bytes(msg.data)


def _decode(data: bytes) -> Any:
    msg = wgmsg(data)
    msg.decode()
    return msg


class RecordingWireGuard:
    """Stands in for pyroute2's `WireGuard` socket at the one point where bytes would go
    to the kernel: each `set` becomes the encoded message, kept in order."""

    sent: ClassVar[list[bytes]] = []
    replies: ClassVar[list[bytes]] = []

    def __enter__(self) -> RecordingWireGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set(self, interface: str, listen_port: int | None = None, fwmark: int | None = None,
            private_key: str | None = None, peer: dict[str, Any] | None = None) -> None:
        assert fwmark is None  # weft sets no fwmark on the device
        self.sent.append(_set_message(interface, listen_port, private_key, peer))

    def info(self, interface: str) -> list[Any]:
        return [_decode(reply) for reply in self.replies]


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch) -> type[RecordingWireGuard]:
    RecordingWireGuard.sent, RecordingWireGuard.replies = [], []
    monkeypatch.setattr(kernel, "WireGuard", RecordingWireGuard)
    return RecordingWireGuard


def _key(seed: int) -> PrivateKey:
    return PrivateKey(bytes([seed]) * 31 + b"\x40")


def peer(seed: int, *nets: str, endpoint: tuple[str, int] | None = ("198.18.0.2", 51820),
         keepalive: int = 0, psk: bytes | None = None) -> PeerConfig:
    return PeerConfig(
        public_key=_key(seed).public_key(),
        endpoint=(ipaddress.ip_address(endpoint[0]), endpoint[1]) if endpoint else None,
        allowed_ips=frozenset(ipaddress.ip_network(n) for n in nets),
        keepalive=keepalive, psk=psk)


def _peers(data: bytes) -> list[Any]:
    return list(_decode(data).get_attr("WGDEVICE_A_PEERS") or [])


def test_an_upsert_reads_back_as_the_peer_weft_planned(wire: type[RecordingWireGuard]) -> None:
    planned = [
        peer(1, "198.19.1.0/24"),
        peer(2, "198.19.2.0/24", "198.19.3.0/24", keepalive=25, psk=b"\x07" * 32),
        peer(3, "2001:db8:3::/64", endpoint=("2001:db8::3", 51821)),
        peer(4, "198.19.4.0/24", endpoint=None),
    ]
    KernelDevice("weft.wg0").apply(DeviceChange(upsert=tuple(planned)))
    assert len(wire.sent) == len(planned)  # one peer per message, as the kernel takes them
    for data, want in zip(wire.sent, planned, strict=True):
        msg = _decode(data)
        assert msg.get_attr("WGDEVICE_A_IFNAME") == "weft.wg0"
        (sent,) = _peers(data)
        assert kernel._parse_peer(sent) == want
        # The kernel replaces the peer's allowed IPs with these: a subnet the peer no
        # longer holds does not linger.
        assert sent.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REPLACE_ALLOWEDIPS


def test_no_psk_is_sent_as_zeros_so_a_previous_one_is_cleared(
        wire: type[RecordingWireGuard]) -> None:
    KernelDevice("weft.wg0").apply(DeviceChange(upsert=(peer(1, "198.19.1.0/24"),)))
    (sent,) = _peers(wire.sent[0])
    assert kernel._key_attr(sent.get_attr("WGPEER_A_PRESHARED_KEY")) == bytes(32)
    assert sent.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") == 0  # likewise


def test_removals_go_first_then_upserts_and_the_key_and_port_before_both(
        wire: type[RecordingWireGuard]) -> None:
    own = _key(9)
    gone, moved_to = peer(5, "198.19.5.0/24"), peer(6, "198.19.5.0/24")
    KernelDevice("weft.wg0").apply(DeviceChange(
        private_key=own, listen_port=51820, remove=(gone.public_key,), upsert=(moved_to,)))
    first, removal, upsert = (_decode(d) for d in wire.sent)
    assert kernel._key_attr(first.get_attr("WGDEVICE_A_PRIVATE_KEY")) == own.raw
    assert first.get_attr("WGDEVICE_A_LISTEN_PORT") == 51820
    assert first.get_attr("WGDEVICE_A_PEERS") is None
    (removed,) = removal.get_attr("WGDEVICE_A_PEERS")
    assert removed.get_attr("WGPEER_A_FLAGS") == WGPEER_F_REMOVE_ME
    assert kernel._key_attr(removed.get_attr("WGPEER_A_PUBLIC_KEY")) == gone.public_key.raw
    # The subnet is free (its old holder removed) when its new holder claims it.
    (added,) = upsert.get_attr("WGDEVICE_A_PEERS")
    assert kernel._parse_peer(added) == moved_to


def test_an_empty_change_sends_nothing(wire: type[RecordingWireGuard]) -> None:
    KernelDevice("weft.wg0").apply(DeviceChange())
    assert wire.sent == []


def test_a_bad_argument_is_a_kernel_error_naming_the_device(
        wire: type[RecordingWireGuard]) -> None:
    bad = PeerConfig(PublicKey(b"\x01" * 32), None, frozenset(), psk=b"short")
    with pytest.raises(KernelError, match=r"configure WireGuard device weft\.wg0"):
        KernelDevice("weft.wg0").apply(DeviceChange(upsert=(bad,)))


def _reply(private_key: PrivateKey | None, port: int, peers: list[dict[str, Any]]) -> bytes:
    """A WG_CMD_GET_DEVICE reply, as the kernel sends it (peers' counters included)."""
    msg = wgmsg()
    msg["cmd"] = 0  # WG_CMD_GET_DEVICE
    msg["version"] = 1
    msg["attrs"].append(["WGDEVICE_A_IFNAME", "weft.wg0"])
    if private_key is not None:
        msg["attrs"].append(["WGDEVICE_A_PRIVATE_KEY", private_key.to_base64()])
    msg["attrs"].append(["WGDEVICE_A_LISTEN_PORT", port])
    if peers:
        msg["attrs"].append(["WGDEVICE_A_PEERS", [{"attrs": p["attrs"]} for p in peers]])
    msg.encode()
    return bytes(msg.data)


def _peer_attrs(p: PeerConfig, rx: int, tx: int, handshake: int) -> dict[str, Any]:
    spec = kernel._peer_spec(p)
    holder = wgmsg()
    _builder()._wg_set_peer(holder, spec)
    ((_, [body]),) = holder["attrs"]
    attrs = [a for a in body["attrs"] if a[0] != "WGPEER_A_FLAGS"]
    attrs += [["WGPEER_A_RX_BYTES", rx], ["WGPEER_A_TX_BYTES", tx],
              ["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": handshake, "tv_nsec": 0}]]
    return {"attrs": attrs}


def test_read_merges_a_peer_dumped_over_two_messages_and_sums_the_counters(
        wire: type[RecordingWireGuard]) -> None:
    own = _key(9)
    a = peer(1, "198.19.1.0/24", "198.19.11.0/24", keepalive=25, psk=b"\x05" * 32)
    b = peer(2, "198.19.2.0/24")
    first_half = PeerConfig(a.public_key, a.endpoint,
                            frozenset({ipaddress.ip_network("198.19.1.0/24")}), 25, a.psk)
    second_half = PeerConfig(a.public_key, None,
                             frozenset({ipaddress.ip_network("198.19.11.0/24")}), 25, a.psk)
    wire.replies = [
        _reply(own, 51820, [_peer_attrs(first_half, 100, 10, 1700000000)]),
        _reply(None, 0, [_peer_attrs(second_half, 0, 0, 0), _peer_attrs(b, 5, 7, 0)]),
    ]
    state = KernelDevice("weft.wg0").read()
    assert state.private_key == own
    assert state.listen_port == 51820
    assert dict(state.peers) == {a.public_key: a, b.public_key: b}
    assert dict(state.counters) == {"rx_bytes": 105, "tx_bytes": 17, "peers_with_handshake": 1}
    assert dict(state.handshakes) == {a.public_key: 1700000000}  # per peer, for status
