"""What the test modules share: waiting on a condition, and recording a figure a test measured.

A test never sleeps for a fixed time to let something happen, and never asserts how long
something took: it waits for the condition itself (`wait_for`), and a wait that runs out
fails with what it saw last. How long a recovery took is a figure for the docs, recorded
with `record_figure` (pytest's `record_property`), printed in a table at the end of the
run and, when WEFT_FIGURES names a file, written there as JSON (see conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeVar

import pytest

T = TypeVar("T")

FIGURE = "weft_figure"  # the user_properties name conftest.py collects

# CI (.ci/run, scripts/setup.sh) installs every capability the suite uses: there a missing
# one is a failure, so a green CI means the namespace suite ran. Kernel features (the
# WireGuard module) are the host's, not installed: those stay skips everywhere.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(reason: str) -> NoReturn:
    """A capability this test needs is missing: with CI=true a failure, else a skip; the
    reason either way."""
    if IN_CI:
        pytest.fail(f"CI=true, and a capability the CI installs is missing: {reason}",
                    pytrace=False)
    pytest.skip(reason)


@functools.cache
def kernel_wireguard_missing() -> str | None:
    """Why this kernel cannot make a WireGuard device, or None: `ip link add type
    wireguard`, tried once in a namespace of its own. A kernel feature, not something the
    CI installs: a test that needs it skips (`pytest.skip`), in CI too."""
    probe = f"weft-wgprobe-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", probe], check=True)
    try:
        made = subprocess.run(["ip", "-n", probe, "link", "add", "wgprobe", "type", "wireguard"],
                              capture_output=True, text=True, check=False)
        if made.returncode == 0:
            return None
        return (f"this kernel has no WireGuard module (`ip link add type wireguard`: "
                f"{made.stderr.strip()})")
    finally:
        subprocess.run(["ip", "netns", "del", probe], check=False)


def requires(available: bool, reason: str) -> pytest.MarkDecorator:
    """A mark: unless `available`, the test is `missing(reason)` (checked at its set-up,
    by conftest.py)."""
    return pytest.mark.requires(available, reason)


def wait_for(what: str, check: Callable[[], T], timeout: float = 30.0, *,
             interval: float = 0.1, seen: Callable[[], object] | None = None,
             ignore: tuple[type[Exception], ...] = ()) -> T:
    """Poll `check()` until it returns something truthy, and return that. After `timeout`
    seconds fail with `what` and what was seen last: `seen()` if given, else the last value
    `check()` returned (or the `ignore`d exception it raised: a status socket not up yet)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            last: object = check()
        except ignore as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last  # type: ignore[return-value]
        if time.monotonic() > deadline:
            shown = seen() if seen is not None else last
            raise AssertionError(f"waited {timeout:g} s for {what}; last seen: {shown!r}")
        time.sleep(interval)


def wait_alive(tb: Any, what: str, check: Callable[[], T], timeout: float = 30.0, *,
               seen: Callable[[], object] | None = None) -> T:
    """`wait_for` on a testbed: fails at once, with its log, if any agent of `tb` exits
    meanwhile, instead of waiting out the timeout on a condition no one will meet."""
    def alive_and() -> T:
        for host in tb.hosts:
            tb.check_alive(host)
        return check()

    return wait_for(what, alive_and, timeout, seen=seen)


async def await_for(what: str, check: Callable[[], Awaitable[T]], within: float = 30.0, *,
                    interval: float = 0.1, ignore: tuple[type[Exception], ...] = ()) -> T:
    """`wait_for` for a coroutine check, inside an event loop (`within` seconds)."""
    deadline = time.monotonic() + within
    while True:
        try:
            last: object = await check()
        except ignore as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {within:g} s for {what}; last seen: {last!r}")
        await asyncio.sleep(interval)


