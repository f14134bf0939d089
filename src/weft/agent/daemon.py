"""The agent: the daemon on each host.

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
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import random
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from weft.agent.fastpath_state import FastPathState
from weft.agent.host_state import HostState, converge_host_state
from weft.agent.leasing import acquire_lease
from weft.agent.lock import StateDirLock
from weft.agent.metrics import AgentMetrics
from weft.agent.status import STATUS_SOCKET, serve_status
from weft.agent.triggers import watch_files, watch_kernel, watch_netfilter
from weft.backends.base import Backend, IncrementalBackend, ReconcileResult
from weft.backends.registry import backend_data_problem, create_backend
from weft.core.config import IPAddress, IPNetwork, NetworkConfig, parse_config
from weft.core.constants import (
    CNI_BRIDGE,
    DEFAULT_LEASE_TTL,
    DEFAULT_STATE_DIR,
    DEFAULT_SUBNET_FILE,
)
from weft.core.errors import (
    ConfigError,
    LeaseNotFound,
    NetworkFull,
    StoreError,
    StoreUnavailable,
    UsageError,
    WatchCompacted,
    WeftError,
)
from weft.core.events import (
    EventKind,
    LeaseMap,
    PeerDiff,
    apply_events,
    changes_data,
    diff_peers,
)
from weft.core.host import HostContext
from weft.core.lease import Lease
from weft.core.validate import TrustContext, ValidatedView, ViewKeeper
from weft.host.files import private_dir
from weft.host.forward_accept import overlay_devices, remove_forward_accept
from weft.host.ingress import IngressFilter
from weft.host.masquerade import (
    ConntrackDecision,
    ConntrackMode,
    decide_conntrack,
    encap_port,
    host_dnat_tables,
    install_masquerade,
    remove_masquerade,
)
from weft.host.netlink import Netlink
from weft.host.system import detect_host, enable_forwarding, require_root
from weft.host.untrack import Untrack
from weft.integrations.subnet_env import SubnetEnv, read_subnet_env
from weft.store import LeaseStore

log = logging.getLogger("weft.agent")
T = TypeVar("T")
PeerChange = tuple[list[Lease], list[Lease]]  # the changed peers' old leases, their new ones

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
    # The tc BPF fast path for overlay <-> overlay packets (weft.agent.fastpath_state).
    fastpath: bool = False


@dataclass
class Backoff:
    """Exponential backoff with jitter for retries (pure but for the sleep)."""

    initial: float = 0.5
    cap: float = 15.0
    current: float = field(default=0.0, init=False)

    def next(self) -> float:
        self.current = min(self.cap, self.current * 2 if self.current else self.initial)
        return self.current * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.current = 0.0


class PeerErrorLog:
    """Per-peer errors, logged when they appear or change and when they clear, not on
    every pass (a bad record in the store must not flood the log)."""

    def __init__(self) -> None:
        self.current: dict[str, str] = {}

    def update(self, errors: Mapping[str, str]) -> None:
        for peer, message in errors.items():
            if self.current.get(peer) != message:
                log.error("peer not usable", extra={"peer": peer, "error": message})
        for peer in self.current.keys() - errors.keys():
            log.info("peer error cleared", extra={"peer": peer})
        self.current = dict(errors)


class Agent:
    def __init__(self, options: AgentOptions) -> None:
        self.opts = options
        self.store = options.store
        self.metrics = AgentMetrics()
        self.config: NetworkConfig | None = None
        self.config_text: str | None = None
        self.backend: Backend | None = None
        self.host: HostContext | None = None
        self.lease: Lease | None = None
        self.ingress: IngressFilter | None = None
        self.mtu = 0
        self.leases: LeaseMap = {}  # everything the store holds, unvalidated
        self.view = ValidatedView({})  # what the last reconcile used
        self._applied: dict[IPNetwork, Lease] = {}  # the peers the backend last received
        # The validated view kept by difference: a store event re-validates the subnets
        # it named (`_pending`, since the last pass), not every lease.
        self._keeper = ViewKeeper()
        self._pending: set[IPNetwork] = set()
        # Subnets whose record the store deleted since the last pass: a new holder there
        # took a free subnet (create-if-absent), not the running lease's (not an overwrite).
        self._released: set[IPNetwork] = set()
        self._rejected_seen: dict[str, str] = {}  # the store's non-lease records, last seen
        # Kernel removal notices our own incremental deletions cause (weft's, not a repair
        # to make: each was a full pass of 3N entries per store event), and those that
        # arrive while an update runs, matched once it says what it deleted.
        self._echoes: collections.Counter[str] = collections.Counter()
        self._updating = False
        self._held: list[str] = []
        self.revision = 0
        self.peer_errors = PeerErrorLog()
        self.host_errors: dict[str, str] = {}
        self.notices: dict[str, str] = {}  # e.g. a config change that needs a restart
        self.conntrack: ConntrackDecision | None = None  # what the masquerade table does
        self._untrack: Untrack | None = None
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._dirty = asyncio.Event()
        self._host_dirty = True
        # A store event applies only what it changed; the full level-based pass (dump the
        # kernel, converge everything) runs on start, on resync and after a kernel event.
        self._full_dirty = True
        self._backend_errors: dict[str, str] = {}  # from the backend's plans and kernel
        self._renew_now = asyncio.Event()
        self._status_restart = asyncio.Event()
        self._lock = StateDirLock(options.state_dir)
        self._underlay: tuple[IPNetwork, ...] = ()
        self.fastpath = FastPathState(options.fastpath)

    # --- start-up -----------------------------------------------------------------------

    async def _retry(self, what: str, op: Callable[[], Awaitable[T]], *,
                     refusals: str | None = None) -> T:
        """Run a store operation until it succeeds; the store being down is not fatal, nor,
        for a running agent, the store refusing it: then `refusals` names the notice that
        says so (see `_refused`). What the store answers (a lease gone, a network full, a
        compacted history) is the caller's."""
        backoff = Backoff()
        while True:
            try:
                result = await op()
            except StoreUnavailable as exc:
                self.metrics.store_errors.inc()
                delay = backoff.next()
                log.warning("store unavailable; retrying",
                            extra={"op": what, "error": str(exc), "retry_in": round(delay, 2)})
                await asyncio.sleep(delay)
            except (LeaseNotFound, NetworkFull, WatchCompacted):
                raise
            except StoreError as exc:
                if refusals is None:
                    raise
                self._refused(refusals, what, exc)
                await asyncio.sleep(backoff.next())
            else:
                if refusals is not None:
                    self.notices.pop(refusals, None)
                return result

    def _refused(self, notice: str, what: str, exc: StoreError) -> None:
        """The store refused a running agent (its permissions changed, say). Stopping would
        let this host's lease run out with nobody left to take it back, so the subnet and
        the data plane stay and the caller asks again; `weft status` says so, and the log
        does when the refusal is new or changes (a refusal answers at once: no log flood)."""
        self.metrics.store_errors.inc()
        message = f"the store refuses this host's {what}: {exc}"
        if self.notices.get(notice) != message:
            log.error("store refused; retrying", extra={"op": what, "error": str(exc)})
        self.notices[notice] = message

    async def _load_config(self) -> tuple[str, NetworkConfig]:
        text = await self._retry("get config", self.store.get_config)
        if text is None:
            raise UsageError("the store holds no network config: run `weft config set FILE`")
        return text, parse_config(text)

    async def start(self) -> None:
        self.store.starting(START_DEADLINE)
        try:
            await self._start()
        finally:
            self.store.starting(None)

    async def _start(self) -> None:
        require_root()
        state_dir = self.opts.state_dir
        try:
            # Root's alone, or refused: one line naming the path and why (weft.host.files).
            private_dir(state_dir, "state directory (--state-dir)")
            private_dir(self.opts.subnet_file.parent, "subnet file directory", mode=0o755)
        except OSError as exc:
            raise UsageError(
                f"cannot create {exc.filename or state_dir} ({exc.strerror})") from None
        self._lock.acquire()
        self.config_text, config = await self._load_config()
        self.config = config
        # pyroute2's sync API runs its own event loop, so netlink work happens off this one.
        self.host = host = await asyncio.to_thread(
            detect_host, self.opts.public_ip, self.opts.iface, state_dir
        )
        self._underlay = await asyncio.to_thread(self._underlay_networks)
        self.backend = backend = create_backend(config, host)
        tunnels, bare = overlay_devices(config, host.underlay_ifname)
        self.ingress = IngressFilter(config, host.public_ip, peer_iifs=(
            (*tunnels, *((bare,) if bare else ())) if config.backend.type == "auto" else ()))
        self.metrics.export_ingress(config.backend.type, self.ingress.counters)
        data = await asyncio.to_thread(backend.prepare)
        listings: list[tuple[list[Lease], int]] = []
        lease, reclaimed = await self._retry(
            "acquire lease",
            lambda: acquire_lease(self.store, config, host.public_ip, config.backend.type,
                                  data, self.opts.lease_ttl,
                                  on_list=lambda *listing: listings.append(listing)),
        )
        log.info("lease reclaimed" if reclaimed else "lease acquired",
                 extra={"subnet": str(lease.subnet), "public_ip": str(host.public_ip),
                        "expires_in": round(lease.expires_in(time.time()))})
        await self._leave_previous_subnet(lease)
        await self._take_lease(lease)
        enable_forwarding(config.network.version)
        await asyncio.to_thread(self.fastpath.start, config, lease.subnet,
                                host.underlay_ifname, state_dir)
        self.metrics.export_backend(backend.status)
        # The view starts from the listing the lease was chosen by (at 5,000 leases a second
        # listing was a tenth of the join); the watch from its revision brings what came
        # after, our own lease's write included.
        leases, self.revision = listings[-1]
        self.leases = {x.subnet: x for x in leases}
        self.leases[lease.subnet] = lease
        # The first pass runs here, so what goes wrong on start-up reaches the caller; it
        # also removes what an earlier run left that no lease wants.
        await self._reconcile_once()
        if self.opts.metrics_addr:
            self.metrics.serve(self.opts.metrics_addr)

    async def _leave_previous_subnet(self, lease: Lease) -> None:
        """A host back after its lease expired and another host took the subnet gets a
        new one; the old one (named by the subnet.env it wrote) must leave its data plane,
        or two hosts answer for the same container addresses."""
        try:
            previous = read_subnet_env(self.opts.subnet_file).subnet
        except UsageError:
            return  # none, or not ours to read: nothing is known about a previous subnet
        if previous == lease.subnet:
            return
        await self._release_lost_subnet(previous)
        self._note_moved(previous, lease.subnet)

    async def _release_lost_subnet(self, subnet: IPNetwork) -> None:
        """Stop answering for a subnet another host holds now (its gateway address leaves
        the container bridge) and say which local containers that strands."""
        stranded = await asyncio.to_thread(_release_subnet, subnet)
        log.error("this host's previous subnet is held by another host now; released it",
                  extra={"subnet": str(subnet),
                         "stranded_containers": ", ".join(stranded) or "none",
                         "action": "restart the stranded containers to give them addresses "
                                   "in the new subnet"})

    def _note_moved(self, old: IPNetwork, new: IPNetwork) -> None:
        self.notices["lease"] = (f"subnet {old} was taken by another host while this one "
                                 f"was away; now {new}")

    def _underlay_networks(self) -> tuple[IPNetwork, ...]:
        assert self.host is not None
        with Netlink() as nl:
            facts = nl.underlay_facts(self.host.underlay_ifname)
        return tuple(a.network for a in facts.addresses)

    async def _take_lease(self, lease: Lease) -> None:
        """Make `lease` this host's: the backend's own address and MTU, subnet.env."""
        assert self.backend is not None
        self.lease = lease
        self.metrics.lease_expiry.set(lease.expiration)
        self.mtu = await asyncio.to_thread(self.backend.activate, lease)
        if self.opts.ip_masq:
            # Replaced whole: the table names the subnet, which may be a new one. Later
            # passes only put it back if it is missing, or rewrite it when the conntrack
            # decision changes (_ensure_masquerade at every resync).
            self.conntrack = None
            await self._ensure_masquerade()
        self._host_dirty = True

    # --- reconcile: one worker ----------------------------------------------------------

    def request(self, reason: str, *, host: bool = False, full: bool = True) -> None:
        """Something changed: converge soon. Bursts coalesce into one pass. `full=False`
        (a store event) applies only the difference between the last view and the newest;
        any full request in the burst makes the pass a full one."""
        if host:
            self._host_dirty = True
        if full:
            self._full_dirty = True
        if not self._dirty.is_set():
            log.debug("reconcile requested", extra={"reason": reason})
        self._dirty.set()

    def _trust(self) -> TrustContext:
        assert self.config is not None
        assert self.host is not None
        return TrustContext(self.config, self.host.public_ip,
                            self.lease.subnet if self.lease else None, self._underlay,
                            backend_data_problem, time.time())

    def _host_state(self) -> HostState:
        assert self.config is not None
        assert self.lease is not None
        assert self.host is not None
        return HostState(self.config.network, self.opts.subnet_file, self.opts.state_dir,
                         SubnetEnv(self.config.network, self.lease.subnet, self.mtu,
                                   self.opts.ip_masq), self.opts.ip_masq,
                         overlay_devices(self.config, self.host.underlay_ifname), self._untrack)

    async def _reconcile_once(self) -> bool:
        """One pass over everything the agent owns; False if it must be retried."""
        assert self.backend is not None
        ok = True
        if self._host_dirty:
            self._host_dirty = False
            self.host_errors = await asyncio.to_thread(converge_host_state, self._host_state())
            try:
                if self._lock.reassert():
                    log.warning("host state repaired",
                                extra={"part": "lock", "action": f"relocked {self._lock.path}"})
            except (UsageError, OSError) as exc:
                self.host_errors["lock"] = str(exc)
            if not (self.opts.state_dir / STATUS_SOCKET).exists():
                self._status_restart.set()
            if self.host_errors:
                log.error("could not repair host state", extra=self.host_errors)
                # Retried with the worker's backoff: clearing it left the repair (and any
                # request that came in during this pass) to the next resync, 60 s away.
                self._host_dirty, ok = True, False
        full, self._full_dirty = self._full_dirty, False
        named, self._pending = self._pending, set()
        released, self._released = self._released, set()
        before = self.view.peers
        if full:
            view = self._keeper.full(self.leases.values(), self._trust(), released=released)
            diff = diff_peers(before, view.peers)
        else:
            view, touched = self._keeper.update(self.leases, named, self._trust(), released)
            diff = diff_peers(before, view.peers, touched)
        self.view = view
        _log_peers(diff)
        # A store event's changed peers, old leases and new (a changed peer is in both).
        change = None if full else ([before[s] for s in diff.subnets() if s in before],
                                    [view.peers[s] for s in diff.subnets() if s in view.peers])
        started = time.perf_counter()
        try:
            # Order: a removed peer leaves the ingress filter first (the safe side: its
            # packets are refused before its routes go); an added peer's routes, FDB and
            # neighbour reach the kernel first (the filter only guards incoming traffic,
            # and rebuilding it is not what the new peer's traffic waits for).
            ingress = bool(full or diff)
            ingress_first = bool(diff.removed or diff.changed or not diff.added)
            if ingress and ingress_first:
                ok = await self._ingress_step(view, change, full=full) and ok
            result = await self._apply(view, diff, full=full)
            if ingress and not ingress_first:
                ok = await self._ingress_step(view, change, full=full) and ok
            if result is not None and (result.added or result.removed):
                log.info("reconciled", extra={"added": result.added, "removed": result.removed,
                                              "peers": len(view.peers), "full": full})
            if result is not None and result.errors and not full:
                self._full_dirty = True  # an entry failed: the next pass checks everything
            if (full or diff) and self.lease is not None:
                # The fast path skips netfilter: only where overlay packets skip conntrack
                # (a DNATed connection's reply must meet conntrack to be un-NATed).
                # No masquerade table (--ip-masq=false): nothing untracks, all is tracked.
                stand_down = (
                    "overlay traffic is tracked: --ip-masq=false installs no notrack rules"
                    if self.conntrack is None else
                    None if self.conntrack.untracked else
                    f"overlay traffic is tracked: {self.conntrack.reason}")
                fastpath_error = await asyncio.to_thread(
                    self.fastpath.apply, self.lease.subnet, [self.lease.subnet, *view.peers],
                    stand_down)
                if fastpath_error is not None:
                    self._backend_errors["fastpath"] = fastpath_error
                    ok = False
        except WeftError as exc:
            self._backend_errors["reconcile"] = str(exc)
            ok = False
        except Exception as exc:
            # A bug, or a kernel answer nobody foresaw: logged with its traceback and
            # retried, never the end of the agent (it keeps the data plane it has).
            log.exception("reconcile failed unexpectedly", extra={"error": repr(exc)})
            self._backend_errors["reconcile"] = repr(exc)
            ok = False
        finally:
            if full:
                self.metrics.reconciles.inc()
                self.metrics.reconcile_seconds.observe(time.perf_counter() - started)
        if not ok:
            self._full_dirty = True
        # Records that are not even leases (a bad key or value) are reported by their key.
        errors = {**self.store.rejected.by_key, **view.errors} | self._backend_errors
        self.metrics.peers.set(len(view.peers))
        self.metrics.peer_errors.set(len(errors))
        self.metrics.reconcile_errors.inc(len(errors.keys() - self.peer_errors.current.keys()))
        self.peer_errors.update(errors)
        return ok

    async def _ingress_step(self, view: ValidatedView,
                            change: PeerChange | None, *, full: bool) -> bool:
        """The underlay ingress filter follows the same validated view (a renewal, no
        diff, leaves it as it is); False when it could not be applied."""
        ingress_error = await asyncio.to_thread(self._apply_ingress, list(view.peers.values()),
                                                change, full)
        if ingress_error is not None:
            self._backend_errors["ingress"] = ingress_error
            return False
        self._backend_errors.pop("ingress", None)
        return True

    def _apply_ingress(self, peers: list[Lease], change: PeerChange | None,
                       full: bool) -> str | None:
        """The underlay ingress filter from the validated view (weft.host.ingress): whole on
        a full pass, by difference on a store event; a failure is reported and retried,
        never blocks the backend."""
        if self.ingress is None or self.lease is None:
            return None  # not started (a test driving the worker alone)
        try:
            self.ingress.apply(self.lease, peers, full=full, change=change)
        except (WeftError, OSError, subprocess.SubprocessError) as exc:
            log.error("ingress filter not applied", extra={"error": str(exc)})
            return str(exc)
        return None

    async def _apply(self, view: ValidatedView, diff: PeerDiff, *, full: bool
                     ) -> ReconcileResult | None:
        """Give the backend the newest view: whole (full) or only what changed."""
        assert self.backend is not None
        backend = self.backend
        if not full and isinstance(backend, IncrementalBackend):
            if not diff:
                return None  # nothing a peer's data plane depends on changed
            removed = [self._applied[s] for s in diff.subnets() if s in self._applied]
            added = [view.peers[s] for s in diff.subnets() if s in view.peers]
            self._updating = True
            result = None
            try:
                result = await asyncio.to_thread(backend.update, removed, added)
            finally:
                self._updating = False
                self._echoes.update(result.echoes if result is not None else ())
                held, self._held = self._held, []
                for reason in held:
                    self._kernel_changed(reason)
            if result is not None:
                self.metrics.updates.inc()
                for subnet in diff.subnets():
                    self._backend_errors.pop(str(subnet), None)
                self._backend_errors.pop("reconcile", None)
                self._backend_errors.update(result.errors)
                self._applied = dict(view.peers)
                return result
        # A full pass checks everything: echoes still expected would only hide a removal.
        self._echoes.clear()
        peers = sorted(view.peers.values(), key=lambda x: str(x.subnet))
        result = await asyncio.to_thread(backend.reconcile, peers)
        ingress = self._backend_errors.get("ingress")
        self._backend_errors = dict(result.errors)
        if ingress is not None:
            self._backend_errors["ingress"] = ingress
        self._applied = dict(view.peers)
        return result

    async def _reconciler(self) -> None:
        backoff = Backoff()
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            if await self._reconcile_once():
                backoff.reset()
                self.ready.set()
            else:
                await asyncio.sleep(backoff.next())
                self._dirty.set()

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.opts.resync_interval)
            await self._check_config()
            await self._ensure_masquerade()  # destination NAT may have come or gone
            self.request("resync", host=True)

    async def _check_config(self) -> None:
        """A config changed in the store is not applied live (a new Network or backend
        would renumber every container): it is refused loudly until the agent restarts."""
        try:
            text = await self.store.get_config()
        except StoreUnavailable:  # the next resync asks again
            return
        except StoreError as exc:
            self._refused("store_config", "config check", exc)
            return
        self.notices.pop("store_config", None)
        if text == self.config_text or text is None:
            self.notices.pop("config", None)
            return
        try:
            changed = parse_config(text) != self.config
        except ConfigError as exc:
            message = f"the config in the store is invalid and was not applied: {exc}"
        else:
            if not changed:
                return
            message = ("the network config in the store changed; it is not applied to a "
                       "running agent: restart `weft agent` on every host to apply it")
        if self.notices.get("config") != message:
            log.error("config change refused", extra={"error": message})
        self.notices["config"] = message

    # --- the store ----------------------------------------------------------------------

    async def _watch(self) -> None:
        backoff = Backoff()
        while True:
            try:
                async for events in self.store.watch(self.revision):
                    backoff.reset()
                    self.notices.pop("store_watch", None)
                    if events:  # empty: only the records that are not leases changed
                        self.revision = events[-1].revision
                    # A record that is not a lease going away changes no lease, but its
                    # error must leave every status: the store's rejected set counts too.
                    rejected = dict(self.store.rejected.by_key)
                    changed = (changes_data(self.leases, events) or not events
                               or rejected != self._rejected_seen)
                    self._rejected_seen = rejected
                    self.leases = apply_events(self.leases, events)
                    # Renewals too: the next pass takes their new expiries into the view.
                    self._pending.update(event.subnet for event in events)
                    self._released.update(event.subnet for event in events
                                          if event.kind is EventKind.DELETE)
                    self._check_own_lease()
                    if changed:
                        self.request("store", full=False)
                    else:  # renewals: the expiry moved, nothing a data plane depends on
                        self.metrics.store_events_ignored.inc(len(events))
            except WatchCompacted as exc:
                log.warning("watch history compacted; resyncing from a full list",
                            extra={"error": str(exc)})
                leases, self.revision = await self._retry("list leases", self.store.list_leases,
                                                          refusals="store_watch")
                self._pending.update(self.leases)  # whatever the missed history changed
                self.leases = {lease.subnet: lease for lease in leases}
                self._pending.update(self.leases)
                self._check_own_lease()
                self.request("store resync", full=False)
            except StoreUnavailable as exc:
                self.metrics.store_errors.inc()
                delay = backoff.next()
                log.warning("watch lost the store; the data plane stays as it is",
                            extra={"error": str(exc), "retry_in": round(delay, 2)})
                await asyncio.sleep(delay)
            except StoreError as exc:  # refusing us: ask again (see `_refused`)
                self._refused("store_watch", "watch", exc)
                await asyncio.sleep(backoff.next())

    def _check_own_lease(self) -> None:
        """Our subnet gone from the store, or held by someone else: renew (or move) now,
        not at the next renewal."""
        if self.lease is None:
            return
        held = self.leases.get(self.lease.subnet)
        if held is None or held.public_ip != self.lease.public_ip:
            self._renew_now.set()

    async def _ensure_masquerade(self) -> None:
        """The nftables table, with overlay traffic untracked unless destination NAT
        elsewhere on the host needs it tracked; rewritten only when the decision changes.
        The first install's failure is fatal (as before); later ones are logged."""
        assert self.config is not None
        assert self.lease is not None
        assert self.host is not None
        if not self.opts.ip_masq:
            return
        first = self.conntrack is None
        try:
            # Looked for in every mode, so status tells when `untrack` breaks a DNAT.
            dnat = await asyncio.to_thread(host_dnat_tables)
            decision = decide_conntrack(self.opts.overlay_conntrack, dnat)
            if decision == self.conntrack:
                return
            untrack = Untrack(self.lease.own_address.ip, self.host.public_ip,
                              encap_port(self.config.backend)) if decision.untracked else None
            await asyncio.to_thread(install_masquerade, self.config.network,
                                    self.lease.subnet, untrack)
            self._untrack = untrack
            if self.ingress is not None and self.ingress.untrack != untrack:
                # Prerouting's notrack rules live in the ingress filter's chain.
                self.ingress.untrack = untrack
                if not first:
                    self.request("overlay conntrack decision")
        except (WeftError, OSError, subprocess.SubprocessError) as exc:
            if first:
                raise
            log.warning("could not update the masquerade table", extra={"error": str(exc)})
            return
        self.conntrack = decision
        log.info("overlay conntrack", extra=decision.to_json())

    async def _renew(self) -> None:
        assert self.lease is not None
        backoff = Backoff()
        retry = False  # a renewal that failed on the store is tried again, not at renew_at
        while True:
            delay = 0.0 if retry else max(0.0, self.lease.renew_at(self.opts.lease_ttl)
                                           - time.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._renew_now.wait()
            self._renew_now.clear()
            retry = False
            try:
                renewed: Lease | None = await self.store.renew_lease(self.lease,
                                                                     self.opts.lease_ttl)
            except LeaseNotFound:
                if self._lease_overwritten():
                    # Wait for the record to go (the watch wakes us) or our lease to end.
                    wait = min(backoff.next(), max(0.5, self.lease.expires_in(time.time())))
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._renew_now.wait()
                    continue
                renewed = None  # recovered below, outside this handler
            except StoreError as exc:
                # Unreachable, or a refusal (a record rewritten under every attempt, its
                # permissions changed): ask again soon, while the lease runs. Also a renewal
                # asked for early (our record went away): waiting for the scheduled time
                # would leave this host without a lease for hours.
                remaining = self.lease.expires_in(time.time())
                step = backoff.next()
                wait = min(step, max(0.5, remaining / 4)) if remaining > 0 else step
                if isinstance(exc, StoreUnavailable):
                    self.metrics.store_errors.inc()
                    log.warning("lease renewal failed; retrying",
                                extra={"error": str(exc), "retry_in": round(wait, 2)})
                else:
                    self._refused("store", "lease renewal", exc)
                await asyncio.sleep(wait)
                retry = True
                continue
            lease = renewed if renewed is not None else await self._recover_lease()
            self.notices.pop("store", None)
            backoff.reset()
            self.lease = lease
            self.metrics.lease_expiry.set(lease.expiration)
            self.metrics.lease_renewals.inc()
            log.info("lease renewed", extra={"subnet": str(lease.subnet),
                                             "expires_in": round(lease.expires_in(time.time()))})

    def _lease_overwritten(self) -> bool:
        """Our subnet's record names another host while our lease still runs. No host
        takes a subnet before its lease expires (create-if-absent), so something else
        wrote it: keep the subnet (moving would strand every container here) and say so;
        if the record is still there when our lease ends, it is a takeover after all."""
        assert self.lease is not None
        held = self.leases.get(self.lease.subnet)
        if (held is None or held.public_ip == self.lease.public_ip
                or self.lease.expires_in(time.time()) <= 0):
            if self.notices.pop("lease_conflict", None):
                log.info("lease conflict cleared", extra={"subnet": str(self.lease.subnet)})
            return False
        message = (f"the store's record of this host's subnet {self.lease.subnet} names "
                   f"{held.public_ip} while this host's lease still runs: written by "
                   "something else; this host keeps its subnet (delete the record to clear "
                   "this)")
        if self.notices.get("lease_conflict") != message:
            log.error("lease record overwritten; keeping the subnet",
                      extra={"subnet": str(self.lease.subnet), "claimed_by": str(held.public_ip),
                             "error": message})
        self.notices["lease_conflict"] = message
        return True

    async def _recover_lease(self) -> Lease:
        """Our lease expired (the store was away longer than the TTL, or the host came back
        late). Take the same subnet back if it is free; if another host took it, this host
        must stop answering for it at once and move to a new subnet."""
        assert self.lease is not None
        assert self.config is not None
        assert self.host is not None
        old = self.lease
        log.error("lease lost; trying to take the same subnet back",
                  extra={"subnet": str(old.subnet)})
        created = await self._retry(
            "recreate lease", lambda: self.store.create_lease(old, self.opts.lease_ttl),
            refusals="store")
        if created is not None:
            return created
        await self._release_lost_subnet(old.subnet)  # at once, before a new one is leased
        config, host = self.config, self.host
        lease, _ = await self._retry(
            "acquire lease",
            lambda: acquire_lease(self.store, config, host.public_ip, config.backend.type,
                                  old.backend_data, self.opts.lease_ttl), refusals="store")
        await self._take_lease(lease)
        self._note_moved(old.subnet, lease.subnet)
        log.info("lease acquired", extra={"subnet": str(lease.subnet)})
        self.request("new lease", host=True)
        return lease

    # --- status socket ------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """The agent's state, read on the loop; what asks the kernel (counters through `nft`,
        `tc`, `bpftool`; a backend's lock) is read in a worker thread, so a status query
        never stalls renewals and the watch."""
        assert self.backend is not None
        assert self.host is not None
        backend, ingress, fastpath = self.backend, self.ingress, self.fastpath
        lease = self.lease
        report: dict[str, Any] = {
            "public_ip": str(self.host.public_ip),
            "subnet": str(lease.subnet) if lease else None,
            "lease_expires_in": round(lease.expires_in(time.time())) if lease else None,
            "backend": self.config.backend.type if self.config else None,
            "peers": sorted(str(s) for s in self.view.peers),
            "revision": self.revision,
            "errors": dict(self.peer_errors.current),
            "host_errors": dict(self.host_errors),
            "notices": dict(self.notices),
            "conntrack": self.conntrack.to_json() if self.conntrack else None,
        }

        def from_the_kernel() -> dict[str, Any]:
            return {"backend_status": dict(backend.status()),
                    "ingress": ingress.status() if ingress else None,
                    "fastpath": fastpath.status()}

        return report | await asyncio.to_thread(from_the_kernel)

    async def _serve_status(self) -> None:
        while True:
            self._status_restart.clear()
            server = asyncio.create_task(
                serve_status(self.opts.state_dir / STATUS_SOCKET, self.status))
            await self._status_restart.wait()  # the socket was removed: serve it anew
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await server

    # --- run ----------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self.start()
        except BaseException:
            self._lock.release()
            raise
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        directories = [self.opts.subnet_file.parent, self.opts.state_dir]
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self._reconciler()),
                    tg.create_task(self._watch()), tg.create_task(self._renew()),
                    tg.create_task(self._resync()), tg.create_task(self._serve_status()),
                    tg.create_task(self._guard(
                        "kernel events", lambda: watch_kernel(
                            self._kernel_changed, DEVICE_PREFIX,
                            tc_hooks=self.fastpath.fastpath is not None))),
                    tg.create_task(self._guard(
                        "netfilter events", lambda: watch_netfilter(
                            self._host_changed,
                            self.ingress.own_echo if self.ingress else None))),
                    tg.create_task(self._guard(
                        "file events", lambda: watch_files(self._host_changed, directories))),
                ]
                self.ready.set()
                log.info("agent running", extra={"subnet": str(self.lease.subnet if self.lease
                                                               else "")})
                await self._stop.wait()
                for task in tasks:
                    task.cancel()
        except BaseExceptionGroup as group:
            # One line for the user (the CLI prints WeftError), not a traceback of a group.
            leaf = _first_leaf(group)
            if isinstance(leaf, WeftError):
                raise leaf from None
            raise
        finally:
            await self._shutdown()

    def _kernel_changed(self, reason: str) -> None:
        if self._echoes[reason] > 0:  # our own store-event deletion, told in advance
            self._echoes[reason] -= 1
            return
        if self._updating:
            self._held.append(reason)  # may be the echo of the update now running
            return
        self.request(reason, host=reason.startswith(f"link {CNI_BRIDGE}"))

    def _host_changed(self, reason: str) -> None:
        self.request(reason, host=True)

    async def _guard(self, name: str, watcher: Callable[[], Awaitable[None]]) -> None:
        """A change watcher that fails is restarted; the periodic resync covers the gap."""
        backoff = Backoff(initial=1.0, cap=30.0)
        while True:
            try:
                await watcher()
                return
            except Exception as exc:
                delay = backoff.next()
                log.warning("change watcher failed; restarting it",
                            extra={"watcher": name, "error": repr(exc),
                                   "retry_in": round(delay, 2)})
                await asyncio.sleep(delay)

    def _remove_host_rules(self) -> None:
        """The masquerade table and the FORWARD accept rules, when the host leaves."""
        assert self.config is not None
        try:
            if self.opts.ip_masq:
                remove_masquerade(self.config.network)
            if self.host is not None:
                remove_forward_accept(self.config.network, *overlay_devices(
                    self.config, self.host.underlay_ifname))
            if self.ingress is not None:
                self.ingress.remove()
        except (WeftError, OSError, subprocess.SubprocessError) as exc:
            log.warning("could not remove weft's firewall rules", extra={"error": str(exc)})

    async def _shutdown(self) -> None:
        try:
            assert self.backend is not None
            await asyncio.to_thread(self.fastpath.close)
            await asyncio.to_thread(self.backend.close)
            if self.opts.release_on_exit and self.lease is not None:
                log.info("releasing lease and removing the data plane",
                         extra={"subnet": str(self.lease.subnet)})
                try:
                    await self.store.delete_lease(self.lease.subnet)
                except StoreError as exc:  # the data plane goes all the same; the lease expires
                    log.warning("could not release the lease", extra={"error": str(exc)})
                await asyncio.to_thread(self._remove_host_rules)
                await asyncio.to_thread(self.backend.teardown)
                self.opts.subnet_file.unlink(missing_ok=True)
            else:
                log.info("agent stopped; data plane left in place")
            (self.opts.state_dir / STATUS_SOCKET).unlink(missing_ok=True)
            await self.store.close()
        finally:
            self._lock.release()


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _release_subnet(subnet: IPNetwork) -> list[str]:
    """Stop answering for a subnet this host no longer holds: its gateway address leaves
    the container bridge. Returns the containers (neighbours on the bridge) left in it."""
    with Netlink() as nl:
        bridge = nl.link(CNI_BRIDGE)
        if bridge is None:
            return []
        stranded = sorted(str(n.ip) for n in nl.neighbours(bridge.index, permanent=False)
                          if n.ip in subnet)
        nl.remove_addresses_in(bridge.index, subnet)
    return stranded


def parse_ip(value: str | None) -> IPAddress | None:
    if value is None:
        return None
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise UsageError(f"--public-ip {value!r} is not an IP address") from None


_PEER_LINES = 20  # a join of thousands logs a summary, not a line per peer


def _log_peers(diff: PeerDiff) -> None:
    """One info line per peer added, removed or changed, up to `_PEER_LINES` per pass;
    beyond that one summary line (the rest at debug): a host joining 5,000 peers spent
    a measurable part of its join formatting 5,000 log lines."""
    lines = [("peer added", lease) for lease in diff.added]
    lines += [("peer removed", lease) for lease in diff.removed]
    lines += [("peer changed", lease) for lease in diff.changed]
    many = len(lines) > _PEER_LINES
    if many:
        log.info("peers changed", extra={"added": len(diff.added), "removed": len(diff.removed),
                                         "changed": len(diff.changed)})
    if many and not log.isEnabledFor(logging.DEBUG):
        return
    for message, lease in lines:
        log.log(logging.DEBUG if many else logging.INFO, message,
                extra={"subnet": str(lease.subnet), "public_ip": str(lease.public_ip)})
