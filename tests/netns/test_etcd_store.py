"""What only the etcd store has: its URL, flannel's key layout, TLS and user/password auth.

The behaviour every store shares is in test_store_contract.py; failures of etcd itself are
in test_etcd_faults.py. Everything here runs against real etcd processes on loopback,
with certificates made by the real openssl.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import pytest

import bounded
from etcd_server import (
    ROOT_USER,
    calls_since,
    enable_auth,
    etcd_cluster,
    grpc_calls,
    make_tls,
    requires_etcd,
)
from helpers import missing
from weft.core.errors import StoreError, StoreUnavailable, UsageError
from weft.core.lease import Lease
from weft.store import open_store
from weft.store.etcd import Endpoint, EtcdLeaseStore, parse_etcd_url
from weft_lab.etcd_local import EtcdTls, LocalEtcd
from weft_lab.testbed import RUNS_DIR, list_netns


def run(coro: Awaitable[Any]) -> Any:
    return bounded.run(coro, timeout=60)


def lease(i: int) -> Lease:
    return Lease(ipaddress.ip_network(f"198.19.{i}.0/24"),
                 ipaddress.ip_address(f"198.18.0.{i}"), "vxlan", {"VtepMAC": f"02:00:{i:02x}"})


async def round_trip(store: EtcdLeaseStore) -> list[Lease]:
    """Config, a lease, a list and a watch: the operations an agent makes."""
    try:
        await store.put_config('{"Network": "198.19.0.0/16"}')
        assert await store.get_config() == '{"Network": "198.19.0.0/16"}'
        _, start = await store.list_leases()
        assert await store.create_lease(lease(1), 60) is not None
        watch = store.watch(start)
        try:
            (event,) = await anext(watch)
        finally:
            await watch.aclose()
        assert event.subnet == lease(1).subnet
        leases, _ = await store.list_leases()
        return leases
    finally:
        await store.close()


# --- the URL: pure ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "endpoints", "tls"),
    [
        ("etcd://127.0.0.1:2379", [Endpoint("127.0.0.1", 2379)], False),
        ("etcd://10.0.0.1", [Endpoint("10.0.0.1", 2379)], False),
        ("etcds://a.example:2379,b.example:22379",
         [Endpoint("a.example", 2379), Endpoint("b.example", 22379)], True),
        ("etcd://[::1]:2379, [fd00::2]", [Endpoint("::1", 2379), Endpoint("fd00::2", 2379)],
         False),
    ],
)
def test_store_urls_name_endpoints_and_tls(url: str, endpoints: list[Endpoint],
                                           tls: bool) -> None:
    assert parse_etcd_url(url) == (endpoints, tls)


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("etcd://", "names no etcd endpoint"),
        ("etcd://host:99999", "no valid port"),
        ("etcd://host:http", "no valid port"),
        ("etcd://:2379", "has no host"),
        ("etcd://host:2379/coreos.com/network", "--etcd-prefix"),
        ("etcd://user:pw@host:2379", "--etcd-username"),
        ("http://host:2379", "etcd://host:port"),
        ("etcd://[::1:2379", "[address]:port"),
    ],
)
def test_bad_store_urls_are_refused_with_the_reason(url: str, complaint: str) -> None:
    with pytest.raises(UsageError, match="store URL") as refused:
        parse_etcd_url(url)
    assert complaint in str(refused.value)


def test_bad_store_options_are_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="use etcds://"):
        EtcdLeaseStore.from_url("etcd://127.0.0.1:2379", cafile="/x/ca.pem")
    with pytest.raises(UsageError, match="both --etcd-certfile and --etcd-keyfile"):
        EtcdLeaseStore.from_url("etcds://127.0.0.1:2379", certfile="/x/c.pem")
    with pytest.raises(UsageError, match=r"--etcd-cafile .*missing\.pem: cannot read it"):
        EtcdLeaseStore.from_url("etcds://127.0.0.1:2379", cafile=str(tmp_path / "missing.pem"))
    with pytest.raises(UsageError, match="both --etcd-username and --etcd-password"):
        EtcdLeaseStore([Endpoint("127.0.0.1", 2379)], username="weft")
    with pytest.raises(UsageError, match="not a key path"):
        EtcdLeaseStore.from_url("etcd://127.0.0.1:2379", prefix="/")


# --- flannel's layout -------------------------------------------------------------------


@requires_etcd
@pytest.mark.etcd
def test_keys_follow_flannels_layout_under_the_prefix() -> None:
    with etcd_cluster() as cluster:
        store = open_store(cluster.url, prefix="/coreos.com/network/")
        leases = run(round_trip(store))  # type: ignore[arg-type]
        assert [x.subnet for x in leases] == [lease(1).subnet]
        listed = cluster.etcdctl("get", "--prefix", "/coreos.com/network/", "--keys-only")
        keys = [k for k in listed.stdout.splitlines() if k]
        assert keys == ["/coreos.com/network/config",
                        "/coreos.com/network/subnets/198.19.1.0-24"]
        value = cluster.etcdctl("get", "--print-value-only",
                                "/coreos.com/network/subnets/198.19.1.0-24").stdout
        record = json.loads(value)
        # flannel's three fields, and the expiry watchers read instead of asking etcd
        assert record.pop("Expiration") > time.time()
        assert record == {"PublicIP": "198.18.0.1", "BackendType": "vxlan",
                          "BackendData": {"VtepMAC": "02:00:01"}}
        # The key carries an etcd lease: that is how it expires.
        fields = json.loads(cluster.etcdctl(
            "get", "-w", "json", "/coreos.com/network/subnets/198.19.1.0-24").stdout)
        assert fields["kvs"][0]["lease"] != 0


# --- TLS --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> EtcdTls:
    if shutil.which("openssl") is None:
        missing("needs the openssl command (Debian package openssl) to make certificates")
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_etcd(tls_files: EtcdTls) -> Iterator[LocalEtcd]:
    with etcd_cluster(tls=tls_files) as cluster:
        yield cluster


@requires_etcd
@pytest.mark.etcd
def test_tls_with_a_client_certificate(tls_etcd: LocalEtcd, tls_files: EtcdTls) -> None:
    assert tls_etcd.url.startswith("etcds://")
    store = EtcdLeaseStore.from_url(
        tls_etcd.url, prefix="/weft-tls/network", cafile=str(tls_files.cafile),
        certfile=str(tls_files.client_certfile), keyfile=str(tls_files.client_keyfile),
    )
    leases = run(round_trip(store))
    assert [x.public_ip for x in leases] == [lease(1).public_ip]


@requires_etcd
@pytest.mark.etcd
def test_tls_refuses_a_server_its_ca_did_not_sign(tls_etcd: LocalEtcd, tmp_path: Path) -> None:
    other = make_tls(tmp_path / "other", name="impostor")
    store = EtcdLeaseStore.from_url(
        tls_etcd.url, cafile=str(other.cafile), certfile=str(other.client_certfile),
        keyfile=str(other.client_keyfile),
    )

    async def main() -> None:
        try:
            await store.list_leases()
        finally:
            await store.close()

    with pytest.raises(StoreUnavailable, match="cannot reach etcd to list leases"):
        run(main())


@requires_etcd
@pytest.mark.etcd
def test_plaintext_to_a_tls_etcd_fails_clearly(tls_etcd: LocalEtcd) -> None:
    store = EtcdLeaseStore.from_url(tls_etcd.url.replace("etcds://", "etcd://"))

    async def main() -> None:
        try:
            await store.get_config()
        finally:
            await store.close()

    with pytest.raises(StoreError, match="etcd"):
        run(main())


# --- user/password auth -----------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_etcd() -> Iterator[LocalEtcd]:
    # Simple tokens live 2 s here, so a test sees weft authenticate again.
    with etcd_cluster(extra_args=["--auth-token-ttl=2"]) as cluster:
        enable_auth(cluster, "/weft-auth/")
        cluster.etcdctl(ROOT_USER, "endpoint", "health")
        yield cluster


def _auth_store(cluster: LocalEtcd, prefix: str = "/weft-auth/network",
                **credentials: str) -> EtcdLeaseStore:
    return EtcdLeaseStore.from_url(cluster.url, prefix=prefix, **credentials)


@requires_etcd
@pytest.mark.etcd
def test_user_and_password_and_a_token_that_expires(auth_etcd: LocalEtcd) -> None:
    store = _auth_store(auth_etcd, username="weft", password="secret")

    async def main() -> None:
        try:
            await store.put_config('{"Network": "198.19.0.0/16"}')
            # etcd forgets every simple token when auth is switched off and on again: the
            # token is then refused exactly as an expired one is ("invalid auth token"),
            # without waiting for the TTL (which each use of the token restarts).
            await asyncio.to_thread(auth_etcd.etcdctl, ROOT_USER, "auth", "disable")
            await asyncio.to_thread(auth_etcd.etcdctl, "auth", "enable")
            before = grpc_calls(auth_etcd)
            assert await store.get_config() == '{"Network": "198.19.0.0/16"}'
            calls = calls_since(before, grpc_calls(auth_etcd))
            # Refused once with the old token; weft authenticated again, and read.
            assert calls.get(("Authenticate", "OK")) == 1, calls
            assert calls.get(("Range", "Unauthenticated")) == 1, calls
        finally:
            await store.close()

    run(main())
    leases = run(round_trip(_auth_store(auth_etcd, username="weft", password="secret")))
    assert len(leases) == 1


@requires_etcd
@pytest.mark.etcd
@pytest.mark.parametrize(
    ("credentials", "prefix", "reason"),
    [
        ({"username": "weft", "password": "wrong"}, "/weft-auth/network", "authentication"),
        ({}, "/weft-auth/network", "user name"),
        ({"username": "weft", "password": "secret"}, "/elsewhere/network", "permission denied"),
    ],
)
def test_auth_refusals_are_store_errors_that_say_why(
    auth_etcd: LocalEtcd, credentials: dict[str, str], prefix: str, reason: str
) -> None:
    store = _auth_store(auth_etcd, prefix, **credentials)

    async def main() -> None:
        try:
            await store.get_config()
        finally:
            await store.close()

    before = grpc_calls(auth_etcd)
    with pytest.raises(StoreError) as refused:
        run(main())
    assert not isinstance(refused.value, StoreUnavailable)  # not retried: it won't heal
    assert reason in str(refused.value)
    # Not retried: etcd saw one refused call, whatever it was.
    refusals = {k: n for k, n in calls_since(before, grpc_calls(auth_etcd)).items()
                if k[1] != "OK"}
    assert sum(refusals.values()) == 1, refusals


# --- weft demo on etcd ------------------------------------------------------------------


@requires_etcd
@pytest.mark.etcd
@pytest.mark.netns
def test_demo_on_etcd_starts_and_stops_its_own_etcd() -> None:
    proc = subprocess.run([sys.executable, "-m", "weft", "demo", "--store", "etcd"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "store etcd" in proc.stdout
    assert "all 30 pairs reached each other" in proc.stdout
    run_id = re.search(r"weft demo run (\w+):", proc.stdout)
    assert run_id is not None, proc.stdout
    run_dir = RUNS_DIR / run_id[1]
    assert not run_dir.exists()
    # No etcd of that run is left: its data directory was inside the run's directory.
    left = subprocess.run(["pgrep", "-f", f"--data-dir={run_dir}"], capture_output=True,
                          text=True, check=False)
    assert left.stdout == "", left.stdout
    assert not [n for n in list_netns() if n.startswith(f"weft-{run_id[1]}-")]
