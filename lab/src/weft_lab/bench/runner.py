"""`weft bench`: testbeds for native and each backend, up together, measured in rounds.

    native   testbed of 2 hosts, no agent: qperf host h1 -> host h2 over the underlay
    vxlan    testbed of 2 hosts x 1 container, agents with {"Type": "vxlan"}:
             qperf container h1c1 -> container h2c1 through the overlay
    vxlan/docker  (--runtime docker) the same with a dockerd per host and docker
             containers, configured from subnet.env as the seed did
    host-gw  ... one testbed per backend
    udp-minimal  the udp testbed (same hosts, TUN device, routes, containers) with its agents
             stopped and a minimal forwarder (weft_lab.bench.udp_minimal) in weft's place:
             the reference that shows what weft's udp guarantees cost
    kernel-vxlan, kernel-routes   references: the same testbed, the kernel path programmed
             by hand with no agent and no rules (weft_lab.bench.references)
    flannel-vxlan, flannel-host-gw   peers: the same testbed with the kernel state and
             iptables rules flannel v0.28 programs (weft_lab.bench.flannel)

All testbeds stay up for the whole bench so the schedule can interleave (native, A,
native, B, ... per round). A backend whose agents do not come up, or whose containers
cannot reach each other, is reported as skipped with the reason. Everything is torn down
by the testbeds' context managers, on success, failure or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from weft.backends.registry import overhead
from weft.core.constants import UDP_DEVICE
from weft.core.errors import UsageError, WeftError
from weft.integrations.subnet_env import SubnetEnv, write_subnet_env
from weft_lab.bench.cpu import CpuMeter, host_cpus
from weft_lab.bench.qperf import qperf_server, run_qperf
from weft_lab.bench.references import (
    BENCH_NETWORK,
    BENCH_NETWORK6,
    REFERENCES,
    Reference,
    host_subnet,
    host_subnet6,
)
from weft_lab.bench.stats import (
    NATIVE,
    BenchError,
    BenchReport,
    Run,
    Skipped,
    parse_rate,
    schedule,
    summarise,
    tbf_args,
)
from weft_lab.runtimes import RUNTIMES
from weft_lab.testbed import ATTACHMENTS, Testbed, netns_exec

# Each reference row sits just before (kernel paths, then flannel's) or after (udp-minimal)
# its backend.
DEFAULT_ORDER = ("kernel-vxlan", "flannel-vxlan", "vxlan", "kernel-routes", "flannel-host-gw",
                 "host-gw", "udp", "udp-minimal", "wireguard")
UDP_MINIMAL = "udp-minimal"
# Rows measured on a backend's own testbed with its agents swapped out: row -> backend.
SWAPPED = {UDP_MINIMAL: "udp"}
# Rows of a backend run by agents with extra flags: row -> (backend, agent flags). Measured
# only when named (`--backends host-gw-nft`): the backends without the fast path, on the
# nftables path alone.
VARIANTS = {"host-gw-nft": ("host-gw", ("--no-fastpath",)),
            "vxlan-nft": ("vxlan", ("--no-fastpath",))}


def bench_config(backend: str, dual_stack: bool = False) -> str:
    six = {"EnableIPv6": True, "IPv6Network": str(BENCH_NETWORK6)} if dual_stack else {}
    return json.dumps({"Network": str(BENCH_NETWORK), "SubnetLen": 24, **six,
                       "Backend": {"Type": backend}})


IPV6_SUFFIX = "/ipv6"  # a row measured over IPv6 beside its IPv4 row (--ipv6)


def available_backends() -> list[str]:
    """Every backend in the registry and every default reference row, the usual ones
    first."""
    from weft.backends.registry import BACKENDS

    names = {*BACKENDS, *SWAPPED, *(name for name, ref in REFERENCES.items() if ref.default)}
    return [b for b in DEFAULT_ORDER if b in names] + sorted(
        b for b in names if b not in DEFAULT_ORDER)


@dataclass(frozen=True)
class BenchOptions:
    backends: tuple[str, ...]
    rate: str | None = None
    secs: int = 5
    reps: int = 3
    attach: str = "bridge"
    # "docker" or "podman": every backend is measured twice, with bare namespaces
    # ("vxlan") and with that runtime's containers ("vxlan/docker"), in the same rounds.
    runtime: str = "netns"
    # Dual stack on a dual-stack underlay: native and every backend also measured over
    # IPv6 ("native/ipv6", "vxlan/ipv6"), between the same namespaces, in the same rounds.
    ipv6: bool = False


def parse_backends(text: str | None) -> tuple[str, ...]:
    if text is None:
        return tuple(available_backends())
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise UsageError(f"--backends {text!r}: name at least one backend")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"--backends {text!r}: {', '.join(dupes)} listed twice")
    return names


@dataclass
class Target:
    """Where one name's traffic goes: a client namespace, a server namespace and address."""

    name: str
    testbed: Testbed
    client_netns: str
    server_netns: str
    server_ip: str
    meter: CpuMeter
    # Each simulated host gets its own CPU for its end of the test, as two machines would:
    # left to the scheduler, client and server sometimes share a CPU (a wake-up costs
    # ~6 µs) and sometimes not (~25 µs here), and latency turns bimodal run to run.
    client_cpu: int
    server_cpu: int


