"""The scale bench's outputs: one table, stores side by side, and the JSON."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _mm(d: dict[str, float], scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(d['median'] * scale)} [dim](max {fmt.format(d['max'] * scale)})[/]"


ROWS: list[tuple[str, Any]] = [
    ("join: start → all peers in the kernel (s)", lambda r: _mm(r["join_s"])),
    ("event → kernel, over agents and events (ms)",
     lambda r: _mm(r["event_to_kernel_ms"], fmt="{:.1f}")),
    ("CPU per event per agent (ms)",
     lambda r: _mm(r["cpu_s_per_event_per_agent"], 1000, "{:.1f}")),
    ("renewal round: CPU per agent (s)", lambda r: _mm(r["renewal_round"]["cpu_s_per_agent"])),
    ("renewal round: reconcile passes", lambda r: str(r["renewal_round"]["reconciles"])),
    ("renewal round: writer's wall time (s)",
     lambda r: f"{r['renewal_round']['seconds']:.2f}"),
    ("store requests per renewal",
     lambda r: f"{r['renewal_round']['store_requests_per_renewal']:.2f} "
               f"[dim]({r['renewal_round']['counted']})[/]"),
    ("probes: packets/s per agent (cap)",
     lambda r: _mm(r["probes"]["packets_per_s_per_agent"], fmt="{:.0f}")
     + f" [dim](cap {r['probes']['max_packets_per_second']:.0f}, each peer every "
       f"{r['probes']['interval_s']} s)[/]"),
    ("probes: CPU of an idle agent (% of a core)",
     lambda r: _mm(r["probes"]["cpu_s_per_s_per_agent"], 100, "{:.1f}")),
    ("agent RSS (MB)", lambda r: _mm(r["rss_mb"], fmt="{:.0f}")),
    ("load average during", lambda r: r["load"]),
]


def render_scale_table(report: dict[str, Any], console: Console) -> None:
    stores = report["stores"]
    table = Table(title=f"weft bench scale: {report['agents']} vxlan agents, "
                        f"{report['leases']} fake leases — median (max)")
    table.add_column("")
    for name in stores:
        table.add_column(name, justify="right")
    for label, cell in ROWS:
        table.add_row(label, *(cell(r) for r in stores.values()))
    console.print(table)
    storm = report.get("storm")
    if storm:
        console.print(f"start storm: {storm['agents']} agents at once on etcd: all leased in "
                      f"{storm['all_leased_s']:.1f} s, converged in {storm['converged_s']:.1f} "
                      f"s, {storm['deadline_hits']} request(s) hit their deadline, "
                      f"{storm['store_retries']} retries (load {storm['load_before']} → "
                      f"{storm['load_after']})", highlight=False)
