"""qperf, the seed's tool: a server in one namespace, a client in another.

`qperf -uu` ("unify units") prints bandwidth in bytes/sec and latency in ns, the easiest
for a script; the parser still accepts every unit qperf can print, so a different qperf
build or flag set cannot silently turn GB/sec into MB/sec. qperf's MB and GB are decimal
(10^6, 10^9 bytes), as in the seed's table.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from weft_lab.bench.stats import BenchError

QPERF_PORT = 19765  # qperf's default; each namespace has its own port space

_BW_UNITS = {
    "bytes/sec": 1.0, "KB/sec": 1e3, "MB/sec": 1e6, "GB/sec": 1e9, "TB/sec": 1e12,
    "bits/sec": 1 / 8, "Kb/sec": 1e3 / 8, "Mb/sec": 1e6 / 8, "Gb/sec": 1e9 / 8,
    "Tb/sec": 1e12 / 8,
}
_TIME_UNITS = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "sec": 1e6}
_TEST = re.compile(r"^(\w+):\s*$")
_FIGURE = re.compile(r"^\s+(\w+)\s*=\s*([0-9]+(?:\.[0-9]+)?)\s*(\S+)")


@dataclass(frozen=True)
class QperfFigures:
    bw_MBps: float | None = None  # the unit spelled as in the JSON
    lat_us: float | None = None


def parse_qperf(text: str) -> QperfFigures:
    """The tcp_bw bandwidth (MB/s) and tcp_lat latency (µs) in qperf's output.

    Raises BenchError, quoting the line, for a unit it does not know or a zero figure.
    """
    test = None
    bw = lat = None
    for line in text.splitlines():
        if m := _TEST.match(line):
            test = m.group(1)
            continue
        m = _FIGURE.match(line)
        if m is None or test is None:
            continue
        key, value, unit = m.group(1), float(m.group(2)), m.group(3)
        if test == "tcp_bw" and key == "bw":
            if unit not in _BW_UNITS:
                raise BenchError(f"qperf printed a bandwidth unit I do not know: {line.strip()!r}")
            bw = value * _BW_UNITS[unit] / 1e6
        elif test == "tcp_lat" and key == "latency":
            if unit not in _TIME_UNITS:
                raise BenchError(f"qperf printed a latency unit I do not know: {line.strip()!r}")
            lat = value * _TIME_UNITS[unit]
        else:
            continue
        if not value > 0:
            raise BenchError(f"qperf measured nothing: {line.strip()!r}")
    return QperfFigures(bw, lat)


def _argv(netns: str, cpu: int | None, args: Sequence[str]) -> list[str]:
    # `ip netns exec` and `taskset` both exec: the pid we start becomes qperf itself.
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    return ["ip", "netns", "exec", netns, *pin, "qperf", *args]


def _listening(pid: int, port: int) -> bool:
    """Whether process `pid` (in its own netns) sees a TCP listener on `port`."""
    try:
        if Path(f"/proc/{pid}/comm").read_text().strip() != "qperf":
            return False  # still `ip netns exec`, not yet in the namespace
        for table in ("tcp", "tcp6"):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                local, state = fields[1], fields[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    return True
    except (OSError, IndexError, ValueError):
        return False
    return False


@contextlib.contextmanager
def qperf_server(netns: str, cpu: int | None = None, port: int = QPERF_PORT,
                 timeout: float = 10.0) -> Iterator[None]:
    """A qperf server in `netns`, listening when the block starts, killed when it ends."""
    proc = subprocess.Popen(_argv(netns, cpu, ["--listen_port", str(port)]),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not _listening(proc.pid, port):
            if proc.poll() is not None:
                stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise BenchError(f"qperf server in {netns} exited with {proc.returncode}: "
                                 f"{stderr.strip()}")
            if time.monotonic() > deadline:
                raise BenchError(f"qperf server in {netns} did not listen on {port} "
                                 f"within {timeout}s")
            time.sleep(0.02)
        yield
    finally:
        # Its own session: the kill reaches any child it forked for a connection.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


def run_qperf(netns: str, server_ip: str, tests: Sequence[str], secs: float,
              cpu: int | None = None, port: int = QPERF_PORT) -> QperfFigures:
    """`qperf -t SECS SERVER TESTS` from `netns`; every requested figure or BenchError."""
    argv = _argv(netns, cpu, ["-uu", "--listen_port", str(port), "-t", str(secs),
                              "--timeout", "5", server_ip, *tests])
    # qperf runs each test for SECS plus a handshake; the margin only catches a hang.
    limit = len(tests) * (secs + 10) + 10
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=limit, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"qperf {' '.join(tests)} to {server_ip} from {netns} hung for "
                         f"{limit:.0f}s") from None
    if proc.returncode != 0:
        how = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0
               else f"failed ({proc.returncode})")
        raise BenchError(f"qperf {' '.join(tests)} to {server_ip} from {netns} {how}: "
                         f"{(proc.stderr or proc.stdout).strip()}")
    figures = parse_qperf(proc.stdout)
    missing = [t for t, v in (("tcp_bw", figures.bw_MBps), ("tcp_lat", figures.lat_us))
               if t in tests and v is None]
    if missing:
        raise BenchError(f"qperf printed no {', '.join(missing)} figure: {proc.stdout.strip()!r}")
    return figures