Progress = Callable[[str], None]


def _shape(tb: Testbed, rate_bits: int | None) -> None:
    if rate_bits is None:
        return
    for host in tb.hosts:
        tb.run(host.netns, ["tc", "qdisc", "replace", "dev", "eth0", "root",
                            *tbf_args(rate_bits)])


def _native(stack: contextlib.ExitStack, rate_bits: int | None,
            ipv6: bool = False) -> dict[str, Target]:
    tb = stack.enter_context(Testbed(hosts=2, containers_per_host=0, log_level="info",
                                     underlay="dual" if ipv6 else "ipv4"))
    _shape(tb, rate_bits)
    h1, h2 = tb.hosts
    if not tb.ping(h1.netns, h2.underlay_ip):
        raise BenchError("the native testbed's hosts cannot reach each other")
    targets = {NATIVE: Target(NATIVE, tb, h1.netns, h2.netns, str(h2.underlay_ip),
                              CpuMeter(tb.all_netns()), *_cpus())}
    if ipv6:
        if h2.underlay_ip6 is None or not tb.ping(h1.netns, h2.underlay_ip6):
            raise BenchError("the native testbed's hosts cannot reach each other over IPv6")
        name = NATIVE + IPV6_SUFFIX
        targets[name] = Target(name, tb, h1.netns, h2.netns, str(h2.underlay_ip6),
                               CpuMeter(tb.all_netns()), *_cpus())
    return targets


def _overlay(stack: contextlib.ExitStack, backend: str, rate_bits: int | None,
             attach: str, runtime: str = "netns", ipv6: bool = False) -> dict[str, Target]:
    cpus = _cpus()
    backend_type, agent_args = VARIANTS.get(backend, (SWAPPED.get(backend, backend), ()))
    # Each host's agent (and so a userspace data plane: the udp forwarder, wireguard-go)
    # runs on that host's CPU, beside its qperf, as on two machines.
    tb = stack.enter_context(Testbed(hosts=2, containers_per_host=1, attach=attach,
                                     config=bench_config(backend_type, ipv6),
                                     agent_args=agent_args, log_level="info",
                                     agent_cpus=cpus, runtime=runtime,
                                     underlay="dual" if ipv6 else "ipv4"))
    _shape(tb, rate_bits)
    tb.start(timeout=60)
    if backend == UDP_MINIMAL:
        _swap_in_minimal_forwarder(stack, tb)
    c1, c2 = tb.containers
    # A few tries: the first packets may wait for neighbour resolution on the way.
    if not any(tb.ping(c1.netns, c2.ip) for _ in range(3)):
        raise BenchError(f"{c1.name} cannot reach {c2.name} ({c2.ip}) through {backend}")
    # A docker container's namespace carries the testbed's name for it (ip netns attach),
    # so qperf runs in the container's own network stack: its veth, docker0, iptables.
    name = backend if runtime == "netns" else f"{backend}/{runtime}"
    targets = {name: Target(name, tb, c1.netns, c2.netns, str(c2.ip),
                            CpuMeter(tb.all_netns()), *cpus)}
    if ipv6:
        if c2.ip6 is None or not any(tb.ping(c1.netns, c2.ip6) for _ in range(3)):
            raise BenchError(f"{c1.name} cannot reach {c2.name} over IPv6 through {backend}")
        targets[name + IPV6_SUFFIX] = Target(name + IPV6_SUFFIX, tb, c1.netns, c2.netns,
                                             str(c2.ip6), CpuMeter(tb.all_netns()), *cpus)
    return targets


