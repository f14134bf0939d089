"""WireGuard keys, the UAPI codec and the peer plan: pure parts, no root needed."""

from __future__ import annotations

import base64
import ipaddress
import os
import stat
import threading
from pathlib import Path

import pytest
from pyroute2.netlink.generic.wireguard import wgmsg

from weft.backends.registry import parse_config
from weft.backends.wireguard.kernel import _parse_peer, _peer_spec
from weft.backends.wireguard.keyfile import load_or_create_private_key
from weft.backends.wireguard.keys import (
    KeyFormatError,
    PrivateKey,
    PublicKey,
    decode_key,
)
from weft.backends.wireguard.plan import (
    DeviceState,
    PeerConfig,
    device_change,
    parse_endpoint,
    peer_plan,
    peer_sets,
)
from weft.backends.wireguard.protocol import (
    UapiProtocolError,
    encode_set,
    parse_get_answer,
    parse_set_answer,
)
from weft.backends.wireguard.uapi import UapiDevice
from weft.backends.wireguard.userspace import WireguardGo
from weft.core.errors import ConfigError, KernelError
from weft.core.lease import Lease

# RFC 7748 section 6.1: Alice's key pair.
ALICE_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# --- keys ---------------------------------------------------------------------------------


def test_public_key_derivation_matches_rfc7748() -> None:
    assert PrivateKey(ALICE_PRIVATE).public_key().raw == ALICE_PUBLIC


def test_generated_keys_are_clamped_distinct_and_round_trip() -> None:
    a, b = PrivateKey.generate(), PrivateKey.generate()
    assert a != b
    assert a.raw[0] & 7 == 0
    assert a.raw[31] & 0x80 == 0
    assert a.raw[31] & 0x40
    assert PrivateKey.from_base64(a.to_base64()) == a
    assert len(a.to_base64()) == 44
    assert PublicKey.from_base64(a.public_key().to_base64()) == a.public_key()


def test_private_key_never_prints_its_bytes() -> None:
    key = PrivateKey(ALICE_PRIVATE)
    for text in (repr(key), str(key), f"{key}"):
        assert key.to_base64() not in text
        assert key.hex() not in text


@pytest.mark.parametrize(
    "text", ["", "not base64!", b64(b"x" * 31), b64(b"x" * 33), "A" * 43]
)
def test_malformed_keys_are_refused(text: str) -> None:
    with pytest.raises(KeyFormatError):
        decode_key(text)


def test_key_file_is_created_0600_despite_umask_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "state" / "wireguard.key"
    old = os.umask(0)
    try:
        key = load_or_create_private_key(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == key.to_base64() + "\n"
    assert load_or_create_private_key(path) == key  # same key on the next start
    assert [p.name for p in path.parent.iterdir()] == ["wireguard.key"]  # no temp left


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "wireguard.key"
    path.write_text(PrivateKey.generate().to_base64() + "\n")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"mode 0644.*chmod 600"):
        load_or_create_private_key(path)


