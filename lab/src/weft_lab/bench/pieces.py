"""What weft's rules cost over the hand-built kernel path, one piece at a time (issue #15).

Builds, as `weft bench` does (same testbeds, same ptp attachment, same pinning), a weft
host-gw testbed (agents) and a kernel-routes testbed (by hand, no rules), then:

    pairs    for each piece: qperf on the bare reference, then on the reference with that
             piece loaded by `nft -f` (weft's own rulesets, from weft.host.ingress_rules and
             weft.host.masquerade); median of the paired ratios over the rounds, so load
             drifting between rounds hits both sides of a pair
    profile  `perf record -a` over one qperf run on each testbed (host-gw against
             kernel-routes, or `profile vxlan` against kernel-vxlan); netfilter's share of
             the samples, by symbol
    cost     (`cost R`, vxlan) the kernel-vxlan reference bare, with weft's vxlan rules
             (this tree's ingress and masquerade rulesets, loaded by `nft -f`) and with the
             floor those rules stand on (conntrack and NAT hooks, everything untracked),
             interleaved over R rounds: netfilter's CPU time per MB of tcp_bw and per
             tcp_lat round trip, from fixed-period `cpu-clock` samples. CPU time, not a
             share of the machine, so the other engineers' load hardly moves it.

Run under the shared lock:
    .venv/bin/python -m weft_lab.bench.pieces pairs 8 1
"""

from __future__ import annotations

import contextlib
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from weft.host.ingress_rules import IngressPlan, ingress_ruleset
from weft.host.masquerade import masquerade_ruleset
from weft.host.untrack import Untrack
from weft_lab.bench.qperf import qperf_server, run_qperf
from weft_lab.bench.references import BENCH_NETWORK, REFERENCES, VXLAN_PORT, host_subnet
from weft_lab.bench.runner import Target, _overlay, _reference, measure
from weft_lab.bench.stats import BenchError
from weft_lab.testbed import Host, Testbed


def _drop(script: str, pattern: str) -> str:
    return "".join(ln for ln in script.splitlines(keepends=True) if pattern not in ln)


def pieces(tb: Testbed, host: Host) -> dict[str, str]:
    """Each piece's nft script for `host` of the reference testbed (weft's own rulesets)."""
    subnets = frozenset(host_subnet(h) for h in tb.hosts)
    own = host_subnet(host)
    untrack = Untrack(own.network_address, host.underlay_ip, None)
    ingress = ingress_ruleset(IngressPlan("host-gw", BENCH_NETWORK, 4, None, False,
                                          frozenset(), subnets, own=own))
    # The notrack rules of prerouting are the ingress chain's own (weft.host.ingress_rules).
    notrack = ingress_ruleset(IngressPlan("host-gw", BENCH_NETWORK, 4, None, False,
                                          frozenset(), subnets, own=own, untrack=untrack))
    masq = masquerade_ruleset(BENCH_NETWORK, own, untrack)
    nat_only = masquerade_ruleset(BENCH_NETWORK, own)
    raw_only = re.sub(r"chain postrouting \{.*?\n    \}", "", masq, flags=re.DOTALL)
    return {
        "weft's rules (ingress + masquerade + notrack)": notrack + masq,
        "ingress filter": ingress,
        "ingress filter without its fib rule": _drop(ingress, "fib saddr"),
        "masquerade table + notrack chains": masq,
        "notrack chains alone (no NAT chain)": raw_only,
        "masquerade table, overlay tracked": nat_only,
    }


def load(tb: Testbed, piece: str | None) -> None:
    for host in tb.hosts:
        tb.run(host.netns, ["nft", "flush", "ruleset"])
        if piece is not None:
            path = tb.run_dir / "piece.nft"
            path.write_text(pieces(tb, host)[piece])
            tb.run(host.netns, ["nft", "-f", str(path)])