def _swap_in_minimal_forwarder(stack: contextlib.ExitStack, tb: Testbed) -> None:
    """Stop weft's agents and their forwarder processes (the persistent TUN device and its
    route stay, see the udp backend) and run the minimal forwarder on each host, pinned
    like the agent was."""
    from weft.backends.udp.plan import peer_port
    from weft.backends.udp.supervisor import stop_forwarder

    ports = {str(lease.public_ip): peer_port(lease.backend_data, 8285) for lease in tb.leases()}
    h1, h2 = tb.hosts
    for host in tb.hosts:
        tb.stop_agent(host)
        stop_forwarder(host.state_dir)  # it holds the TUN device the minimal one attaches
    for host, peer in ((h1, h2), (h2, h1)):
        argv = [sys.executable, "-m", "weft_lab.bench.udp_minimal", UDP_DEVICE,
                str(host.underlay_ip), str(ports[str(host.underlay_ip)]),
                str(peer.underlay_ip), str(ports[str(peer.underlay_ip)])]
        if host.cpu is not None:
            argv = ["taskset", "-c", str(host.cpu), *argv]
        proc = subprocess.Popen(netns_exec(host.netns, argv), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        stack.callback(_kill, proc)
    time.sleep(0.5)  # both attached to their TUN device; the ping below proves it


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if proc.stderr:
        proc.stderr.close()


def _reference(stack: contextlib.ExitStack, ref: Reference, rate_bits: int | None,
               attach: str, ipv6: bool = False) -> dict[str, Target]:
    """The testbed of a backend, without agents: `ref.program` builds the kernel path, and
    the containers are attached by `weft-cni` from a subnet.env written here, as the agent
    would write it. FLANNEL_IPMASQ=true there (as flanneld --ip-masq writes it for the
    flannel rows, whose masquerade the host's rules do): with false, weft-cni (like
    flannel's plugin) asks the delegate for its own ipMasq, which NATs every packet to
    another host's subnet through conntrack: not the kernel path a kernel-* row is for,
    and a fast path skipping netfilter then sees half a connection NATed.

    With `ipv6` (and a `ref.program6`), dual stack on the dual underlay, as a backend's
    `/ipv6` row: a second target, `<name>/ipv6`, between the same containers."""
    six = ipv6 and ref.program6 is not None
    tb = stack.enter_context(Testbed(hosts=2, containers_per_host=1, attach=attach,
                                     config=bench_config(ref.beside, six), log_level="info",
                                     underlay="dual" if six else "ipv4"))
    _shape(tb, rate_bits)
    subnets = [host_subnet(h) for h in tb.hosts]
    subnets6 = [host_subnet6(h) for h in tb.hosts]
    # One MTU for both families, as an agent writes it: an IPv6 underlay's header is 20
    # bytes longer, which only an encapsulation pays.
    mtu = 1500 - overhead(ref.beside) - (20 if six and overhead(ref.beside) else 0)
    for host, subnet, subnet6 in zip(tb.hosts, subnets, subnets6, strict=True):
        tb.run(host.netns, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        if six:
            tb.run(host.netns, ["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"])
        write_subnet_env(host.subnet_env_path, SubnetEnv(
            BENCH_NETWORK, subnet, mtu, True,
            *((BENCH_NETWORK6, subnet6) if six else ())))
    ref.program(tb, subnets)
    if six and ref.program6 is not None:
        ref.program6(tb, subnets6)
    for c in tb.containers:
        tb.attach(c)
    if ref.after_attach is not None:
        ref.after_attach(tb)
    c1, c2 = tb.containers
    if not any(tb.ping(c1.netns, c2.ip) for _ in range(3)):
        raise BenchError(f"{c1.name} cannot reach {c2.name} ({c2.ip}) through {ref.name}")
    targets = {ref.name: Target(ref.name, tb, c1.netns, c2.netns, str(c2.ip),
                                CpuMeter(tb.all_netns()), *_cpus())}
    if six:
        if c2.ip6 is None or not any(tb.ping(c1.netns, c2.ip6) for _ in range(3)):
            raise BenchError(f"{c1.name} cannot reach {c2.name} over IPv6 through {ref.name}")
        name = ref.name + IPV6_SUFFIX
        targets[name] = Target(name, tb, c1.netns, c2.netns, str(c2.ip6),
                               CpuMeter(tb.all_netns()), *_cpus())
    return targets


def _cpus() -> tuple[int, int]:
    """(client CPU, server CPU): host 1's and host 2's, distinct when the machine has two."""
    cpus = host_cpus()
    return cpus[0], cpus[1 % len(cpus)]


def _describe(t: Target) -> str:
    return (f"  {t.name} ready: testbed run {t.testbed.run_id}, qperf {t.client_netns} "
            f"(cpu {t.client_cpu}) -> {t.server_ip} in {t.server_netns} (cpu {t.server_cpu})")


def _reason(exc: BaseException) -> str:
    """The first line a user needs: the error, without a multi-kilobyte agent log."""
    text = str(exc).strip() or type(exc).__name__
    lines = text.splitlines()
    # The testbed appends the agent's log; its last "error" line says why the agent quit.
    detail = [ln for ln in lines[1:] if "error" in ln.lower()]
    return lines[0] + (f" — {detail[-1].strip()[:300]}" if detail else "")


def measure(target: Target, round_: int, secs: int) -> Run:
    t = target
    with qperf_server(t.server_netns, t.server_cpu):
        before = t.meter.snapshot()
        bw = run_qperf(t.client_netns, t.server_ip, ["tcp_bw"], secs, t.client_cpu)
        after = t.meter.snapshot()
        lat = run_qperf(t.client_netns, t.server_ip, ["tcp_lat"], secs, t.client_cpu)
    if bw.bw_MBps is None or lat.lat_us is None:  # run_qperf already checks; for the types
        raise BenchError(f"qperf to {target.server_ip} printed no figure")
    return Run(round_, bw.bw_MBps, lat.lat_us, CpuMeter.seconds(before, after), float(secs))


def _measure_with_retry(target: Target, round_: int, secs: int, progress: Progress) -> Run:
    """One retry: on a shared machine a run can fail for reasons outside the bench (a
    qperf killed by someone else's cleanup); a second failure is the backend's."""
    try:
        return measure(target, round_, secs)
    except WeftError as exc:
        progress(f"retry {target.name} (round {round_ + 1}): {_reason(exc)}")
    return measure(target, round_, secs)


def run_bench(opts: BenchOptions, progress: Progress = lambda _: None) -> BenchReport:
    """Bring every testbed up, run the interleaved schedule, summarise; always clean up."""
    from weft.backends.registry import BACKENDS

    if opts.attach not in ATTACHMENTS:
        raise UsageError(f"--attach {opts.attach!r}: use {' or '.join(ATTACHMENTS)}")
    if opts.runtime not in RUNTIMES:
        raise UsageError(f"--runtime {opts.runtime!r}: use {', '.join(RUNTIMES)}")
    if opts.secs < 1:
        raise UsageError(f"--secs {opts.secs}: need at least 1")
    rate_bits = parse_rate(opts.rate) if opts.rate is not None else None
    schedule(opts.backends, opts.reps)  # validates names and reps before building anything
    skipped: list[Skipped] = []
    names: list[str] = []
    with contextlib.ExitStack() as stack:
        progress("building the native testbed (2 hosts, no overlay)")
        targets = _native(stack, rate_bits, opts.ipv6)
        for target in targets.values():
            progress(_describe(target))
        names.extend(name for name in targets if name != NATIVE)
        for backend in opts.backends:
            if backend not in {*BACKENDS, *REFERENCES, *SWAPPED, *VARIANTS}:
                skipped.append(Skipped(backend, "not in this build's backend registry "
                                       "or reference rows "
                                       f"(has: {', '.join(available_backends())})"))
                progress(f"skip {backend}: not registered")
                continue
            ref = REFERENCES.get(backend)
            # Reference rows are kernel paths or forwarders, the same whatever the runtime.
            alone = ref is not None or backend in SWAPPED
            for runtime in ("netns",) if alone else dict.fromkeys(("netns", opts.runtime)):
                name = backend if runtime == "netns" else f"{backend}/{runtime}"
                progress(f"building the {name} testbed (2 hosts x 1 {runtime} container "
                         f"attached by {opts.attach}, "
                         f"{'by hand, no agents' if ref else 'agents'})")
                names.append(name)
                if opts.ipv6 and (ref is None or ref.program6 is not None):
                    names.append(name + IPV6_SUFFIX)
                sub = stack.enter_context(contextlib.ExitStack())
                try:
                    made = (_reference(sub, ref, rate_bits, opts.attach, opts.ipv6) if ref
                            else _overlay(sub, backend, rate_bits, opts.attach, runtime,
                                          opts.ipv6))
                    targets.update(made)
                    for target in made.values():
                        progress(_describe(target))
                except WeftError as exc:
                    sub.close()  # tear this one down now; the others carry on
                    skipped.append(Skipped(name, _reason(exc)))
                    progress(f"skip {name}: {_reason(exc)}")
        live = [n for n in names if n in targets]
        runs: dict[str, list[Run]] = {name: [] for name in [NATIVE, *live]}
        for slot in schedule(live, opts.reps):
            if slot.name not in targets:
                continue  # failed in an earlier round
            try:
                run = _measure_with_retry(targets[slot.name], slot.round, opts.secs, progress)
            except WeftError as exc:
                if slot.name == NATIVE:
                    raise
                skipped.append(Skipped(slot.name, f"failed in round {slot.round + 1}: "
                                       f"{_reason(exc)}"))
                progress(f"drop {slot.name}: {_reason(exc)}")
                del targets[slot.name], runs[slot.name]
                continue
            runs[slot.name].append(run)
            progress(f"round {slot.round + 1}/{opts.reps} {slot.name:>17}: "
                     f"{run.bw_MBps:9.1f} MB/s {run.lat_us:8.1f} µs "
                     f"{run.cpu_s_per_GB:6.2f} CPU s/GB")
        progress("removing the testbeds")
    return summarise(opts.rate.strip().lower() if opts.rate else None, opts.secs, opts.reps,
                     runs, skipped, opts.attach)

