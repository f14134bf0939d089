"""The bench's outputs: a table in the seed's columns, the JSON, a bar chart."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from weft.core.errors import UsageError
from weft_lab.bench.stats import NATIVE, BenchReport, Spread


def _num(x: float) -> str:
    """Three significant figures or so, as the seed's table: 116, 91.8, 6.91."""
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _spread(s: Spread) -> str:
    return f"{_num(s.median)} [dim]({_num(s.min)}–{_num(s.max)})[/]"


def render_table(report: BenchReport, console: Console) -> None:
    rate = f"underlay shaped to {report.rate}" if report.rate else "unshaped underlay"
    table = Table(title=f"weft bench: qperf tcp_bw / tcp_lat, {report.secs:g} s × "
                        f"{report.reps} reps, {rate}, containers attached by "
                        f"{report.attach} — median (min–max)")
    table.add_column("Name")
    table.add_column("TCP BW (MB/s)", justify="right")
    table.add_column("TCP Lat (µs)", justify="right")
    table.add_column("BW %", justify="right")
    table.add_column("Lat %", justify="right")
    table.add_column("CPU s/GB", justify="right")
    for r in report.results:
        table.add_row(r.name, _spread(r.bw), _spread(r.lat), f"{r.bw_pct:.1f}",
                      f"{r.lat_pct:.1f}", f"{r.cpu_s_per_GB:.2f}")
    console.print(table)
    for s in report.skipped:
        console.print(f"[yellow]skipped {s.name}:[/] {s.reason}", highlight=False)


def write_json(report: BenchReport, dest: str) -> None:
    """The report as JSON to a file, or to stdout for `-`."""
    write_json_data(report.to_json(), dest)


def write_json_data(data: Any, dest: str) -> None:
    """Any bench's JSON to a file, or to stdout for `-`; a clear error if it cannot."""
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    if dest == "-":
        sys.stdout.write(text)
        return
    try:
        Path(dest).write_text(text)
    except OSError as exc:
        raise UsageError(f"--json {dest}: cannot write: {exc.strerror}") from None


def write_chart(report: BenchReport, dest: str) -> None:
    """Grouped bars of BW % and Lat % per backend, with native's 100 % marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    native = next(r for r in report.results if r.name == NATIVE)
    results = [r for r in report.results if r.name != NATIVE]
    names = [r.name for r in results]

    def whiskers(pcts: list[float], spreads: list[Spread], ref: float) -> list[list[float]]:
        """min–max of the runs, as % of the native median, around each bar."""
        return [[p - 100 * s.min / ref for p, s in zip(pcts, spreads, strict=True)],
                [100 * s.max / ref - p for p, s in zip(pcts, spreads, strict=True)]]

    xs = range(len(names))
    width = 0.38
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(names) + 2), 4.2))
    try:
        bw_pcts = [r.bw_pct for r in results]
        lat_pcts = [r.lat_pct for r in results]
        bw = ax.bar([x - width / 2 for x in xs], bw_pcts, width,
                    yerr=whiskers(bw_pcts, [r.bw for r in results], native.bw.median),
                    capsize=3, label="TCP BW % of native (higher is better)", color="#3b7dd8")
        lat = ax.bar([x + width / 2 for x in xs], lat_pcts, width,
                     yerr=whiskers(lat_pcts, [r.lat for r in results], native.lat.median),
                     capsize=3, label="TCP Lat % of native (lower is better)", color="#e08a2c")
        ax.bar_label(bw, fmt="%.0f", fontsize=8)
        ax.bar_label(lat, fmt="%.0f", fontsize=8)
        ax.axhline(100, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(list(xs), names)
        ax.set_ylabel("% of native median; whiskers min–max")
        rate = report.rate or "unshaped"
        ax.set_title(f"weft bench ({rate}, {report.secs:g} s × {report.reps}, "
                     f"containers attached by {report.attach})")
        ax.legend(fontsize=8, loc="upper left")
        top = max([100.0] + [100 * r.lat.max / native.lat.median for r in results]
                  + [100 * r.bw.max / native.bw.median for r in results])
        ax.set_ylim(0, top * 1.25)
        fig.tight_layout()
        try:
            fig.savefig(dest, dpi=120)
        except OSError as exc:
            raise UsageError(f"--chart {dest}: cannot write: {exc.strerror}") from None
    finally:
        plt.close(fig)
