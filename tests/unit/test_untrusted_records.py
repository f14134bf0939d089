"""Every way a store record can fail to parse is that record's error: nothing a record
holds (its bytes, its JSON's shape, its row's column types) escapes the store's parsing
or the validator as anything but a per-record error. A table of the records that used to
escape (nested ~1,000 deep raised RecursionError and ended every agent's watch), then
properties over arbitrary bytes, arbitrary JSON and arbitrary SQLite column values."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weft.backends.registry import backend_data_problem, parse_config
from weft.core import untrusted_json
from weft.core.config import redact_config
from weft.core.errors import ConfigError
from weft.core.lease import Lease
from weft.core.untrusted_json import MAX_DEPTH, UntrustedJson
from weft.core.validate import TrustContext, lease_problem, validate_view
from weft.store.base import RejectedRecords
from weft.store.etcd.store import _expiration, _held_by
from weft.store.sqlite import SqliteLeaseStore, _to_event

KEY = "subnets/198.19.7.0-24"
CONFIG = parse_config('{"Network": "198.19.0.0/16", "SubnetLen": 24}')
CTX = TrustContext(CONFIG, ipaddress.ip_address("198.18.0.1"),
                   ipaddress.ip_network("198.19.1.0/24"),
                   (ipaddress.ip_network("198.18.0.0/24"),), backend_data_problem)


def record(data: Any, ip: Any = "198.18.0.7", backend: Any = "vxlan") -> str:
    return json.dumps({"PublicIP": ip, "BackendType": backend, "BackendData": data})


def nested(depth: int, open_: str = "[", close: str = "]") -> str:
    return open_ * depth + close * depth


def nested_objects(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


BAD_RECORDS: dict[str, tuple[object, object, str]] = {
    # name: (value, expiration, what the error says)
    "array nested 990 deep": (record(None).replace("null", nested(990)), 0.0, "nested 991"),
    "array nested 5,000 deep": (record(None).replace("null", nested(5000)), 0.0, "nested"),
    "object nested 990 deep": (record(None).replace("null", nested_objects(990)), 0.0,
                               "nested"),
    "just under the decoder's limit": (record(None).replace("null", nested(MAX_DEPTH + 1)),
                                       0.0, "nested"),
    "a bare nested array": (nested(5000).encode(), 0.0, "nested"),
    "a number of 5,000 digits": (record({"VNI": 1}).replace('"VNI": 1', '"VNI": ' + "9" * 5000),
                                 0.0, "ValueError"),
    "a float out of range": (record({"VNI": 1}).replace('"VNI": 1', '"VNI": 1e999'), 0.0,
                             "out of range"),
    "NaN": (record({"VNI": 1}).replace('"VNI": 1', '"VNI": NaN'), 0.0, "NaN"),
    "-Infinity": (record({"VNI": 1}).replace('"VNI": 1', '"VNI": -Infinity'), 0.0,
                  "Infinity"),
    "duplicate PublicIP": ('{"PublicIP": "198.18.0.7", "PublicIP": "198.18.0.8", '
                           '"BackendType": "vxlan"}', 0.0, "appears twice"),
    "duplicate key in BackendData": (record(None).replace("null", '{"VNI": 1, "VNI": 2}'),
                                     0.0, "appears twice"),
    "PublicIP a number": (record({}, ip=3232235777), 0.0, "not a string"),
    "PublicIP true": (record({}, ip=True), 0.0, "not a string"),
    "value an integer (a SQLite column)": (7, 0.0, "holds a int"),
    "value a float": (7.5, 0.0, "holds a float"),
    "expiry text": (record({}), "soon", "expiry"),
    "expiry infinite": (record({}), math.inf, "expiry"),
    "expiry NaN": (record({}), math.nan, "expiry"),
    "not UTF-8": (b"\xff\xfe\xfd" + record({}).encode(), 0.0, "not JSON"),
    "a UTF-8 BOM in text": ("\ufeff" + record({}), 0.0, "BOM"),
    "lone surrogate bytes": (b'{"PublicIP": "\xed\xa0\x80"}', 0.0, "IPv4 or IPv6"),
}


@pytest.mark.parametrize("name", list(BAD_RECORDS))
def test_a_record_that_does_not_parse_is_its_own_error(name: str) -> None:
    value, expiration, says = BAD_RECORDS[name]
    rejected = RejectedRecords()
    assert rejected.parse(KEY, value, expiration) is None
    assert says in rejected.by_key[KEY], rejected.by_key[KEY]
    # The next valid record under the key clears it.
    assert rejected.parse(KEY, record({"VNI": 1, "VtepMAC": "02:00:00:00:00:07"})) is not None
    assert not rejected.by_key


def test_the_depth_bound_counts_structure_not_text() -> None:
    deep_text = json.dumps({"PublicIP": "198.18.0.7", "BackendType": "vxlan",
                            "BackendData": {"Note": nested(5000)}})
    lease = RejectedRecords().parse(KEY, deep_text)
    assert lease is not None
    assert lease.backend_data["Note"] == nested(5000)
    assert untrusted_json.loads(nested(MAX_DEPTH)) == json.loads(nested(MAX_DEPTH))
    with pytest.raises(UntrustedJson, match="nested"):
        untrusted_json.loads(nested(MAX_DEPTH + 1))
    # As json.loads does: bytes in UTF-16 are read too.
    assert untrusted_json.loads(record({}).encode("utf-16")) == json.loads(record({}))


def test_a_bad_key_type_in_either_column_is_its_own_error() -> None:
    rejected = RejectedRecords()
    assert rejected.parse(12, record({})) is None
    assert rejected.parse(b"subnets/\xff", record({})) is None
    assert set(rejected.by_key) == {"12", "subnets/\ufffd"}
    long_key = "subnets/" + "1" * 100_000
    assert rejected.parse(long_key, record({})) is None
    assert all(len(key) < 300 and len(reason) < 600 for key, reason in rejected.by_key.items())
    assert len(rejected.by_key) == 3
    rejected.deleted(long_key.encode())  # as the watch hands it over
    assert len(rejected.by_key) == 2


@pytest.mark.parametrize("text", [nested(5000), '{"Network": ' + nested(990) + "}",
                                  '{"Network": "198.19.0.0/16", "Network": "10.0.0.0/8"}',
                                  '{"Network": "198.19.0.0/16", "SubnetLen": 1e999}'])
def test_a_config_that_does_not_parse_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_config(text)
    assert isinstance(redact_config(text), str)  # `weft config show` prints, never raises


def test_the_etcd_helpers_read_any_value_as_no_answer() -> None:
    deep = record(None).replace("null", nested(5000)).encode()
    assert _expiration(deep) == 0.0
    holder = Lease(ipaddress.ip_network("198.19.7.0/24"), ipaddress.ip_address("198.18.0.7"),
                   "vxlan")
    assert not _held_by("subnets/198.19.7.0-24", deep, holder)
    assert _expiration(b'{"Expiration": 1e999}') == 0.0


# --- properties -------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)
# Values shaped like a lease in places, anything elsewhere: the checks past the decoder
# are reached as well as the decoder's own.
FIELD = JSON | st.sampled_from(["198.18.0.7", "2001:db8::7", "vxlan", "udp", "wireguard",
                                "host-gw", "auto", "02:00:00:00:00:07", 8285, 1])
RECORDS = JSON | st.fixed_dictionaries(
    {}, optional={"PublicIP": FIELD, "BackendType": FIELD,
                  "BackendData": FIELD | st.dictionaries(
                      st.sampled_from(["VNI", "VtepMAC", "Port", "PublicKey", "Planes",
                                       "Address", "Endpoint"]), FIELD, max_size=4),
                  "Expiration": FIELD})
KEYS = st.sampled_from([KEY, "subnets/198.19.2.0-24", "subnets/2001:db8::-64", "config"]) \
    | st.text(max_size=40)


def survives_the_validator(lease: Lease) -> None:
    problem = lease_problem(lease, CTX)
    assert problem is None or isinstance(problem, str)
    view = validate_view([lease], CTX)
    assert set(view.peers) | {ipaddress.ip_network(s) for s in view.errors} <= {lease.subnet}


@settings(max_examples=400, deadline=None)
@given(key=KEYS, value=st.binary(max_size=300), expiration=st.floats())
def test_arbitrary_bytes_are_a_lease_or_that_records_error(
        key: str, value: bytes, expiration: float) -> None:
    rejected = RejectedRecords()
    lease = rejected.parse(key, value, expiration)
    if lease is None:
        assert set(rejected.by_key) == {key}
    else:
        survives_the_validator(lease)


@settings(max_examples=400, deadline=None)
@given(key=KEYS, data=RECORDS, indent=st.sampled_from([None, 1]))
def test_arbitrary_json_is_a_lease_or_that_records_error(
        key: str, data: Any, indent: int | None) -> None:
    text = json.dumps(data, indent=indent)
    for value in (text, text.encode()):
        rejected = RejectedRecords()
        lease = rejected.parse(key, value, 0.0)
        if lease is None:
            assert set(rejected.by_key) == {key}
        else:
            survives_the_validator(lease)
        assert isinstance(_expiration(value.encode() if isinstance(value, str) else value),
                          float)


SQL_VALUE = (st.none() | st.integers(-2**63, 2**63 - 1) | st.floats() | st.text(max_size=60)
             | st.binary(max_size=60) | RECORDS.map(json.dumps))


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["put", "delete"]) | SQL_VALUE, key=KEYS | SQL_VALUE,
       value=SQL_VALUE, expiration=SQL_VALUE)
def test_an_events_row_of_any_column_types_is_an_event_or_that_records_error(
        kind: Any, key: Any, value: Any, expiration: Any) -> None:
    rejected = RejectedRecords()
    event = _to_event(rejected, 1, kind, key, value, expiration)
    if event is not None and event.lease is not None:
        survives_the_validator(event.lease)
    assert len(rejected.by_key) <= 1


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SqliteLeaseStore]:
    path: Path = tmp_path_factory.mktemp("store") / "store.db"
    s = SqliteLeaseStore(path)
    yield s
    asyncio.run(s.close())


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(KEYS | SQL_VALUE, SQL_VALUE, SQL_VALUE), max_size=5))
def test_the_sqlite_store_lists_any_rows_as_leases_and_errors(
        store: SqliteLeaseStore, rows: list[tuple[Any, Any, Any]]) -> None:
    """Rows written by something else (any type in any column, as SQLite allows) through
    the real store's listing: leases and per-record errors, never an exception."""
    db = sqlite3.connect(store.path, isolation_level=None)
    try:
        db.execute("DELETE FROM leases")
        for key, value, expiration in rows:
            db.execute("INSERT OR REPLACE INTO leases (key, value, public_ip, expiration) "
                       "VALUES (?, ?, NULL, ?)", (key, value,
                                                  0.0 if expiration is None else expiration))
    except sqlite3.Error:
        return  # a row SQLite itself refuses (a key of NULL, say): nothing was written
    finally:
        db.close()
    leases, _ = asyncio.run(store.list_leases())
    for lease in leases:
        survives_the_validator(lease)