def record_figure(record_property: Callable[[str, object], None], case: str,
                  seconds: float, **more: Any) -> None:
    """Keep a measured figure (say, how long a recovery took) for the report, not as a
    pass/fail bound: the test asserts the state and the traffic."""
    record_property(FIGURE, {"case": case, "seconds": round(seconds, 3), **more})


_REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)")


class PingProbe:
    """A running `ping -D -n ...` (`argv`, the whole command: in a namespace, through
    nsenter), its replies read as they come, so a test waits for replies instead of
    sleeping while they come."""

    def __init__(self, argv: Sequence[str]) -> None:
        assert "-D" in argv, argv  # timestamps
        assert "-n" in argv, argv  # no name lookups
        self.replies: dict[int, float] = {}  # icmp_seq -> when the reply came
        self.lines: list[str] = []
        self.proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if m := _REPLY.match(line):
                self.replies[int(m[2])] = float(m[1])

    def replies_after(self, when: float) -> int:
        """Replies that came after `when` (time.time())."""
        return sum(t > when for t in list(self.replies.values()))

    def wait_replies_after(self, what: str, when: float, count: int = 1,
                           timeout: float = 60.0) -> None:
        wait_for(f"{count} ping replies {what}", lambda: self.replies_after(when) >= count,
                 timeout, interval=0.02, seen=lambda: self.lines[-5:])

    def wait_done(self, timeout: float = 60.0) -> str:
        """Until ping ends by itself (`-c`); its whole output."""
        self.proc.wait(timeout)
        self._reader.join(timeout)
        return "".join(self.lines)

    def stop(self) -> str:
        """SIGINT (ping prints its summary), then its whole output."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        return "".join(self.lines)

    def outage(self, fault: float) -> tuple[int, float]:
        """(pings lost, seconds from `fault` until the first reply after the last loss)."""
        replies = dict(self.replies)
        last = max(replies)
        lost = [seq for seq in range(min(replies), last) if seq not in replies]
        if not lost:
            return 0, 0.0
        after = min(t for seq, t in replies.items() if seq > max(lost))
        return len(lost), max(0.0, after - fault)


BW_BLUE, LAT_ORANGE = (0x3B, 0x7D, 0xD8), (0xE0, 0x8A, 0x2C)  # weft bench's bar colours


def chart_bars(path: str) -> dict[str, object]:
    """What a `weft bench --chart` PNG shows, read back with matplotlib's image reader:
    its size in pixels, and how many bars of each colour stand on the bottom quarter of
    the image (the legend's patches sit at the top)."""
    import matplotlib.image

    pixels = matplotlib.image.imread(path)  # rows x columns x RGBA, floats 0..1
    height, width = pixels.shape[0], pixels.shape[1]
    band = pixels[int(height * 0.70):int(height * 0.80), :, :3]

    def bars(colour: tuple[int, int, int]) -> int:
        near: Any = abs(band - [c / 255 for c in colour]) < 0.02  # an array (numpy)
        hit = list(near.all(axis=2).any(axis=0))  # per column
        return sum(1 for x in range(width) if hit[x] and (x == 0 or not hit[x - 1]))

    return {"size": (width, height), "bw_bars": bars(BW_BLUE), "lat_bars": bars(LAT_ORANGE)}


Metrics = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(netns: str, addr: str = "127.0.0.1:9464") -> Metrics:
    """An agent's /metrics (its --metrics-addr, inside its host's namespace), parsed with
    prometheus_client's own parser: (sample name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c",
         "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
         f"'http://{addr}/metrics', timeout=10).read().decode())"],
        capture_output=True, text=True, check=True, timeout=30).stdout
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(metrics: Metrics, name: str, **labels: str) -> float | None:
    """One sample's value, or None when the agent does not export it."""
    return metrics.get((name, frozenset(labels.items())))


SEEN_FROM = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 5555))
s.settimeout(20)
print(s.recvfrom(64)[1][0], flush=True)
"""


def source_seen(tb: Any, src: str, dst_netns: str, dst: object) -> str:
    """The source address a UDP datagram from namespace `src` carries when it reaches
    `dst` (listening in `dst_netns`): what masquerading did or did not do on the way."""
    listener = subprocess.Popen(["ip", "netns", "exec", dst_netns, sys.executable, "-c",
                                 SEEN_FROM, str(dst)], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(40):  # resend until the listener is bound and prints
            tb.run(src, [sys.executable, "-c", "import socket,sys; socket.socket(socket."
                         "AF_INET, socket.SOCK_DGRAM).sendto(b'x', (sys.argv[1], 5555))",
                         str(dst)])
            try:
                out, _ = listener.communicate(timeout=0.25)
                return out.strip()
            except subprocess.TimeoutExpired:
                continue
        raise AssertionError(f"nothing from {src} reached {dst}")
    finally:
        listener.kill()
        listener.wait()


# --- the CLI, configs and raw store rows ---------------------------------------------------


# br_netfilter is one kernel module for every namespace: loaded (or built in), each new
# namespace has its sysctls, and the agent adds its accept for weft0 there too.
BR_NETFILTER = os.path.exists("/proc/sys/net/bridge/bridge-nf-call-iptables")


def weft_forward_accepts(tunnel_rules: int = 2) -> int:
    """How many FORWARD accepts an agent adds under a DROP policy: its tunnel device's two
    (by default), and the one for weft0's bridged packets where br_netfilter is loaded
    (weft.host.forward_accept)."""
    return tunnel_rules + (1 if BR_NETFILTER else 0)


def weft(*args: str, input: str | None = None, prefix: Sequence[str] = (),
         timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`weft ARGS` as a user runs it (after `prefix`, e.g. setpriv), output captured."""
    return subprocess.run([*prefix, sys.executable, "-m", "weft", *args], input=input,
                          capture_output=True, text=True, timeout=timeout, check=False)


