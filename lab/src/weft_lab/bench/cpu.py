"""CPU-seconds the two simulated hosts spend moving data, from the kernel's accounting.

What is counted, over the tcp_bw test (docs/benchmarks.md):
- every process in the testbed's namespaces (hosts and containers): the agents, their
  threads (the udp forwarder), wireguard-go, the qperf server and what it forked:
  utime + stime + the children's times from /proc/PID/stat;
- the qperf client, through this process's reaped-children usage (getrusage);
- the ksoftirqd threads: softirq work (packet receive, VXLAN decap, bridging) the kernel
  deferred to them. It is machine-wide, so other load on the machine leaks into it.

This kernel accounts CPU time by tick (no CONFIG_IRQ_TIME_ACCOUNTING), so softirq that
runs while one of the processes above is on the CPU — most of the veth/bridge/VXLAN path,
which runs on the sending CPU — is charged to that process's stime and is counted there.
Not counted: softirq that happens to interrupt an unrelated task or the idle loop. The
figure is therefore an under-count of the data-plane cost, the same rule for every backend
and for native: slight when the CPUs are busy (unshaped), large when they are mostly idle
(under `--rate`, tbf releases packets from a timer and much receive work runs in the idle
loop).
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

from weft_lab.bench.stats import ticks_delta

CLK_TCK = os.sysconf("SC_CLK_TCK")


def netns_inode(name: str) -> int:
    return os.stat(f"/var/run/netns/{name}").st_ino


def _stat_ticks(pid: str, children: bool) -> int:
    text = Path(f"/proc/{pid}/stat").read_text()
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = text[text.rindex(")") + 2:].split()
    # fields[0] is field 3 (state): utime, stime, cutime, cstime are fields 14-17.
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return utime + stime + (cutime + cstime if children else 0)


def namespace_ticks(inodes: frozenset[int]) -> dict[int, int]:
    """pid -> cumulative CPU ticks (own + reaped children) of processes in these netns."""
    ticks: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry.name}/ns/net").st_ino not in inodes:
                continue
            ticks[int(entry.name)] = _stat_ticks(entry.name, children=True)
        except (OSError, ValueError, IndexError):
            continue  # exited while we looked
    return ticks


def ksoftirqd_ticks() -> dict[int, int]:
    ticks: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if not Path(f"/proc/{entry.name}/comm").read_text().startswith("ksoftirqd/"):
                continue
            ticks[int(entry.name)] = _stat_ticks(entry.name, children=False)
        except (OSError, ValueError, IndexError):
            continue
    return ticks


@dataclass(frozen=True)
class CpuSnapshot:
    processes: dict[int, int]
    ksoftirqd: dict[int, int]
    children_s: float  # this process's reaped children (the qperf client)


class CpuMeter:
    """Snapshots of the hosts' CPU use; `seconds(before, after)` is the CPU in between."""

    def __init__(self, netns: list[str]) -> None:
        self.inodes = frozenset(netns_inode(n) for n in netns)

    def snapshot(self) -> CpuSnapshot:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return CpuSnapshot(namespace_ticks(self.inodes), ksoftirqd_ticks(),
                           usage.ru_utime + usage.ru_stime)

    @staticmethod
    def seconds(before: CpuSnapshot, after: CpuSnapshot) -> float:
        ticks = (ticks_delta(before.processes, after.processes)
                 + ticks_delta(before.ksoftirqd, after.ksoftirqd))
        return ticks / CLK_TCK + (after.children_s - before.children_s)


def host_cpus() -> list[int]:
    """The CPUs this process may use, one per simulated host in turn."""
    return sorted(os.sched_getaffinity(0))