def test_the_one_shot_commands_answer_with_any_record_in_the_store(tmp_path: Path) -> None:
    """`weft status --json` and `weft config show` read the store: with a config and
    records nested 5,000 deep in it, they answer (the records are skipped, the config is
    printed as it is), no traceback."""
    url = f"sqlite://{tmp_path / 'store.db'}"

    def weft(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "weft", *args, "--store", url],
                              capture_output=True, text=True, timeout=60, check=False)

    good = Lease(ipaddress.ip_network("198.19.2.0/24"), ipaddress.ip_address("198.18.0.2"),
                 "vxlan", {"VNI": 1, "VtepMAC": "02:00:00:00:00:02"})
    store = SqliteLeaseStore(tmp_path / "store.db")
    asyncio.run(store.put_config('{"Network": ' + nested(5000) + "}"))
    asyncio.run(store.create_lease(good, 3600))
    asyncio.run(store.close())
    db = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
    for i, value in enumerate([record(None).replace("null", nested(990)),
                               record(None).replace("null", nested_objects(5000)), 7]):
        db.execute("INSERT INTO leases (key, value, public_ip, expiration) VALUES "
                   "(?, ?, NULL, 4e9)", (f"subnets/198.19.{10 + i}.0-24", value))
    db.close()
    status = weft("status", "--json", "--state-dir", str(tmp_path / "none"))
    assert status.returncode == 3, status.stderr  # no agent here: the leases all the same
    assert [x["subnet"] for x in json.loads(status.stdout)["leases"]] == ["198.19.2.0/24"]
    shown = weft("config", "show")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith('{"Network": [[[')
    assert "Traceback" not in status.stderr + shown.stderr
