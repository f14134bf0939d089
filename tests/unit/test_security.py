"""Trust boundaries without root: the ingress plan, secrets kept out of output, private
store files, bounded store records."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import stat
from pathlib import Path

import pytest

from helpers import weft
from ingress_plans import ingress_plan_for
from weft.backends.registry import parse_config
from weft.core.constants import MAX_RECORD_BYTES
from weft.core.errors import ConfigError, PermissionProblem
from weft.core.lease import Lease
from weft.host.ingress_rules import ingress_ruleset
from weft.host.untrack import Untrack
from weft.store.base import RejectedRecords

PSK = base64.b64encode(bytes(range(32))).decode()
ME = ipaddress.ip_address("198.18.0.11")


def lease(subnet: str, ip: str, backend: str, **data: object) -> Lease:
    return Lease(ipaddress.ip_network(subnet), ipaddress.ip_address(ip), backend, data)


def rules(backend: dict[str, object], peers: list[Lease], untrack: Untrack | None = None
          ) -> str:
    config = parse_config(json.dumps({"Network": "198.19.0.0/16", "Backend": backend}))
    own = lease("198.19.1.0/24", str(ME), str(backend["Type"]))
    return ingress_ruleset(ingress_plan_for(config, ME, own, [own, *peers], untrack=untrack))


UNTRACK = Untrack(ipaddress.ip_address("198.19.1.0"), ME, 8472)
PEER = lease("198.19.2.0/24", "198.18.0.12", "vxlan")


def test_vxlan_overlay_traffic_is_untracked_only_after_the_source_checks() -> None:
    script = rules({"Type": "vxlan"}, [PEER], UNTRACK)
    lines = script.splitlines()
    own_fib = lines.index("add rule inet weft-ingress prerouting ip saddr 198.19.1.0/24 fib "
                          "saddr . iif oif missing counter name spoofed_source drop")
    # This host's own subnet is done right after its reverse-path check: never to its
    # own address (replies to what it masqueraded stay tracked), never leaving the overlay.
    assert lines[own_fib + 1] == ("add rule inet weft-ingress prerouting ip saddr "
                                  "198.19.1.0/24 ip daddr 198.19.0.0/16 ip daddr != "
                                  "198.19.1.0 notrack accept")
    # The encapsulated packets to this host, from members only; the rest of the overlay
    # after every check.
    assert "encap ip daddr 198.18.0.11 ip saddr @members notrack accept" in script
    assert lines[-1].endswith(
        "ip saddr 198.19.0.0/16 ip daddr 198.19.0.0/16 ip daddr != 198.19.1.0 notrack")
    assert script.index("ip saddr != @subnets") < script.rindex("notrack")
    assert script.rindex("fib saddr . iif") < script.rindex("notrack")


def test_tracked_overlay_gets_no_notrack() -> None:
    tracked = rules({"Type": "vxlan"}, [PEER])
    assert "notrack" not in tracked
    assert "prerouting ip saddr 198.19.1.0/24 accept" in tracked


def test_vxlan_accepts_its_port_only_from_member_ips() -> None:
    script = rules({"Type": "vxlan", "Port": 4789},
                   [lease("198.19.2.0/24", "198.18.0.12", "vxlan")])
    assert "add element inet weft-ingress members { 198.18.0.12 }" in script
    # Only UDP to the port walks its rules, in a chain of their own.
    assert "prerouting udp dport 4789 jump encap" in script
    assert "encap ip saddr @members accept" in script
    assert "encap fib daddr type local counter name non_member drop" in script
    assert "encap ip daddr @members counter name to_peer_port drop" in script
    # Before the early accepts: a packet from this host's own subnet to the port is
    # checked too.
    assert script.index("jump encap") < script.index("ip saddr 198.19.1.0/24 accept")
    assert "198.18.0.11" not in script  # this host is no member of its own port
    assert "subnets { 198.19.1.0/24, 198.19.2.0/24 }" in script


def test_udp_members_are_ip_and_port_and_bad_ports_are_left_out() -> None:
    script = rules({"Type": "udp"}, [lease("198.19.2.0/24", "198.18.0.12", "udp", Port=9000),
                                     lease("198.19.3.0/24", "198.18.0.13", "udp", Port="x")])
    assert "members { 198.18.0.12 . 9000 }" in script
    assert "ip saddr . udp sport @members accept" in script
    assert "198.18.0.13" not in script
    assert "198.19.3.0/24" in script  # still a leased subnet for the source check


def test_host_gw_gets_the_source_guard_and_no_port_rule() -> None:
    script = rules({"Type": "host-gw"}, [lease("198.19.2.0/24", "198.18.0.12", "host-gw")])
    assert "dport" not in script
    assert ("ip saddr 198.19.0.0/16 fib saddr . iif oif missing counter name spoofed_source "
            "drop") in script
    assert "ip saddr 198.19.0.0/16 ip saddr != @subnets counter name spoofed_source" in script


def test_psk_is_never_echoed_by_a_validation_error() -> None:
    bad = "bm90IGEga2V5"  # base64, but not 32 bytes: the error must still not show it
    for backend in ({"Type": "wireguard", "PSK": bad}, {"Type": "wireguard", "PSK": bad,
                                                        "Bogus": 1}, {"Type": "x", "PSK": bad}):
        with pytest.raises(ConfigError) as info:
            parse_config(json.dumps({"Network": "198.19.0.0/16", "Backend": backend}))
        assert bad not in str(info.value)


def test_psk_is_absent_from_every_command_output(tmp_path: Path) -> None:
    store = f"sqlite://{tmp_path / 'store.db'}"
    cfg = json.dumps({"Network": "198.19.0.0/16", "Backend": {"Type": "wireguard", "PSK": PSK}})
    outputs = [weft("config", "set", "-", "--store", store, input=cfg),
               weft("config", "show", "--store", store),
               weft("status", "--json", "--store", store, "--state-dir", str(tmp_path)),
               weft("config", "set", "-", "--store", store, input=cfg.replace('"wireguard"',
                                                                              '"nope"'))]
    for proc in outputs:
        assert PSK not in proc.stdout + proc.stderr
    assert json.loads(outputs[1].stdout)["Backend"]["PSK"] == "<redacted>"
    assert outputs[0].returncode == 0
    assert outputs[3].returncode == 1


def test_plaintext_etcd_credentials_are_refused_unless_allowed(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2\n")
    secret.chmod(0o600)
    proc = weft("config", "show", "--store", "etcd://127.0.0.1:1", "--etcd-username", "u",
                "--etcd-password-file", str(secret))
    assert proc.returncode == 1
    assert "plaintext" in proc.stderr
    assert "--etcd-allow-plaintext-auth" in proc.stderr
    assert "hunter2" not in proc.stderr


def test_a_password_file_others_can_write_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2\n")
    secret.chmod(0o666)
    proc = weft("config", "show", "--store", "etcds://127.0.0.1:1", "--etcd-username", "u",
                "--etcd-password-file", str(secret))
    assert proc.returncode == 1
    assert f"chmod 600 {secret}" in proc.stderr


def test_store_files_are_private_from_creation(tmp_path: Path) -> None:
    from weft.store.sqlite import SqliteLeaseStore

    path = tmp_path / "state" / "store.db"
    old = os.umask(0o022)  # a permissive umask, as a shell would have
    try:
        store = SqliteLeaseStore(path)
    finally:
        os.umask(old)
    import asyncio

    asyncio.run(store.put_config("{}"))
    files = [p for p in path.parent.iterdir() if p.name.startswith("store.db")]
    assert {p.name for p in files} >= {"store.db", "store.db-wal", "store.db-shm"}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    asyncio.run(store.close())


def test_a_store_file_others_can_write_is_refused_with_the_fix(tmp_path: Path) -> None:
    from weft.store.sqlite import SqliteLeaseStore

    path = tmp_path / "store.db"
    path.touch(0o600)
    path.chmod(0o666)
    with pytest.raises(PermissionProblem, match=f"chmod 600 {path}"):
        SqliteLeaseStore(path)
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PermissionProblem, match="symlink"):
        SqliteLeaseStore(path)


def test_an_oversized_store_record_is_dropped_unparsed() -> None:
    value = json.dumps({"PublicIP": "198.18.0.12", "BackendType": "vxlan",
                        "BackendData": {"pad": "x" * MAX_RECORD_BYTES}})
    rejected = RejectedRecords()
    assert rejected.parse("subnets/198.19.2.0-24", value) is None
    assert "bytes" in rejected.by_key["subnets/198.19.2.0-24"]  # reported, by its key
    assert rejected.parse("subnets/198.19.2.0-24", json.dumps(
        {"PublicIP": "198.18.0.12", "BackendType": "vxlan"})) is not None
    assert not rejected.by_key