def pairs(weft: Target, ref: Target, reps: int, secs: int) -> None:
    names = ["weft host-gw (agents)", *pieces(ref.testbed, ref.testbed.hosts[0])]
    runs: dict[str, list[tuple[float, float, float, float]]] = {n: [] for n in names}
    for rnd in range(reps):
        for name in names:
            load(ref.testbed, None)
            a = measure(ref, rnd, secs)
            if name.startswith("weft host-gw"):
                b = measure(weft, rnd, secs)
            else:
                load(ref.testbed, name)
                b = measure(ref, rnd, secs)
            runs[name].append((a.bw_MBps, a.lat_us, b.bw_MBps, b.lat_us))
            print(f"r{rnd} {name:>48}: ref {a.bw_MBps:7.1f} MB/s {a.lat_us:6.2f} µs, "
                  f"with it {b.bw_MBps:7.1f} MB/s {b.lat_us:6.2f} µs", flush=True)
    med = statistics.median
    print("\n| added to kernel-routes | BW % of ref | Lat % of ref | Lat Δ µs |")
    print("|---|---|---|---|")
    for name, rs in runs.items():
        print(f"| {name} | {med(100 * b / a for a, _, b, _ in rs):.1f} | "
              f"{med(100 * bl / al for _, al, _, bl in rs):.1f} | "
              f"{med(bl - al for _, al, _, bl in rs):+.2f} |")


