"""The agent: the daemon on each host. This module only wires its parts.

    config ──▶ lock state dir ──▶ acquire/reclaim lease ──▶ backend up ──▶ host state
                                                                │
    one TaskGroup:  store watch ─┐                              ▼
                    kernel events ├─▶ "something changed" ─▶ ONE reconcile worker
                    nft / files  ─┤     (coalesced)             (newest view, validated)
                    resync timer ─┘
                    renew lease, status socket

Reconciliation is level-based and done by one worker at a time: every trigger only marks
the state dirty, and the worker converges the kernel to the newest validated lease view
(and the host's own state: subnet.env, nftables, FORWARD rules). Nothing a peer sends or
the store holds can end the agent: a bad lease is that peer's error, a failed pass is
retried with backoff. On SIGTERM the agent exits and leaves the data plane standing, so a
restart drops no traffic; `--release-on-exit` is for a host that leaves.

The parts, each with one job, get what they need handed to them (values, callbacks):
    lease_keeper   acquire, renew, recover, move this host's lease
    store_watch    follow the store (the unvalidated lease view), check the config
    reconciler     the one worker: the validated view, the diff, the apply order, echoes
    host_keeper    the host pass of the worker: subnet.env, nftables, FORWARD, the lock
    conntrack      the masquerade table and the overlay conntrack decision
    retry, health  one retry policy; one record of every error and notice
    probe_keeper   every peer probed through the data plane (prober, peer_health)
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import subprocess
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weft.agent.conntrack import OverlayConntrack
from weft.agent.fastpath_state import FastPathState
from weft.agent.health import Health, Notice, Part
from weft.agent.host_keeper import HostKeeper
from weft.agent.identity import load_host_id
from weft.agent.lease_keeper import LeaseKeeper, OwnLease, acquire
from weft.agent.leasing import check_address_free
from weft.agent.lock import StateDirLock
from weft.agent.metrics import AgentMetrics
from weft.agent.metrics_server import MetricsServer
from weft.agent.peer_health import ProbePolicy
from weft.agent.probe_keeper import ProbeKeeper
from weft.agent.reconciler import Reconciler, ReconcileRequests
from weft.agent.retry import StoreRetry, restarting
from weft.agent.status import STATUS_SOCKET, serve_status_anew
from weft.agent.store_watch import StoreView, check_config, watch_store
from weft.agent.triggers import (
    DESTINATION_NAT_ADDED,
    watch_files,
    watch_kernel,
    watch_netfilter,
)
from weft.backends.base import Backend, BackendFacts
from weft.backends.registry import backend_facts, create_backend, ipv6_next_hops, parse_config
from weft.core.config import IPAddress, IPNetwork, NetworkConfig
from weft.core.constants import (
    DEFAULT_LEASE_TTL,
    DEFAULT_STATE_DIR,
    DEFAULT_SUBNET_FILE,
)
from weft.core.errors import StoreError, UsageError, WeftError
from weft.core.host import HostContext
from weft.host.files import private_dir
from weft.host.forward_accept import remove_forward_accept
from weft.host.ingress import IngressFilter
from weft.host.masquerade import ConntrackMode, remove_masquerade
from weft.host.netlink import Netlink
from weft.host.system import detect_host, enable_forwarding, require_root, underlay_address
from weft.store import LeaseStore

log = logging.getLogger("weft.agent")

# Every device weft creates starts with this (weft.vx1, weft.udp0, weft.wg0, weft0).
DEVICE_PREFIX = "weft"
# The store request deadline while the agent starts (the store's own after): measured with
# 100 agents starting at once on 2 cores, etcd answered, but the starved clients read the
# answers after etcd's 3 s had passed (284 requests retried). A start has no data plane to
# keep yet; a request caught on a dead member waits this long once, then the next is tried.
START_DEADLINE = 15.0


@dataclass
class AgentOptions:
    store: LeaseStore
    public_ip: IPAddress | None = None
    public_ipv6: ipaddress.IPv6Address | None = None  # dual stack (else found on the iface)
    iface: str | None = None
    subnet_file: Path = Path(DEFAULT_SUBNET_FILE)
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    lease_ttl: float = DEFAULT_LEASE_TTL
    ip_masq: bool = True
    # Whether overlay <-> overlay traffic skips conntrack (weft.host.masquerade).
    overlay_conntrack: ConntrackMode = "auto"
    metrics_addr: str | None = None
    release_on_exit: bool = False
    # Converge everything again now and then even when no event said so: the safety net
    # under the kernel, netfilter and file watchers.
    resync_interval: float = 60.0
    # The tc BPF fast path for overlay <-> overlay packets (weft.agent.fastpath_state): on
    # wherever it can run, the nftables path (with the reason in status) where it cannot.
    fastpath: bool = True
    # How every peer is probed (weft.agent.peer_health); None: not at all.
    probes: ProbePolicy | None = field(default_factory=ProbePolicy)


@dataclass(frozen=True)
class Running:
    """What start-up made: the parts the run drives and shutdown closes."""

    config_text: str
    config: NetworkConfig
    host: HostContext
    backend: Backend
    ingress: IngressFilter
    facts: BackendFacts  # its ports, devices (FORWARD's scope), tables
    store_view: StoreView
    keeper: LeaseKeeper
    conntrack: OverlayConntrack
    reconciler: Reconciler
    probes: ProbeKeeper | None  # None: --probe-period 0


class Agent:
    def __init__(self, options: AgentOptions) -> None:
        self.opts = options
        self.store = options.store
        self.metrics = AgentMetrics()
        self.health = Health(lambda: self.store.rejected.by_key)
        self.retry = StoreRetry(self.health, self.metrics.store_errors.inc)
        self.requests = ReconcileRequests()  # every part's `request(reason)`
        self.fastpath = FastPathState(options.fastpath)
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._status_restart = asyncio.Event()
        self._underlay_changed = asyncio.Event()  # an address came or went on the underlay
        self._readdress = asyncio.Event()  # this host's address moved: start again on it
        self._metrics_server: MetricsServer | None = None
        self._metrics_serving = False
        # A destination NAT rule appeared: decide the overlay's conntrack again now.
        self._nat_added = asyncio.Event()
        self._lock = StateDirLock(options.state_dir)
        self.probes: ProbeKeeper | None = None  # set once started (the metrics read it)

    # --- start-up -----------------------------------------------------------------------

    async def _load_config(self) -> tuple[str, NetworkConfig]:
        text = await self.retry.call("get config", self.store.get_config)
        if text is None:
            raise UsageError("the store holds no network config: run `weft config set FILE`")
        return text, parse_config(text)

    async def start(self) -> Running:
        self.store.starting(START_DEADLINE)
        try:
            return await self._start()
        finally:
            self.store.starting(None)

    async def _start(self) -> Running:
        require_root()
        state_dir = self.opts.state_dir
        try:
            # Root's alone, or refused: one line naming the path and why (weft.host.files).
            private_dir(state_dir, "state directory (--state-dir)")
            private_dir(self.opts.subnet_file.parent, "subnet file directory", mode=0o755)
        except OSError as exc:
            raise UsageError(
                f"cannot create {exc.filename or state_dir} ({exc.strerror})") from None
        if not self._lock.held:
            self._lock.acquire()
        if self.opts.metrics_addr and self._metrics_server is None:
            # Bound now, served after the first pass: an address that can't be bound is a
            # one-line error before the lease is taken or the kernel touched.
            self._metrics_server = MetricsServer(self.opts.metrics_addr, self.metrics.registry)
        host_id = load_host_id(state_dir)
        config_text, config = await self._load_config()
        # pyroute2's sync API runs its own event loop, so netlink work happens off this one.
        needed = ipv6_next_hops(config)
        host = await asyncio.to_thread(
            detect_host, self.opts.public_ip, self.opts.iface, state_dir,
            self.opts.public_ipv6, config.dual_stack or needed is not None
        )
        if needed is not None and host.public_ip.version == 4 and host.public_ipv6 is None:
            # It still serves what it can (IPv4); each peer's IPv6 half is its error.
            message = f"{host.underlay_ifname} has no IPv6 address, and {needed}"
            self.health.notice(Notice.UNDERLAY, message)
            log.error("this host cannot route the IPv6 overlay", extra={"error": message})
        underlay = await asyncio.to_thread(_underlay_networks, host.underlay_ifname)
        backend = create_backend(config, host)
        facts = backend_facts(config.backend, host.underlay_ifname, config.dual_stack)
        ingress = IngressFilter(config, host.public_ip, public_ipv6=host.public_ipv6,
                                port=facts.encap_port, port6=facts.encap_port6,
                                by_port=facts.members_by_port, peer_iifs=facts.peer_iifs,
                                marker6=facts.member6_marker)
        self.metrics.export_ingress(config.backend.type, ingress.counters)
        # Another host's live lease at this address: refused before the backend touches
        # the kernel (its device would take the address's traffic from the live owner).
        await self.retry.call("list leases",
                              lambda: check_address_free(self.store, host.public_ip, host_id))
        data = await asyncio.to_thread(backend.prepare)
        # A backend with devices of its own for the IPv6 overlay says so (vxlan over an
        # IPv6 underlay address); otherwise its BackendData serves both halves.
        ipv6_data = getattr(backend, "ipv6_data", None)
        data6 = ipv6_data() if callable(ipv6_data) else None
        lease, leases, revision = await acquire(self.store, config, host.public_ip, data,
                                                self.opts.lease_ttl, self.retry, host_id,
                                                public_ipv6=host.public_ipv6,
                                                backend_v6_data=data6)
        # The view starts from the listing the lease was chosen by; the watch from its
        # revision brings what came after, our own lease's write included.
        store_view = StoreView([*leases, lease], revision)
        own = OwnLease(lease)
        conntrack = OverlayConntrack(config, host.public_ip, ip_masq=self.opts.ip_masq,
                                     mode=self.opts.overlay_conntrack, ingress=ingress,
                                     encap_port=facts.encap_port,
                                     request=self.requests, public_ipv6=host.public_ipv6,
                                     encap_port6=facts.encap_port6)
        keeper = LeaseKeeper(own, self.store, config, host.public_ip, ttl=self.opts.lease_ttl,
                             public_ipv6=host.public_ipv6,
                             activate=backend.activate, on_taken=conntrack.replace,
                             record=store_view.record, request=self.requests,
                             retry=self.retry, health=self.health, metrics=self.metrics,
                             host_id=host_id, deletions=store_view.own,
                             known_taken=lambda: store_view.live_subnets(time.time()))
        await keeper.leave_previous_subnet(self.opts.subnet_file)
        await keeper.take(lease)
        for network in config.networks:
            enable_forwarding(network.version)
        await asyncio.to_thread(self.fastpath.start, config, facts.arrival, state_dir,
                                facts.arrival6)
        self.metrics.export_backend(backend.status)
        self.metrics.export_peer_health(
            lambda: self.probes.prober if self.probes is not None else None)
        host_keeper = HostKeeper(
            own, network=config.network, ipv6_network=config.ipv6.network if config.ipv6 else None,
            subnet_file=self.opts.subnet_file,
            state_dir=state_dir, ip_masq=self.opts.ip_masq,
            devices=(facts.tunnels, facts.bare_underlay),
            untrack=lambda: conntrack.untrack, lock=self._lock,
            status_socket=state_dir / STATUS_SOCKET, on_socket_gone=self._status_restart.set,
            health=self.health, host_id=host_id)
        reconciler = Reconciler(
            backend, store_view, self.requests, config=config, public_ip=host.public_ip,
            public_ipv6=host.public_ipv6,
            underlay=underlay, lease=lambda: own.lease, converge_host=host_keeper.converge,
            ingress=ingress, fastpath=self.fastpath, stand_down=conntrack.stand_down,
            health=self.health, metrics=self.metrics)
        # The first pass runs here, so what goes wrong on start-up reaches the caller; it
        # also removes what an earlier run left that no lease wants.
        await reconciler.pass_once()
        if self.opts.probes is not None:
            self.probes = ProbeKeeper(
                self.opts.probes, backend_type=config.backend.type, lease=lambda: own.lease,
                mtu=lambda: own.mtu, peers=lambda: reconciler.view.peers,
                backend_status=backend.status, extra_summary=self._summary,
                on_rtt=self.metrics.probe_rtt.observe)
        if self._metrics_server is not None and not self._metrics_serving:
            self._metrics_server.start()
            self._metrics_serving = True
        return Running(config_text, config, host, backend, ingress, facts,
                       store_view, keeper, conntrack, reconciler, self.probes)

    # --- run ----------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                running = await self.start()
            except BaseException:
                self._lock.release()
                raise
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop.set)
            if not await self._serve(running):
                return
            # The host's address moved (no --public-ip): start again on the new one, as a
            # restart would (the data plane stands meanwhile), with the same identity, so
            # the same subnet is renewed under the new address and peers follow.
            self._readdress.clear()
            self.ready.clear()

    async def _serve(self, running: Running) -> bool:
        """Run the services until SIGTERM (False) or the underlay address moved (True)."""
        moved = False
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(service) for service in self._services(running)]
                self.ready.set()
                log.info("agent running", extra={"subnet": str(running.keeper.lease.subnet)})
                stop = tg.create_task(self._stop.wait())
                readdress = tg.create_task(self._readdress.wait())
                await asyncio.wait([stop, readdress], return_when=asyncio.FIRST_COMPLETED)
                moved = not self._stop.is_set()
                for task in [*tasks, stop, readdress]:
                    task.cancel()
        except BaseExceptionGroup as group:
            # One line for the user (the CLI prints WeftError), not a traceback of a group.
            leaf = _first_leaf(group)
            if isinstance(leaf, WeftError):
                raise leaf from None
            raise
        finally:
            await self._shutdown(running, final=not moved)
        return moved

    async def _follow_underlay(self, r: Running) -> None:
        """An address came or went on the underlay: is this host's still there? Without
        --public-ip the agent follows the interface (a DHCP renewal, a re-IP'd VM); a
        pinned address that left is an error (peers cannot reach this host), cleared when
        it is back."""
        pinned = self.opts.public_ip is not None
        iface, current = r.host.underlay_ifname, r.host.public_ip
        while True:
            await self._underlay_changed.wait()
            self._underlay_changed.clear()
            present, now = await asyncio.to_thread(underlay_address, iface, current)
            if present:
                if self.health.data_plane.pop(Part.PUBLIC_IP, None) is not None:
                    log.info("public address back", extra={"public_ip": str(current)})
                    self.requests("public address back")
                continue
            if not pinned and now is not None:
                log.warning("underlay address changed; following it",
                            extra={"old": str(current), "new": str(now), "iface": iface})
                self._readdress.set()
                return
            message = (f"--public-ip {current} is no longer an address of {iface}: peers "
                       "cannot reach this host; add it back, or restart the agent with the "
                       "new address" if pinned else
                       f"{iface} has no address left (was {current}): peers cannot reach "
                       "this host until it gets one")
            if self.health.data_plane.get(Part.PUBLIC_IP) != message:
                log.error("public address gone", extra={"public_ip": str(current),
                                                        "iface": iface, "error": message})
                self.health.data_plane[Part.PUBLIC_IP] = message
                self.requests("public address gone")

    def _services(self, r: Running) -> list[Coroutine[Any, Any, None]]:
        """Everything the run's one TaskGroup holds."""
        directories = [self.opts.subnet_file.parent, self.opts.state_dir]

        def host_changed(reason: str) -> None:
            if reason == DESTINATION_NAT_ADDED:
                self._nat_added.set()
            self.requests(reason, host=True)

        def kernel_missed(reason: str) -> None:
            host_changed(reason)
            self._underlay_changed.set()  # the host's address may have moved meanwhile

        return [
            r.reconciler.run(),
            watch_store(self.store, r.store_view, request=self.requests,
                        check_lease=r.keeper.check_record, retry=self.retry,
                        health=self.health, metrics=self.metrics,
                        reassert=r.keeper.reassert),
            r.keeper.run(),
            self._resync(r),
            serve_status_anew(self.opts.state_dir / STATUS_SOCKET, lambda: self._status(r),
                              self._status_restart),
            restarting("kernel events", lambda: watch_kernel(
                r.reconciler.kernel_changed, DEVICE_PREFIX,
                tc_hooks=self.fastpath.fastpath is not None, tables=r.facts.tables,
                underlay=r.host.underlay_ifname,
                underlay_changed=self._underlay_changed.set), missed=kernel_missed),
            self._follow_underlay(r),
            restarting("netfilter events", lambda: watch_netfilter(
                host_changed, r.ingress.own_echo), missed=host_changed),
            restarting("file events", lambda: watch_files(host_changed, directories),
                       missed=host_changed),
            *([r.probes.run()] if r.probes is not None else []),
        ]

    def _summary(self) -> dict[str, Any]:
        """Added to the probes' summary a member's `weft doctor --cluster` gets."""
        return {"errors": len(self.health.reported), "host_errors": sorted(self.health.host)}

    async def _resync(self, r: Running) -> None:
        while True:
            try:
                await asyncio.wait_for(self._nat_added.wait(), self.opts.resync_interval)
            except TimeoutError:
                pass
            else:
                # A DNAT rule appeared: its replies over the overlay must meet conntrack
                # (the untrack rules and the fast path stand down) before the next resync.
                self._nat_added.clear()
                await r.conntrack.ensure(r.keeper.lease)
                continue
            await check_config(self.store, r.config_text, r.config, retry=self.retry,
                               health=self.health)
            await r.conntrack.ensure(r.keeper.lease)  # destination NAT may have come or gone
            self.requests("resync", host=True)

    async def _status(self, r: Running) -> dict[str, Any]:
        """The agent's state, read on the loop; what asks the kernel (counters through `nft`,
        `tc`, `bpftool`; a backend's lock) is read in a worker thread, so a status query
        never stalls renewals and the watch."""
        backend, ingress, fastpath = r.backend, r.ingress, self.fastpath
        lease = r.keeper.lease
        report: dict[str, Any] = {
            "public_ip": str(r.host.public_ip),
            "host_id": r.keeper.host_id,
            "subnet": str(lease.subnet),
            **({"ipv6_subnet": str(lease.ipv6_subnet),
                "public_ipv6": r.host.public_ipv6 and str(r.host.public_ipv6),
                "ipv6_peers": sorted(str(p.ipv6_subnet)
                                     for p in r.reconciler.view.peers.values()
                                     if p.ipv6_subnet is not None)}
               if lease.ipv6_subnet is not None else {}),
            "lease_expires_in": round(lease.expires_in(time.time())),
            "backend": r.config.backend.type,
            # What `weft doctor` holds the host's own state against.
            "network": str(r.config.network),
            "mtu": r.keeper.own.mtu,
            "underlay_iface": r.host.underlay_ifname,
            "encap_port": r.facts.encap_port,
            "devices": [*r.facts.tunnels, *([r.facts.bare_underlay]
                                            if r.facts.bare_underlay else [])],
            "peers": sorted(str(s) for s in r.reconciler.view.peers),
            "revision": r.store_view.revision,
            **self.health.status(),
            "conntrack": r.conntrack.status(),
        }

        def from_the_kernel() -> dict[str, Any]:
            return {"backend_status": dict(backend.status()),
                    "ingress": ingress.status(),
                    "fastpath": fastpath.status()}

        report |= await asyncio.to_thread(from_the_kernel)
        prober = r.probes.prober if r.probes is not None else None
        if prober is not None:
            report["peer_health"] = prober.status()
        return report

    # --- shutdown -----------------------------------------------------------------------

    def _remove_host_rules(self, r: Running) -> None:
        """The masquerade table and the FORWARD accept rules, when the host leaves."""
        try:
            for network in r.config.networks:
                if self.opts.ip_masq:
                    remove_masquerade(network)
                remove_forward_accept(network)
            r.ingress.remove()
        except (WeftError, OSError, subprocess.SubprocessError) as exc:
            log.warning("could not remove weft's firewall rules", extra={"error": str(exc)})

    async def _shutdown(self, r: Running, *, final: bool = True) -> None:
        if not final:  # starting again on a new address: the data plane, store and lock stay
            await asyncio.to_thread(self.fastpath.close)
            await asyncio.to_thread(r.backend.close)
            (self.opts.state_dir / STATUS_SOCKET).unlink(missing_ok=True)
            return
        try:
            await asyncio.to_thread(self.fastpath.close)
            await asyncio.to_thread(r.backend.close)
            if self.opts.release_on_exit:
                held = r.keeper.lease
                log.info("releasing lease and removing the data plane",
                         extra={"subnet": str(held.subnet)})
                try:
                    await self.store.delete_lease(held.subnet, held.ipv6_subnet)
                except StoreError as exc:  # the data plane goes all the same; the lease expires
                    log.warning("could not release the lease", extra={"error": str(exc)})
                await asyncio.to_thread(self._remove_host_rules, r)
                await asyncio.to_thread(r.backend.teardown)
                self.opts.subnet_file.unlink(missing_ok=True)
            else:
                log.info("agent stopped; data plane left in place")
            (self.opts.state_dir / STATUS_SOCKET).unlink(missing_ok=True)
            await self.store.close()
        finally:
            if self._metrics_server is not None:
                await asyncio.to_thread(self._metrics_server.close)
            self._lock.release()


def _underlay_networks(ifname: str) -> tuple[IPNetwork, ...]:
    with Netlink() as nl:
        facts = nl.underlay_facts(ifname)
    return tuple(a.network for a in facts.addresses)


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def parse_ip(value: str | None, flag: str = "--public-ip") -> IPAddress | None:
    if value is None:
        return None
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise UsageError(f"{flag} {value!r} is not an IP address") from None


def parse_ipv6(value: str | None) -> ipaddress.IPv6Address | None:
    address = parse_ip(value, "--public-ipv6")
    if address is not None and not isinstance(address, ipaddress.IPv6Address):
        raise UsageError(f"--public-ipv6 {value!r} is not an IPv6 address")
    return address
