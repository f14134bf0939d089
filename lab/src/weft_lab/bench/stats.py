"""The bench's arithmetic and its result model: pure, no I/O, no clock.

Rigour on a noisy machine comes from three rules, all here:
- the schedule interleaves native with each backend (native, A, native, B, ... per round),
  so a burst of load from elsewhere hits both sides of a comparison alike;
- each figure is the median of its runs, with min and max kept beside it;
- percentages compare a backend's median with the native median of the *same* bench run.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from weft.core.errors import UsageError, WeftError

NATIVE = "native"


class BenchError(WeftError):
    """A measurement failed or produced a figure that cannot be right."""


# --- rates (tc's spelling, bits only: tc's "bps" means *bytes* and trips people up) ----

_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit)$")
_RATE_SCALE = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}


def parse_rate(text: str) -> int:
    """`1gbit` -> 1_000_000_000 bits/s; anything else is a UsageError naming the value."""
    m = _RATE.match(text.strip().lower())
    if m is None:
        raise UsageError(f"--rate {text!r}: write a rate like 1gbit, 500mbit or 100000kbit")
    bits = float(m.group(1)) * _RATE_SCALE[m.group(2)]
    if bits < 8_000:  # below 1 kB/s tbf cannot shape a single full-size packet sanely
        raise UsageError(f"--rate {text!r}: too low to measure anything; use at least 8kbit")
    return int(bits)


# tbf needs a bucket at least as big as the largest packet it will see. Host interfaces
# here are veths with TSO/GSO on, so packets reach tbf as 64 KiB super-packets: a
# bucket of two of them lets those through whole instead of tbf segmenting them (which
# costs CPU a real NIC would not). Past ~1 Gbit/s, 1 ms worth of line rate is larger.
TBF_MIN_BURST = 2 * 64 * 1024
# The queue tbf may hold before dropping, in time at the shaped rate: enough for TCP to
# keep the line busy, small enough that the bandwidth test does not build seconds of delay.
TBF_LATENCY_MS = 10


def tbf_burst_bytes(rate_bits: int) -> int:
    return max(TBF_MIN_BURST, rate_bits // 8 // 1000)


def tbf_args(rate_bits: int) -> list[str]:
    """The `tc qdisc add dev DEV root` tail for a tbf at `rate_bits` bits/s."""
    return ["tbf", "rate", f"{rate_bits}bit", "burst", str(tbf_burst_bytes(rate_bits)),
            "latency", f"{TBF_LATENCY_MS}ms"]


# --- the schedule ------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    round: int  # 0-based
    name: str


def schedule(backends: Sequence[str], reps: int) -> list[Slot]:
    """Rounds of native, A, native, B, ...: every backend run sits next to a native run."""
    if reps < 1:
        raise UsageError(f"--reps {reps}: need at least 1")
    if NATIVE in backends:
        raise UsageError("native is always measured; do not list it in --backends")
    slots: list[Slot] = []
    for r in range(reps):
        if not backends:
            slots.append(Slot(r, NATIVE))
        for name in backends:
            slots += [Slot(r, NATIVE), Slot(r, name)]
    return slots


# --- one run and its summaries -----------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One measurement: qperf tcp_bw then tcp_lat, and the CPU the bw test cost."""

    round: int
    bw_MBps: float  # the unit spelled as in the JSON
    lat_us: float
    cpu_s: float  # CPU-seconds used on both hosts during the tcp_bw test
    secs: float  # length of the tcp_bw test

    def __post_init__(self) -> None:
        for name in ("bw_MBps", "lat_us", "cpu_s", "secs"):
            value = getattr(self, name)
            if not value > 0:  # also rejects NaN
                raise BenchError(f"{name} = {value!r} in round {self.round}: a measured "
                                 "figure must be a positive number")

    @property
    def gb_moved(self) -> float:
        return self.bw_MBps * self.secs / 1000.0

    @property
    def cpu_s_per_GB(self) -> float:
        return self.cpu_s / self.gb_moved

    def to_json(self) -> dict[str, Any]:
        return {"round": self.round + 1, "bw_MBps": _r(self.bw_MBps), "lat_us": _r(self.lat_us),
                "cpu_s": _r(self.cpu_s), "cpu_s_per_GB": _r(self.cpu_s_per_GB)}


@dataclass(frozen=True)
class Spread:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise BenchError("no runs to summarise")
        return cls(statistics.median(values), min(values), max(values))

    def to_json(self) -> dict[str, float]:
        return {"median": _r(self.median), "min": _r(self.min), "max": _r(self.max)}


def pct(value: float, reference: float) -> float:
    """`value` as a percentage of `reference` (100 = the same)."""
    if not reference > 0:
        raise BenchError(f"reference {reference!r} is not a positive number")
    return 100.0 * value / reference


@dataclass(frozen=True)
class Result:
    name: str
    bw: Spread
    lat: Spread
    bw_pct: float
    lat_pct: float
    cpu_s_per_GB: float
    runs: tuple[Run, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "bw_MBps": self.bw.to_json(), "lat_us": self.lat.to_json(),
                "bw_pct": _r(self.bw_pct), "lat_pct": _r(self.lat_pct),
                "cpu_s_per_GB": _r(self.cpu_s_per_GB),
                "runs": [run.to_json() for run in self.runs]}


@dataclass(frozen=True)
class Skipped:
    name: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "reason": self.reason}


@dataclass(frozen=True)
class BenchReport:
    rate: str | None
    secs: float
    reps: int
    results: tuple[Result, ...]
    skipped: tuple[Skipped, ...] = field(default=())
    attach: str = "bridge"

    def to_json(self) -> dict[str, Any]:
        return {"rate": self.rate, "secs": self.secs, "reps": self.reps,
                "attach": self.attach,
                "results": [r.to_json() for r in self.results],
                "skipped": [s.to_json() for s in self.skipped]}


def summarise(rate: str | None, secs: float, reps: int, runs: Mapping[str, Sequence[Run]],
              skipped: Sequence[Skipped] = (), attach: str = "bridge") -> BenchReport:
    """Medians, spreads and percentages of this run's native medians; native first."""
    native_runs = runs.get(NATIVE)
    if not native_runs:
        raise BenchError("no native runs: nothing to compare the backends with")
    native_bw = statistics.median(r.bw_MBps for r in native_runs)
    native_lat = statistics.median(r.lat_us for r in native_runs)
    names = [NATIVE, *(n for n in runs if n != NATIVE)]
    results = []
    for name in names:
        these = runs[name]
        if not these:
            continue
        bw = Spread.of([r.bw_MBps for r in these])
        lat = Spread.of([r.lat_us for r in these])
        results.append(Result(
            name=name, bw=bw, lat=lat, bw_pct=pct(bw.median, native_bw),
            lat_pct=pct(lat.median, native_lat),
            cpu_s_per_GB=statistics.median(r.cpu_s_per_GB for r in these), runs=tuple(these)))
    return BenchReport(rate, secs, reps, tuple(results), tuple(skipped), attach)


def ticks_delta(before: Mapping[int, int], after: Mapping[int, int]) -> int:
    """CPU ticks used between two per-process snapshots (pid -> cumulative ticks).

    A pid first seen in `after` started during the window: all its ticks count. A
    counter that went down means the pid was reused by a new process: count it afresh.
    A process that exited and was reaped by one in the set shows up in the parent's
    children-time fields, which the snapshot includes.
    """
    total = 0
    for pid, ticks in after.items():
        prev = before.get(pid, 0)
        total += ticks - prev if ticks >= prev else ticks
    return total


def _r(x: float) -> float:
    return round(x, 4)
