"""`weft bench scale`: real vxlan agents in a network of many fake leases (docs/scale.md).

For each store (SQLite, etcd) one testbed of a few real agents, plus N fake leases written
by `scale_writer` on the operator's machine. Measured:

- join: agent start -> every route, neighbour and FDB entry of every peer in its kernel
  (the agents start one after another; each is the new host in a network that has it all);
- event -> kernel: one lease added or changed in the store -> its entries in each agent's
  kernel, watched with `ip monitor` (no polling), median and max over agents and events;
- CPU per event and per renewal round (every fake lease renewed once, unchanged data), from
  /proc/PID/stat of the agents, less their idle rate; reconcile passes during the round;
- RSS of the agents; store requests per renewal (etcd: every unary gRPC call the server
  started, from etcd's own metrics, so agents' requests count too; SQLite: the writer's
  statements);
- the peer probes (weft.agent.prober): packets/s and CPU of idle agents probing every
  fake peer (which never answers: the costliest case);
- a start storm (etcd): many agents started at once; requests that hit their deadline.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from weft.core.constants import VXLAN_DEVICE_PREFIX
from weft_lab.bench.cpu import CLK_TCK
from weft_lab.bench.scale_writer import fake_lease
from weft_lab.testbed import Host, Testbed, TestbedError, netns_exec

STORES = ("sqlite", "etcd")
# A /29 per host: 8,192 subnets in the overlay range, room for 5,000 fakes and the agents.
SUBNET_LEN = 29
CONFIG = json.dumps({"Network": "198.19.0.0/16", "SubnetLen": SUBNET_LEN,
                     "Backend": {"Type": "vxlan"}})
DEVICE = f"{VXLAN_DEVICE_PREFIX}1"
POLL = 0.02
SETTLE = 1.5  # seconds after the last write in which the agents finish their reaction
PROBE_WINDOW = 10.0  # seconds the idle agents' probes are measured over
_DEADLINE = re.compile(r"deadline.?exceeded", re.IGNORECASE)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ScaleOptions:
    leases: int = 1000
    agents: int = 3
    stores: tuple[str, ...] = STORES
    events: int = 10
    storm: int = 100  # agents started at once on etcd; 0 skips the storm
    timeout: float = 120.0


def parse_stores(text: str | None) -> tuple[str, ...]:
    from weft.core.errors import UsageError

    if text is None:
        return STORES
    stores = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in stores if s not in STORES]
    if bad or not stores:
        raise UsageError(f"--stores {text!r}: use a comma-separated list of {', '.join(STORES)}")
    return stores


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "max": max(values), "min": min(values)}


def _cpu_seconds(pid: int) -> float:
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _agent_pid(host: Host) -> int:
    # `ip netns exec` execs the agent in its own process: the Popen pid is the agent's.
    if host.agent is None:
        raise TestbedError(f"no agent on {host.name}")
    return host.agent.pid


class Writer:
    """The scale_writer process on the operator's machine, one command at a time."""

    def __init__(self, tb: Testbed) -> None:
        argv = netns_exec(tb.underlay, [sys.executable, "-m", "weft_lab.bench.scale_writer",
                                        tb.store_url, str(SUBNET_LEN)])
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)

    def __call__(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise TestbedError(f"the scale writer exited ({self.proc.wait()}) on {cmd}")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise TestbedError(f"the scale writer failed {cmd}: {reply.get('error')}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write('{"op": "quit"}\n')  # no answer to wait for
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def kernel_counts(tb: Testbed, host: Host) -> tuple[int, int, int]:
    """weft's routes, permanent neighbours and FDB entries (with a dst) on `host`."""
    def dump(argv: list[str]) -> list[dict[str, Any]]:
        out = tb.run(host.netns, argv, check=False).stdout
        return json.loads(out) if out.strip() else []

    routes = dump(["ip", "-j", "route", "show", "proto", "87"])
    neigh = dump(["ip", "-j", "neigh", "show", "dev", DEVICE, "nud", "permanent"])
    fdb = [e for e in dump(["bridge", "-j", "fdb", "show", "dev", DEVICE]) if "dst" in e]
    return len(routes), len(neigh), len(fdb)


def wait_programmed(tb: Testbed, host: Host, peers: int, timeout: float) -> float:
    """Monotonic time at which `host` holds `peers` routes, neighbours and FDB entries."""
    deadline = time.monotonic() + timeout
    while True:
        tb.check_alive(host)
        counts = kernel_counts(tb, host)
        if all(c >= peers for c in counts):
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TestbedError(f"{host.name}: {counts} of {peers} routes/neighbours/FDB "
                               f"after {timeout:.0f}s")
        time.sleep(POLL)


class KernelWatch:
    """`ip monitor route neigh` on one host: when did lines naming a MAC (neighbour and
    FDB entry) and, for a new lease, its route appear."""

    def __init__(self, netns: str) -> None:
        self.proc = subprocess.Popen(["ip", "-n", netns, "monitor", "route", "neigh"],
                                     stdout=subprocess.PIPE, text=True)
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(self.proc.stdout,),
                                        daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str] | None) -> None:
        assert stream is not None
        for line in stream:
            with self._lock:
                self.lines.append((time.monotonic(), line))

    def seen(self, mac: str, route: str | None) -> float | None:
        """The time the last of the entries appeared, None while one is missing."""
        with self._lock:
            macs = [t for t, line in self.lines if mac in line]
            routes = [t for t, line in self.lines
                      if route is not None and line.startswith(route + " ")]
        if len(macs) < 2 or (route is not None and not routes):
            return None
        return max(macs[1], routes[0] if routes else 0.0)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()
        self._thread.join(5)