def test_key_file_with_garbage_is_refused_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "wireguard.key"
    path.write_text("garbage\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="does not hold a key"):
        load_or_create_private_key(path)
    assert path.read_text() == "garbage\n"


def test_key_file_symlink_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text(PrivateKey.generate().to_base64())
    target.chmod(0o600)
    (tmp_path / "wireguard.key").symlink_to(target)
    with pytest.raises(ConfigError, match="symlink"):
        load_or_create_private_key(tmp_path / "wireguard.key")


def test_concurrent_starts_agree_on_one_key(tmp_path: Path) -> None:
    path = tmp_path / "wireguard.key"
    keys: list[PrivateKey] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        keys.append(load_or_create_private_key(path))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(keys) == 8
    assert len(set(keys)) == 1
    assert PrivateKey.from_base64(path.read_text()) == keys[0]


# --- the peer plan ------------------------------------------------------------------------

OWN = PrivateKey.generate().public_key()
K1, K2, K3 = (PrivateKey.generate().public_key() for _ in range(3))


def lease(subnet: str, ip: str, key: object, backend: str = "wireguard") -> Lease:
    data = {} if key is None else {"PublicKey": key}
    return Lease(ipaddress.ip_network(subnet), ipaddress.ip_address(ip), backend, data)


def peer(key: PublicKey, subnet: str, ip: str, port: int = 51820, keepalive: int = 0,
         psk: bytes | None = None) -> PeerConfig:
    return PeerConfig(key, (ipaddress.ip_address(ip), port),
                      frozenset({ipaddress.ip_network(subnet)}), keepalive, psk)


def test_peer_sets_from_leases_with_counted_errors() -> None:
    leases = [
        lease("198.19.2.0/24", "198.18.0.2", str(K1)),
        lease("198.19.3.0/24", "198.18.0.3", str(K2)),
        lease("198.19.4.0/24", "198.18.0.4", "bm90IGEga2V5"),
        lease("198.19.5.0/24", "198.18.0.5", None),
        lease("198.19.6.0/24", "198.18.0.6", str(K3), backend="vxlan"),
        lease("198.19.7.0/24", "198.18.0.7", str(K1)),  # a copied key
        lease("198.19.1.0/24", "198.18.0.1", str(OWN)),  # ourselves
    ]
    sets = peer_sets(leases, OWN, 51820, 25, None)
    wanted, errors = sets.peers, sets.errors
    assert wanted == {K1: peer(K1, "198.19.2.0/24", "198.18.0.2", keepalive=25),
                      K2: peer(K2, "198.19.3.0/24", "198.18.0.3", keepalive=25)}
    assert set(errors) == {"198.19.4.0/24", "198.19.5.0/24", "198.19.6.0/24", "198.19.7.0/24"}
    assert "malformed PublicKey" in errors["198.19.4.0/24"]
    assert "same backend" in errors["198.19.6.0/24"]


def test_plan_removes_stale_updates_changed_and_leaves_equal_alone() -> None:
    actual = {K1: peer(K1, "198.19.2.0/24", "198.18.0.2"),
              K2: peer(K2, "198.19.3.0/24", "198.18.0.3"),
              K3: peer(K3, "198.19.4.0/24", "198.18.0.4")}
    desired = {K1: peer(K1, "198.19.2.0/24", "198.18.0.2"),  # unchanged
               K2: peer(K2, "198.19.3.0/24", "198.18.0.9")}  # moved host
    plan = peer_plan(desired, actual)
    assert plan.remove == (K3,)
    assert plan.upsert == (desired[K2],)
    assert peer_plan(desired, desired).empty


def test_a_changed_key_replaces_the_peer() -> None:
    actual = {K1: peer(K1, "198.19.2.0/24", "198.18.0.2")}
    desired = {K2: peer(K2, "198.19.2.0/24", "198.18.0.2")}
    plan = peer_plan(desired, actual)
    assert plan.remove == (K1,)
    assert plan.upsert == (desired[K2],)
    # Removal comes first in the transaction, so the subnet is free for the new key.
    text = encode_set(plan).decode()
    assert text.index(K1.hex()) < text.index(K2.hex())


def test_identity_is_set_only_where_it_differs() -> None:
    key = PrivateKey.generate()
    same = DeviceState(key, 51820, {})
    assert device_change(same, key, 51820).empty
    change = device_change(DeviceState(None, 0, {}), key, 51820)
    assert change.private_key == key
    assert change.listen_port == 51820


# --- the UAPI codec -----------------------------------------------------------------------


def test_encode_set_is_the_documented_text() -> None:
    psk = bytes(range(32))
    p = peer(K1, "198.19.2.0/24", "198.18.0.2", keepalive=25, psk=psk)
    change = peer_plan({K1: p}, {K2: peer(K2, "198.19.3.0/24", "198.18.0.3")})
    assert encode_set(change).decode() == (
        "set=1\n"
        f"public_key={K2.hex()}\nremove=true\n"
        f"public_key={K1.hex()}\nendpoint=198.18.0.2:51820\n"
        "persistent_keepalive_interval=25\n"
        f"preshared_key={psk.hex()}\n"
        "replace_allowed_ips=true\nallowed_ip=198.19.2.0/24\n\n"
    )


def test_parse_get_answer_of_wireguard_go() -> None:
    key = PrivateKey.generate()
    text = (
        f"private_key={key.hex()}\nlisten_port=51820\n"
        f"public_key={K1.hex()}\npreshared_key={'00' * 32}\nprotocol_version=1\n"
        "endpoint=198.18.0.2:51820\nlast_handshake_time_sec=0\nlast_handshake_time_nsec=0\n"
        "tx_bytes=0\nrx_bytes=0\npersistent_keepalive_interval=0\n"
        "allowed_ip=198.19.2.0/24\n"
        f"public_key={K2.hex()}\npreshared_key={'11' * 32}\n"
        "endpoint=[fd00::3]:51821\npersistent_keepalive_interval=25\n"
        "last_handshake_time_sec=1700000000\nrx_bytes=100\ntx_bytes=200\n"
        "allowed_ip=198.19.3.0/24\nallowed_ip=fd00:3::/64\n"
        "errno=0\n\n"
    )
    err, state = parse_get_answer(text)
    assert err == 0
    assert state is not None
    assert state.private_key == key
    assert state.listen_port == 51820
    assert state.peers[K1] == peer(K1, "198.19.2.0/24", "198.18.0.2")
    assert state.peers[K2].endpoint == (ipaddress.ip_address("fd00::3"), 51821)
    assert state.peers[K2].psk == bytes([0x11] * 32)
    assert state.counters == {"rx_bytes": 100, "tx_bytes": 200, "peers_with_handshake": 1}
    assert state.handshakes == {K2: 1700000000}  # per peer; a 0 is no handshake
    assert state.peers[K2].allowed_ips == {ipaddress.ip_network("198.19.3.0/24"),
                                           ipaddress.ip_network("fd00:3::/64")}


def test_a_fresh_device_reads_as_keyless() -> None:
    err, state = parse_get_answer(f"private_key={'00' * 32}\nlisten_port=0\nerrno=0\n\n")
    assert err == 0
    assert state == DeviceState(None, 0, {})


@pytest.mark.parametrize(
    "text",
    [
        "listen_port=1\n",  # no terminator
        "listen_port=1\n\n",  # no errno
        "garbage\nerrno=0\n\n",
        "errno=x\n\n",
        "public_key=zz\nerrno=0\n\n",
        f"public_key={'ab' * 31}\nerrno=0\n\n",
        f"public_key={'ab' * 32}\nallowed_ip=300.1.1.1/8\nerrno=0\n\n",
        f"public_key={'ab' * 32}\nendpoint=nowhere\nerrno=0\n\n",
    ],
)
def test_malformed_answers_raise_protocol_errors(text: str) -> None:
    with pytest.raises(UapiProtocolError):
        parse_get_answer(text)


def test_set_answer_errno() -> None:
    assert parse_set_answer("errno=0\n\n") == 0
    assert parse_set_answer("errno=-98\n\n") == -98
    assert parse_get_answer("errno=-22\n\n") == (-22, None)


def test_endpoint_forms() -> None:
    assert parse_endpoint("") is None
    assert parse_endpoint("198.18.0.2:1") == (ipaddress.ip_address("198.18.0.2"), 1)
    with pytest.raises(ValueError, match="no port"):
        parse_endpoint("198.18.0.2")


# --- the kernel edge's message form (pyroute2's codec, both ways) ---------------------------


def test_kernel_peer_round_trips_through_pyroute2_messages() -> None:
    want = peer(K1, "198.19.2.0/24", "198.18.0.2", keepalive=25, psk=bytes(range(32)))
    spec = _peer_spec(want)
    msg = wgmsg()
    msg["cmd"] = 0
    msg["version"] = 1
    msg["attrs"].append(["WGDEVICE_A_PEERS", [{"attrs": [
        ["WGPEER_A_PUBLIC_KEY", spec["public_key"]],
        ["WGPEER_A_PRESHARED_KEY", spec["preshared_key"]],
        ["WGPEER_A_ENDPOINT", {"addr": spec["endpoint_addr"], "port": spec["endpoint_port"]}],
        ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", spec["persistent_keepalive"]],
        ["WGPEER_A_ALLOWEDIPS", [{"attrs": [
            ["WGALLOWEDIP_A_FAMILY", 2],
            ["WGALLOWEDIP_A_IPADDR", ipaddress.ip_address("198.19.2.0").packed],
            ["WGALLOWEDIP_A_CIDR_MASK", 24],
        ]}]],
    ]}]])
    msg.encode()
    decoded = wgmsg(msg.data)
    decoded.decode()
    (got,) = decoded.get_attr("WGDEVICE_A_PEERS")
    assert _parse_peer(got) == want


def test_psk_option_must_be_a_key() -> None:
    with pytest.raises(ConfigError, match="PSK"):
        parse_config('{"Network": "198.19.0.0/16", "Backend": {"Type": "wireguard", '
                     '"PSK": "short"}}')


def test_a_pid_file_naming_another_process_is_never_trusted(tmp_path: Path) -> None:
    wg = WireguardGo("weft.wg0", tmp_path)
    wg.pid_file.write_text(f"{os.getpid()}\n")  # us, not wireguard-go
    assert wg.pid() is None
    wg.stop()  # must not signal the process the stale file names
    assert not wg.pid_file.exists()
    wg.pid_file.write_text("not a pid\n")
    assert wg.pid() is None


def test_uapi_without_wireguard_go_is_a_clear_error(tmp_path: Path) -> None:
    device = UapiDevice("weft.wg0", tmp_path)
    with pytest.raises(KernelError, match=r"wireguard-go for weft\.wg0 is not running"):
        device.read()
    assert not device.alive()
