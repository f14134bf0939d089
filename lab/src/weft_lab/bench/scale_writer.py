"""The scale bench's store writer: a small process that holds the fake leases.

It runs on the testbed's operator machine (the underlay namespace, where etcd listens) and
takes one JSON command a line on stdin, answering one JSON line on stdout:

- `{"op": "create", "first": i, "count": n}`: create fake leases i .. i+n-1;
- `{"op": "put", "index": i, "mac": m}`: create or rewrite fake lease i with VTEP MAC
  suffix m (an event the agents must apply); the answer carries `t0`, CLOCK_MONOTONIC
  just before the write, which the driver shares (one clock for the whole machine);
- `{"op": "renew"}`: renew every fake lease once with unchanged data;
- `{"op": "quit"}`.

The leases are valid records for hosts that don't exist: subnets from the top of the
overlay network down (agents take theirs from the bottom) and public IPs from 198.18.1.0
on, inside the underlay range and off the testbed's one link, so nothing is ever sent to
them. Run as `python -m weft_lab.bench.scale_writer STORE_URL SUBNET_LEN`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import sqlite3
import sys
import time
from typing import Any

from weft.core.lease import Lease
from weft.store import open_store
from weft.store.base import LeaseStore
from weft.store.sqlite import SqliteLeaseStore

OVERLAY = ipaddress.IPv4Network("198.19.0.0/16")
TTL = 3600.0
# Concurrent requests while creating or renewing: enough to keep etcd busy, few enough
# that the writer itself does not hit its request deadline.
PARALLEL = 32


def fake_lease(index: int, subnet_len: int, mac: int = 1) -> Lease:
    size = 2 ** (subnet_len - OVERLAY.prefixlen)
    if not 0 <= index < size - 1 or index >= 250 * 250:
        raise ValueError(f"fake lease {index} does not fit a /{subnet_len} in {OVERLAY}")
    base = int(OVERLAY.network_address) + (size - 1 - index) * 2 ** (32 - subnet_len)
    subnet = ipaddress.IPv4Network((base, subnet_len))
    public_ip = ipaddress.IPv4Address(f"198.18.{1 + index // 250}.{1 + index % 250}")
    vtep = f"02:5c:{index // 256:02x}:{index % 256:02x}:00:{mac:02x}"
    return Lease(subnet, public_ip, "vxlan", {"VtepMAC": vtep})


class Writer:
    def __init__(self, store: LeaseStore, subnet_len: int) -> None:
        self.store = store
        self.subnet_len = subnet_len
        self.leases: dict[int, Lease] = {}
        self.statements = 0
        if isinstance(store, SqliteLeaseStore):
            # SQLite: count the statements this writer runs (BEGIN and COMMIT included).
            db: sqlite3.Connection = store._db
            db.set_trace_callback(self._count)

    def _count(self, _statement: str) -> None:
        self.statements += 1

    async def _each(self, leases: list[Lease], renew: bool) -> None:
        sem = asyncio.Semaphore(PARALLEL)

        async def one(lease: Lease) -> None:
            async with sem:
                if renew:
                    await self.store.renew_lease(lease, TTL)
                elif await self.store.create_lease(lease, TTL) is None:
                    raise RuntimeError(f"fake lease {lease.subnet} is taken")

        async with asyncio.TaskGroup() as tg:
            for lease in leases:
                tg.create_task(one(lease))

    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        before = self.statements
        start = time.monotonic()
        if cmd["op"] == "create":
            new = {i: fake_lease(i, self.subnet_len)
                   for i in range(cmd["first"], cmd["first"] + cmd["count"])}
            await self._each(list(new.values()), renew=False)
            self.leases.update(new)
        elif cmd["op"] == "put":
            index = cmd["index"]
            lease = fake_lease(index, self.subnet_len, cmd["mac"])
            if index in self.leases:
                await self.store.renew_lease(lease, TTL)  # same subnet and IP, new data
            elif await self.store.create_lease(lease, TTL) is None:
                raise RuntimeError(f"fake lease {lease.subnet} is taken")
            self.leases[index] = lease
        elif cmd["op"] == "renew":
            await self._each(list(self.leases.values()), renew=True)
        else:
            raise ValueError(f"unknown command {cmd!r}")
        return {"ok": True, "t0": start, "seconds": time.monotonic() - start,
                "statements": self.statements - before}


async def serve(url: str, subnet_len: int) -> None:
    store = open_store(url)
    writer = Writer(store, subnet_len)
    loop = asyncio.get_running_loop()
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            cmd = json.loads(line)
            if cmd["op"] == "quit":
                break
            try:
                reply = await writer.handle(cmd)
            except Exception as exc:  # reported to the driver, which fails the bench
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
    finally:
        await store.close()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], int(sys.argv[2])))