def network_config(backend: str, **options: object) -> str:
    """A network config on the tests' overlay range (198.19.0.0/16), as JSON."""
    return json.dumps({"Network": "198.19.0.0/16", "Backend": {"Type": backend, **options}})


def sqlite_put(path: str | os.PathLike[str], key: str, value: str | bytes | int,
               expiration: float | str, public_ip: str | None = None) -> None:
    """A row written into weft's SQLite store as another writer of the file would: the
    row and its watch event, in one transaction; a value that is not UTF-8 goes in as TEXT
    all the same, and an integer value or a text expiry as they are (SQLite keeps any type
    in any column: rows no weft writes)."""
    cell = "?" if isinstance(value, int) else "CAST(? AS TEXT)"
    _sqlite_tx(path,
               ("INSERT OR REPLACE INTO leases (key, value, public_ip, expiration) "
                f"VALUES (?, {cell}, ?, ?)", (key, value, public_ip, expiration)),
               ("INSERT INTO events (kind, key, value, expiration) "
                f"VALUES ('put', ?, {cell}, ?)", (key, value, expiration)))


def sqlite_delete(path: str | os.PathLike[str], key: str) -> None:
    """A row deleted as another writer would: the row, and its watch event."""
    _sqlite_tx(path, ("DELETE FROM leases WHERE key = ?", (key,)),
               ("INSERT INTO events (kind, key, value, expiration) "
                "VALUES ('delete', ?, NULL, NULL)", (key,)))


def _sqlite_tx(path: str | os.PathLike[str], *statements: tuple[str, tuple[Any, ...]]) -> None:
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        for sql, args in statements:
            db.execute(sql, args)
        db.execute("COMMIT")
    finally:
        db.close()