def _log_sizes(tb: Testbed) -> list[int]:
    return [len(tb.agent_log(h)) for h in tb.hosts]


def _reconciles_since(tb: Testbed, sizes: Sequence[int]) -> dict[str, int]:
    """Reconcile passes requested in the agents' logs after `sizes`, by reason."""
    reasons: dict[str, int] = {}
    for host, size in zip(tb.hosts, sizes, strict=True):
        for line in tb.agent_log(host)[size:].splitlines():
            if "reconcile requested" in line:
                try:
                    reason = str(json.loads(line).get("reason", "?"))
                except ValueError:
                    reason = line.rsplit("reason", 1)[-1].strip(" =:'\"}")
                reasons[reason] = reasons.get(reason, 0) + 1
    return reasons


def _agents_cpu(pids: Sequence[int]) -> list[float]:
    return [_cpu_seconds(p) for p in pids]


def _probe_state(tb: Testbed, host: Host) -> dict[str, Any]:
    """The agent's probe figures (its status, without the per-peer rows' weight here)."""
    state: dict[str, Any] = tb.host_status(host)["peer_health"]
    return state


def _probes_sent(tb: Testbed, host: Host) -> int:
    return int(_probe_state(tb, host)["counters"]["sent"])


def _etcd_requests(tb: Testbed) -> int:
    """gRPC requests etcd's members started so far (their /metrics): every call but the
    long-lived watch streams; a keep-alive is a stream of its own in aetcd."""
    total = 0
    for member in tb.etcd.members:
        out = tb.run(tb.underlay, ["curl", "-s", "--max-time", "5",
                                   f"{member.client_url}/metrics"]).stdout
        for line in out.splitlines():
            if (line.startswith("grpc_server_started_total{")
                    and 'grpc_method="Watch"' not in line):
                total += int(float(line.rsplit(" ", 1)[1]))
    return total


