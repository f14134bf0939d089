"""Reading weft's kernel tables fast: routes (by weft's protocol), permanent neighbours and
FDB entries of one device, dumped by iproute2 with the filter applied in the kernel
(strict dump checking) and read as JSON.

Measured with 5,000 entries of each (a 2-core VM): pyroute2 dumps and decodes each table
in 0.9-1.1 s of pure-Python decoding, even with strict_check and a protocol filter that
matches nothing; `ip -j` takes 0.03-0.05 s per table, 0.02 s of it the JSON parse.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from typing import Any

from weft.core.constants import ROUTE_PROTOCOL
from weft.core.dataplane import FdbEntry, Neighbour, Route
from weft.core.errors import KernelError

_TIMEOUT = 30.0


def _json(argv: list[str]) -> list[dict[str, Any]]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelError(f"`{' '.join(argv)}`: {exc}") from None
    if proc.returncode != 0:
        raise KernelError(f"`{' '.join(argv)}` failed: {proc.stderr.strip()}")
    out = json.loads(proc.stdout or "[]")
    return [entry for entry in out if isinstance(entry, dict)]


def link_indexes() -> dict[str, int]:
    return {str(link["ifname"]): int(link["ifindex"])
            for link in _json(["ip", "-j", "link", "show"])}


def weft_routes(version: int, table: int = 254) -> set[Route]:
    """Routes in the main table (or `table`) that carry weft's protocol number."""
    indexes = link_indexes()
    out: set[Route] = set()
    try:
        dump = _json(["ip", "-j", f"-{version}", "route", "show", "table", str(table),
                      "proto", str(ROUTE_PROTOCOL)])
    except KernelError as exc:
        if table != 254 and "table does not exist" in str(exc):
            return out  # a table the kernel makes with its first route: empty so far
        raise
    for r in dump:
        dst = str(r.get("dst", ""))
        if dst == "default":
            continue
        host_len = 32 if version == 4 else 128
        network = ipaddress.ip_network(dst if "/" in dst else f"{dst}/{host_len}")
        gateway = r.get("gateway")
        mtu = next((m["mtu"] for m in r.get("metrics", []) if isinstance(m, dict)
                    and isinstance(m.get("mtu"), int)), None)
        out.add(Route(network, ipaddress.ip_address(gateway) if gateway else None,
                      indexes.get(str(r.get("dev")), 0), "onlink" in r.get("flags", []),
                      table, mtu))
    return out


def permanent_neighbours(device: str, index: int) -> set[Neighbour]:
    return {
        Neighbour(ipaddress.ip_address(n["dst"]), str(n["lladdr"]), index)
        for n in _json(["ip", "-j", "neigh", "show", "dev", device, "nud", "permanent"])
        if n.get("dst") and n.get("lladdr")
    }


def fdb_entries(device: str, index: int) -> set[FdbEntry]:
    """The device's own (self) entries that send a MAC to a remote VTEP."""
    return {
        FdbEntry(str(e["mac"]), ipaddress.ip_address(e["dst"]), index)
        for e in _json(["bridge", "-j", "fdb", "show", "dev", device])
        if e.get("dst") and e.get("mac") and "self" in e.get("flags", [])
    }