def namespaces_left_by(before: set[str], pid: int) -> list[str]:
    """Namespaces created since `before` whose run belonged to process `pid` (a bench, a
    demo): what it failed to remove."""
    from weft_lab.testbed import RUNS_DIR, list_netns

    left = []
    for name in set(list_netns()) - before:
        if not name.startswith("weft-"):
            continue  # a runtime's own (podman's netns-<uuid>) of another run meanwhile
        run_id = name.removeprefix("weft-").split("-", 1)[0]
        try:
            owner = int((RUNS_DIR / run_id / "owner.pid").read_text())
        except (OSError, ValueError):
            owner = pid  # no run dir: nobody is using it
        if owner == pid:
            left.append(name)
    return left


# --- recoveries under traffic (the fault tables) -----------------------------------------

# Far below the resync interval the fault tests run with, so a case healed in time was
# healed by an event; far above any recovery measured (see the docs), so the machine's load
# never decides.
DEADLINE = 60.0


def ping_probe(src: Any, dst: Any) -> PingProbe:
    """`ping -i 0.05` from one testbed container to another."""
    return PingProbe(["ip", "netns", "exec", src.netns,
                      "ping", "-D", "-n", "-i", "0.05", "-W", "1", str(dst.ip)])


@dataclasses.dataclass
class Recovery:
    case: str
    seconds: float
    lost: int


Record = Callable[[str, object], None]  # pytest's record_property


def measure(tb: Any, record: Record, case: str,
            fault: Callable[[], object], healed: Callable[[], bool],
            src: Any = None, dst: Any = None) -> Recovery:
    """Run `fault` under a ping from `src` to `dst` (testbed containers on different
    hosts); wait until `healed()` and traffic flows again; record the recovery as a figure
    (`record` is pytest's record_property)."""
    src = src or tb.containers[0]
    dst = dst or tb.containers[-1]
    assert src.host is not dst.host
    probe = ping_probe(src, dst)
    try:
        # A few replies before the fault, so the first loss is counted.
        probe.wait_replies_after(f"{case}: before the fault", 0.0, count=5, timeout=DEADLINE)
        started = time.time()
        fault()

        def state_back() -> bool:
            for host in tb.hosts:
                tb.check_alive(host)
            return healed()

        wait_for(f"{case}: the state back", state_back, DEADLINE, interval=0.05)
        healed_at = time.time()
        # Traffic flows again, and a few replies more, so a loss at the end is counted.
        probe.wait_replies_after(f"{case}: after the state was back", healed_at, count=10,
                                 timeout=DEADLINE)
    finally:
        probe.stop()
    lost, traffic_back = probe.outage(started)
    result = Recovery(case, max(healed_at - started, traffic_back), lost)
    record_figure(record, case, result.seconds, pings_lost=lost)
    return result
# --- the two data planes of host-gw and vxlan -------------------------------------------

# Each data plane's agent arguments, by the name a test id carries: the tc BPF fast path
# (the default, where clang or a packaged object, bpftool and tc are there) and the
# nftables path alone. Tests of faults, poisoned stores and trust run on both.
DATA_PLANES: dict[str, list[str]] = {"fastpath": [], "nftables": ["--no-fastpath"]}
FASTPATH_TOOLS = all(shutil.which(t) for t in ("clang", "bpftool", "tc"))


def check_data_plane(tb: Any, plane: str) -> None:
    """The agents of testbed `tb` run the plane the test asked for: the fast path active
    on every host where it can be, or off. The fast path: once it has hooked where the
    host's containers enter it too (a container's device appears after the agent's start,
    and the pass its events ask for hooks it), so what a test sends next takes it."""
    for host in tb.hosts:
        status = tb.host_status(host)["fastpath"]
        if plane == "nftables":
            assert not status["active"], status
            assert status["reason"] == "off (--no-fastpath)", status
        elif FASTPATH_TOOLS:
            assert status["active"], status
            if any(c.host is host for c in tb.containers):
                def hooked(h: Any = host) -> bool:
                    return len(tb.host_status(h)["fastpath"]["attached"]) >= 2

                def shown(h: Any = host) -> object:
                    return tb.host_status(h)["fastpath"]

                wait_for(f"{host.name}'s fast path on its containers' side", hooked,
                         seen=shown)
