"""The WireGuard cross-platform userspace API (UAPI) text protocol, sans-IO.

A request is `get=1` or `set=1` followed by `key=value` lines and an empty line; the
answer to `get` is the device as `key=value` lines, and every answer ends with `errno=N`
and an empty line. Keys are hex on this interface. See wireguard.com/xplatform.

`encode_*` build request bytes; `parse_*` read answers and raise `UapiProtocolError` on
malformed input (the other side is a separate process: its output is not trusted).
"""

from __future__ import annotations

import ipaddress

from weft.backends.wireguard.keys import KeyFormatError, PrivateKey, PublicKey
from weft.backends.wireguard.plan import (
    DeviceChange,
    DeviceState,
    PeerConfig,
    format_endpoint,
    normalise_psk,
    parse_endpoint,
)
from weft.core.config import IPNetwork

GET_REQUEST = b"get=1\n\n"


class UapiProtocolError(ValueError):
    """An answer on the UAPI socket that does not follow the protocol."""


def encode_set(change: DeviceChange) -> bytes:
    lines = ["set=1"]
    if change.private_key is not None:
        lines.append(f"private_key={change.private_key.hex()}")
    if change.listen_port is not None:
        lines.append(f"listen_port={change.listen_port}")
    for key in change.remove:
        lines += [f"public_key={key.hex()}", "remove=true"]
    for peer in change.upsert:
        lines.append(f"public_key={peer.public_key.hex()}")
        if peer.endpoint is not None:
            lines.append(f"endpoint={format_endpoint(peer.endpoint)}")
        lines.append(f"persistent_keepalive_interval={peer.keepalive}")
        lines.append(f"preshared_key={(peer.psk or bytes(32)).hex()}")
        lines.append("replace_allowed_ips=true")
        lines += [f"allowed_ip={net}" for net in sorted(peer.allowed_ips, key=str)]
    return ("\n".join(lines) + "\n\n").encode("ascii")


def _pairs(text: str) -> list[tuple[str, str]]:
    if not text.endswith("\n\n"):
        raise UapiProtocolError("answer does not end with an empty line")
    pairs = []
    for line in text[:-2].split("\n"):
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise UapiProtocolError(f"line {line[:40]!r} is not key=value")
        pairs.append((key, value))
    return pairs


def _errno(pairs: list[tuple[str, str]]) -> int:
    if not pairs or pairs[-1][0] != "errno":
        raise UapiProtocolError("answer does not end with errno=N")
    try:
        return int(pairs[-1][1])
    except ValueError:
        raise UapiProtocolError(f"errno {pairs[-1][1][:20]!r} is not a number") from None


def parse_set_answer(text: str) -> int:
    """The errno of a `set` answer (0 = applied)."""
    return _errno(_pairs(text))


def _hex_key(value: str) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise UapiProtocolError("a key is not hex") from None
    if len(raw) != 32:
        raise UapiProtocolError(f"a key has {len(raw)} bytes, not 32")
    return raw


class _PeerBuilder:
    def __init__(self, key: PublicKey) -> None:
        self.key = key
        self.endpoint: str = ""
        self.allowed: set[IPNetwork] = set()
        self.keepalive = 0
        self.psk: bytes | None = None

    def build(self) -> PeerConfig:
        try:
            endpoint = parse_endpoint(self.endpoint)
        except ValueError as exc:
            raise UapiProtocolError(str(exc)) from None
        return PeerConfig(self.key, endpoint, frozenset(self.allowed), self.keepalive,
                          normalise_psk(self.psk))


def parse_get_answer(text: str) -> tuple[int, DeviceState | None]:
    """(errno, state); state is None when errno is not 0."""
    pairs = _pairs(text)
    err = _errno(pairs)
    if err:
        return err, None
    private_key: PrivateKey | None = None
    listen_port = 0
    peers: dict[PublicKey, PeerConfig] = {}
    current: _PeerBuilder | None = None
    counters = {"rx_bytes": 0, "tx_bytes": 0, "peers_with_handshake": 0}
    handshakes: dict[PublicKey, int] = {}
    try:
        for key, value in pairs[:-1]:
            if key == "public_key":
                if current is not None:
                    peers[current.key] = current.build()
                current = _PeerBuilder(PublicKey(_hex_key(value)))
            elif current is None:  # device-level keys come before the first peer
                if key == "private_key":
                    raw = _hex_key(value)
                    private_key = PrivateKey(raw) if any(raw) else None
                elif key == "listen_port":
                    listen_port = int(value)
            elif key == "endpoint":
                current.endpoint = value
            elif key == "allowed_ip":
                current.allowed.add(ipaddress.ip_network(value, strict=False))
            elif key == "persistent_keepalive_interval":
                current.keepalive = int(value)
            elif key == "preshared_key":
                current.psk = _hex_key(value)
            elif key in ("rx_bytes", "tx_bytes"):
                counters[key] += int(value)
            elif key == "last_handshake_time_sec" and int(value) > 0:
                counters["peers_with_handshake"] += 1
                handshakes[current.key] = int(value)
    except (ValueError, KeyFormatError) as exc:
        if isinstance(exc, UapiProtocolError):
            raise
        raise UapiProtocolError(f"bad value in get answer: {exc}") from None
    if current is not None:
        peers[current.key] = current.build()
    return 0, DeviceState(private_key, listen_port, peers, counters, handshakes)
