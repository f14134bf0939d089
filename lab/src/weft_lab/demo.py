"""`weft demo`: hosts and containers in namespaces, the lease table, a connectivity matrix."""

from __future__ import annotations

import json
import time

from rich.console import Console
from rich.table import Table

from weft.backends.registry import BACKENDS
from weft.core.errors import UsageError
from weft_lab.testbed import Testbed


def demo_config(backend: str) -> str:
    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    return json.dumps({"Network": "198.19.0.0/16", "SubnetLen": 24,
                       "Backend": {"Type": backend}})


def run_demo(backend: str = "vxlan", store: str = "sqlite", hosts: int = 3,
             containers: int = 2, console: Console | None = None,
             runtime: str = "netns") -> bool:
    """Build, show, check, tear down. True if every container reached every other."""
    console = console or Console()
    if store not in ("sqlite", "etcd"):
        raise UsageError(f"--store {store!r}: choose sqlite or etcd")
    config = demo_config(backend)
    started = time.monotonic()
    with Testbed(hosts=hosts, containers_per_host=containers, config=config,
                 store=store, log_level="info", runtime=runtime) as tb:
        console.print(f"[bold]weft demo[/] run {tb.run_id}: {hosts} hosts x {containers} "
                      f"{runtime} containers, backend {backend}, store {store}",
                      highlight=False)
        tb.start()
        console.print(f"agents converged in {time.monotonic() - started:.1f}s")

        leases = {str(lease.public_ip): lease for lease in tb.leases()}
        table = Table(title="leases")
        for col in ("host", "public IP", "subnet", "backend", "containers"):
            table.add_column(col)
        for h in tb.hosts:
            lease = leases.get(str(h.underlay_ip))
            table.add_row(h.name, str(h.underlay_ip), str(lease.subnet) if lease else "-",
                          lease.backend_type if lease else "-",
                          ", ".join(f"{c.name}={c.ip}" for c in tb.containers if c.host is h))
        console.print(table)

        matrix = tb.connectivity()
        grid = Table(title="connectivity (ping, row -> column)")
        grid.add_column("from \\ to")
        names = [c.name for c in tb.containers]
        for name in names:
            grid.add_column(name, justify="center")
        for src in names:
            grid.add_row(src, *("·" if src == dst else
                                ("[green]ok[/]" if matrix[(src, dst)] else "[red]FAIL[/]")
                                for dst in names))
        console.print(grid)
        failed = [pair for pair, ok in matrix.items() if not ok]
        if failed:
            console.print(f"[red]{len(failed)} of {len(matrix)} pairs failed[/]")
        else:
            console.print(f"[green]all {len(matrix)} pairs reached each other[/]")
    console.print("testbed removed")
    return not failed