def profile(weft: Target, ref: Target, out: Path) -> None:
    for name, t in (("weft", weft), ("ref", ref)):
        data = out / f"perf-{name}.data"
        proc = subprocess.Popen(["perf", "record", "-a", "-q", "-o", str(data)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        run = measure(t, 0, 4)
        proc.send_signal(2)
        proc.wait()
        report = subprocess.run(["perf", "report", "-i", str(data), "--sort", "symbol",
                                 "--stdio"], capture_output=True, text=True, check=True).stdout
        shares = {m.group(2): float(m.group(1)) for m in
                  re.finditer(r"^\s+([\d.]+)%\s+\[k\]\s+(\S+)", report, re.MULTILINE)}
        netfilter = {s: p for s, p in shares.items()
                     if re.match(r"(nft?_|ipv4_conntrack|ipv4_confirm|__nf_)", s)}
        busy = 100 - shares.get("pv_native_safe_halt", 0.0)
        print(f"{name}: {run.bw_MBps:.0f} MB/s {run.lat_us:.1f} µs; busy {busy:.1f} %, "
              f"netfilter {sum(netfilter.values()):.2f} % of samples:")
        for sym, pct in sorted(netfilter.items(), key=lambda kv: -kv[1])[:20]:
            print(f"    {pct:5.2f} % {sym}")


_NETFILTER = re.compile(r"(nft?_|ipv4_conntrack|ipv4_confirm|__nf_)")
_PERIOD_US = 100  # each cpu-clock sample stands for 100 µs of CPU time
_FLOOR = """table ip floor {
    chain pre { type filter hook prerouting priority raw; notrack; }
    chain out { type filter hook output priority raw; notrack; }
    chain post { type nat hook postrouting priority srcnat; }
}
"""


def vxlan_rules(tb: Testbed, host: Host) -> str:
    """weft's vxlan rules for `host` of the kernel-vxlan reference, overlay untracked."""
    own = host_subnet(host)
    members = frozenset((h.underlay_ip, VXLAN_PORT) for h in tb.hosts if h is not host)
    untrack = Untrack(own.network_address, host.underlay_ip, VXLAN_PORT)
    plan = IngressPlan("vxlan", BENCH_NETWORK, 4, VXLAN_PORT, False, members,
                       frozenset(host_subnet(h) for h in tb.hosts), own=own, untrack=untrack)
    return ingress_ruleset(plan) + masquerade_ruleset(BENCH_NETWORK, own, untrack)


def netfilter_us(t: Target, test: str, secs: int) -> tuple[float, float]:
    """(the qperf figure, netfilter's CPU µs on all CPUs) over one `test` run."""
    data = t.testbed.run_dir / "perf-cost.data"
    with qperf_server(t.server_netns, t.server_cpu):
        proc = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-c",
                                 str(_PERIOD_US * 1000), "-a", "-q", "-o", str(data)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        run = run_qperf(t.client_netns, t.server_ip, [test], secs, t.client_cpu)
        proc.send_signal(2)
        proc.wait()
    report = subprocess.run(["perf", "report", "-i", str(data), "--sort", "symbol", "-n",
                             "--stdio"], capture_output=True, text=True, check=True).stdout
    samples = sum(int(m.group(1)) for m in re.finditer(
        r"^\s+[\d.]+%\s+(\d+)\s+\[k\]\s+(\S+)", report, re.MULTILINE)
        if _NETFILTER.match(m.group(2)))
    figure = run.bw_MBps if test == "tcp_bw" else run.lat_us
    if figure is None:
        raise BenchError(f"qperf {test} printed no figure")
    return figure, samples * _PERIOD_US


def cost(ref: Target, rounds: int, secs: int = 4) -> None:
    variants: dict[str, Callable[[Testbed, Host], str] | None] = {
        "kernel-vxlan (no rules)": None,
        "+ weft's vxlan rules": vxlan_rules,
        "+ conntrack/NAT hooks only (floor)": lambda tb, host: _FLOOR,
    }
    got: dict[str, list[tuple[float, float, float, float]]] = {n: [] for n in variants}
    for rnd in range(rounds):
        for name, rules in variants.items():
            for host in ref.testbed.hosts:
                ref.testbed.run(host.netns, ["nft", "flush", "ruleset"])
                if rules is not None:
                    path = ref.testbed.run_dir / "cost.nft"
                    path.write_text(rules(ref.testbed, host))
                    ref.testbed.run(host.netns, ["nft", "-f", str(path)])
            bw, bw_nf = netfilter_us(ref, "tcp_bw", secs)
            lat, lat_nf = netfilter_us(ref, "tcp_lat", secs)
            per_mb, per_trip = bw_nf / (bw * secs), 1000 * lat_nf / (secs * 1e6 / lat)
            got[name].append((per_mb, per_trip, bw, lat))
            print(f"r{rnd} {name:>38}: {bw:7.1f} MB/s {lat:6.1f} µs; netfilter "
                  f"{per_mb:5.1f} µs/MB, {per_trip:5.0f} ns/round trip", flush=True)
    med = statistics.median
    print("\n| kernel-vxlan | netfilter µs CPU per MB | ns per round trip | BW MB/s | Lat µs |")
    print("|---|---|---|---|---|")
    for name, rs in got.items():
        print(f"| {name} | {med(r[0] for r in rs):.1f} | {med(r[1] for r in rs):.0f} | "
              f"{med(r[2] for r in rs):.0f} | {med(r[3] for r in rs):.1f} |")


def main() -> None:
    mode = sys.argv[1]
    if mode == "cost":
        with contextlib.ExitStack() as stack:
            cost(_reference(stack, REFERENCES["kernel-vxlan"], None, "ptp")["kernel-vxlan"],
                 int(sys.argv[2]))
        return
    backend = sys.argv[2] if mode == "profile" and len(sys.argv) > 2 else "host-gw"
    reference = {"host-gw": "kernel-routes", "vxlan": "kernel-vxlan"}[backend]
    with contextlib.ExitStack() as stack:
        (weft,) = _overlay(stack, backend, None, "ptp").values()
        ref = _reference(stack, REFERENCES[reference], None, "ptp")[reference]
        if mode == "pairs":
            pairs(weft, ref, int(sys.argv[2]), int(sys.argv[3]))
        else:
            profile(weft, ref, ref.testbed.run_dir)


if __name__ == "__main__":
    main()
