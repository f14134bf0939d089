"""`weft demo`: hosts and containers in namespaces, the lease table, a connectivity matrix."""

from __future__ import annotations

import json
import time

from rich.console import Console
from rich.table import Table
from rich.text import Text

from weft.backends.registry import BACKENDS
from weft.core.errors import UsageError
from weft_lab.testbed import Testbed

FAMILIES = ("ipv4", "ipv6", "dual-stack")
NETWORK6 = "2001:db8:1::/48"  # inside the demo's namespaces only


def demo_config(backend: str, family: str = "ipv4") -> str:
    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if family == "ipv6":
        return json.dumps({"Network": NETWORK6, "Backend": {"Type": backend}})
    if family == "dual-stack":
        return json.dumps({"Network": "198.19.0.0/16", "SubnetLen": 24, "EnableIPv6": True,
                           "IPv6Network": NETWORK6, "Backend": {"Type": backend}})
    return json.dumps({"Network": "198.19.0.0/16", "SubnetLen": 24,
                       "Backend": {"Type": backend}})


def run_demo(backend: str = "vxlan", store: str = "sqlite", hosts: int = 3,
             containers: int = 2, console: Console | None = None,
             runtime: str = "netns", family: str = "ipv4") -> bool:
    """Build, show, check, tear down. True if every container reached every other (by
    each of its families)."""
    console = console or Console(emoji=False)
    if store not in ("sqlite", "etcd"):
        raise UsageError(f"--store {store!r}: choose sqlite or etcd")
    if family not in FAMILIES:
        raise UsageError(f"overlay family {family!r}: choose {', '.join(FAMILIES)}")
    config = demo_config(backend, family)
    # An IPv6 overlay routed via underlay next hops (host-gw, auto's host-gw plane) needs
    # IPv6 on the underlay too.
    underlay = "ipv4" if family == "ipv4" or store == "etcd" else "dual"
    started = time.monotonic()
    with Testbed(hosts=hosts, containers_per_host=containers, config=config,
                 store=store, log_level="info", runtime=runtime, underlay=underlay) as tb:
        console.print(f"[bold]weft demo[/] run {tb.run_id}: {hosts} hosts x {containers} "
                      f"{runtime} containers, backend {backend}, store {store}, "
                      f"overlay {family}", highlight=False)
        tb.start()
        console.print(f"agents converged in {time.monotonic() - started:.1f}s")

        leases = {str(lease.public_ip): lease for lease in tb.leases()}
        table = Table(title="leases")
        for col in ("host", "public IP", "subnet", "backend", "containers"):
            table.add_column(col)
        for h in tb.hosts:
            lease = leases.get(str(h.underlay_ip))
            subnets = ("\n".join(str(s) for s in lease.subnets) if lease else "-")
            # Text: "2001:db8:1:a::" must not become an emoji (rich reads ":a:" as one).
            table.add_row(h.name, Text("\n".join(str(ip) for ip in (h.underlay_ip,
                                                                     h.underlay_ip6)
                                                 if ip is not None)),
                          Text(subnets), lease.backend_type if lease else "-",
                          Text(", ".join(f"{c.name}={c.ip}" + (f" {c.ip6}" if c.ip6 else "")
                                         for c in tb.containers if c.host is h)))
        console.print(table)

        failed: list[tuple[str, str]] = []
        total = 0
        for ipv6 in ((False, True) if family == "dual-stack" else (False,)):
            matrix = tb.connectivity(ipv6=ipv6)
            console.print(_grid(matrix, [c.name for c in tb.containers],
                                "IPv6" if ipv6 or family == "ipv6" else "IPv4"))
            failed += [pair for pair, ok in matrix.items() if not ok]
            total += len(matrix)
        if failed:
            console.print(f"[red]{len(failed)} of {total} pairs failed[/]")
        else:
            console.print(f"[green]all {total} pairs reached each other[/]")
    console.print("testbed removed")
    return not failed


def _grid(matrix: dict[tuple[str, str], bool], names: list[str], family: str) -> Table:
    grid = Table(title=f"connectivity over {family} (ping, row -> column)")
    grid.add_column("from \\ to")
    for name in names:
        grid.add_column(name, justify="center")
    for src in names:
        grid.add_row(src, *("·" if src == dst else
                            ("[green]ok[/]" if matrix[(src, dst)] else "[red]FAIL[/]")
                            for dst in names))
    return grid