def measure_store(store: str, opts: ScaleOptions, progress: Progress) -> dict[str, Any]:
    n = opts.leases
    with Testbed(hosts=opts.agents, containers_per_host=0, config=CONFIG, store=store) as tb:
        writer = Writer(tb)
        try:
            created = writer(op="create", first=0, count=n)
            progress(f"{store}: {n} fake leases written in {created['seconds']:.1f} s")

            # Join: each agent starts into the network the previous ones completed.
            join: list[float] = []
            for k, host in enumerate(tb.hosts):
                start = time.monotonic()
                tb.start_agent(host)
                join.append(wait_programmed(tb, host, n + k, opts.timeout) - start)
                progress(f"{store}: {host.name} programmed {n + k} peers in {join[-1]:.2f} s")
            for host in tb.hosts:  # the earlier agents hear of the later ones
                wait_programmed(tb, host, n + opts.agents - 1, opts.timeout)
            pids = [_agent_pid(h) for h in tb.hosts]
            time.sleep(SETTLE)

            # The agents' idle CPU rate, taken off every figure below. Idle, an agent only
            # probes its peers (here: fake hosts that never answer, the costliest case:
            # every probe waits out its timeout), so this is also the probes' cost.
            sent0 = [_probes_sent(tb, h) for h in tb.hosts]
            c0, t0 = _agents_cpu(pids), time.monotonic()
            time.sleep(PROBE_WINDOW)
            c1, probe_window = _agents_cpu(pids), time.monotonic() - t0
            idle = [(b - a) / probe_window for a, b in zip(c0, c1, strict=True)]
            probes = [_probe_state(tb, h) for h in tb.hosts]  # read after: its CPU is not in
            pps = [(p["counters"]["sent"] - s0) / probe_window
                   for p, s0 in zip(probes, sent0, strict=True)]
            progress(f"{store}: probes {statistics.median(pps):.0f} packets/s per agent, "
                     f"{statistics.median(idle) * 100:.1f}% of a CPU")

            # Events: a new lease, then a changed one (a new VTEP MAC), alternately.
            watches = [KernelWatch(h.netns) for h in tb.hosts]
            # `ip monitor` subscribes after it starts: an agent quicker than that (7-25 ms
            # now) programmed the first event unseen, and the bench waited out its timeout.
            time.sleep(SETTLE)
            try:
                propagation: list[float] = []
                per_agent_max: list[float] = [0.0] * len(tb.hosts)
                c0, t0 = _agents_cpu(pids), time.monotonic()
                for e in range(opts.events):
                    index, mac = (n + e // 2, 1) if e % 2 == 0 else (n + e // 2, 0x42)
                    lease = fake_lease(index, SUBNET_LEN, mac)
                    route = str(lease.subnet) if mac == 1 else None
                    vtep = str(lease.backend_data["VtepMAC"])
                    sent = writer(op="put", index=index, mac=mac)["t0"]
                    deadline = time.monotonic() + opts.timeout
                    for i, watch in enumerate(watches):
                        while (at := watch.seen(vtep, route)) is None:
                            if time.monotonic() > deadline:
                                raise TestbedError(f"{tb.hosts[i].name}: event {e} "
                                                   f"({lease.subnet}) never reached the kernel")
                            time.sleep(0.005)
                        propagation.append(at - sent)
                        per_agent_max[i] = max(per_agent_max[i], at - sent)
                time.sleep(SETTLE)
                window = time.monotonic() - t0
                event_cpu = [(b - a - r * window) / opts.events
                             for a, b, r in zip(c0, _agents_cpu(pids), idle, strict=True)]
            finally:
                for watch in watches:
                    watch.close()
            progress(f"{store}: event -> kernel median "
                     f"{statistics.median(propagation) * 1000:.1f} ms")

            # A renewal round: every fake lease renewed once, data unchanged.
            sizes = _log_sizes(tb)
            requests = _etcd_requests(tb) if store == "etcd" else 0
            c0, t0 = _agents_cpu(pids), time.monotonic()
            renewed = writer(op="renew")
            time.sleep(SETTLE)
            window = time.monotonic() - t0
            renew_cpu = [b - a - r * window
                         for a, b, r in zip(c0, _agents_cpu(pids), idle, strict=True)]
            renewals = n + (opts.events + 1) // 2
            if store == "etcd":
                per_renewal = (_etcd_requests(tb) - requests) / renewals
                counted = "etcd requests, all clients"
            else:
                per_renewal = renewed["statements"] / renewals
                counted = "SQLite statements (writer)"
            progress(f"{store}: renewal round of {renewals} in {renewed['seconds']:.1f} s")
            rss = [_rss_mb(p) for p in pids]
            reasons = _reconciles_since(tb, sizes)
            return {
                "store": store,
                "leases": n,
                "agents": opts.agents,
                "load": load(),
                "join_s": _spread(join),
                "event_to_kernel_ms": {**_spread([p * 1000 for p in propagation]),
                                       "per_agent_max": [m * 1000 for m in per_agent_max]},
                "events": opts.events,
                "cpu_s_per_event_per_agent": _spread(event_cpu),
                "idle_cpu_s_per_s_per_agent": _spread(idle),
                "probes": {
                    "window_s": round(probe_window, 1),
                    "packets_per_s_per_agent": _spread(pps),
                    "cpu_s_per_s_per_agent": _spread(idle),
                    "interval_s": probes[0]["interval_s"],
                    "max_packets_per_second": probes[0]["max_packets_per_second"],
                    "peers": sum(probes[0]["counts"].values()),
                },
                "renewal_round": {
                    "renewals": renewals,
                    "seconds": renewed["seconds"],
                    "cpu_s_per_agent": _spread(renew_cpu),
                    "reconciles": sum(reasons.values()),
                    "reconcile_reasons": reasons,
                    "store_requests_per_renewal": per_renewal,
                    "counted": counted,
                },
                "rss_mb": _spread(rss),
            }
        finally:
            writer.close()


def measure_storm(agents: int, opts: ScaleOptions, progress: Progress) -> dict[str, Any]:
    """`agents` real agents started at once against one real etcd."""
    with Testbed(hosts=agents, containers_per_host=0, config=CONFIG, store="etcd",
                 log_level="info") as tb:
        before = load()
        start = time.monotonic()
        for host in tb.hosts:
            tb.start_agent(host)
        ready: list[float] = []
        for host in tb.hosts:
            tb.wait_subnet_env(host, opts.timeout * 3)
            ready.append(time.monotonic() - start)
        tb.wait_converged(opts.timeout * 3)
        converged = time.monotonic() - start
        logs = [tb.agent_log(h) for h in tb.hosts]
        # One failed request, one log line (its message may name the deadline twice).
        hits = sum(1 for text in logs for line in text.splitlines() if _DEADLINE.search(line))
        retries = sum(text.count("retrying") for text in logs)
        progress(f"storm: {agents} agents converged in {converged:.1f} s, "
                 f"{hits} deadline hits")
        return {"agents": agents, "load_before": before, "load_after": load(),
                "all_leased_s": max(ready), "converged_s": converged,
                "deadline_hits": hits, "store_retries": retries}


def run_scale(opts: ScaleOptions, progress: Progress) -> dict[str, Any]:
    if os.geteuid() != 0:
        from weft.core.errors import UsageError

        raise UsageError("the scale bench needs root (network namespaces)")
    report: dict[str, Any] = {"leases": opts.leases, "agents": opts.agents,
                              "load_before": load(), "stores": {}}
    for store in opts.stores:
        report["stores"][store] = measure_store(store, opts, progress)
    if opts.storm and "etcd" in opts.stores:
        report["storm"] = measure_storm(opts.storm, opts, progress)
    report["load_after"] = load()
    return report
