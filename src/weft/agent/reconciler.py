"""The one reconcile worker: the only part that changes the data plane.

Every trigger only asks (`ReconcileRequests`: a store event for the difference, anything
else for a full pass, some also for the host's own state); the worker then converges the
kernel to the newest validated view of the store's leases, one pass at a time:

    host state (if asked)  ->  validate (whole, or the subnets a store event named)
        ->  ingress filter and backend, in the order that is safe  ->  fast path
        ->  publish every peer's error (weft.agent.health)

A failed pass is retried with backoff, as a full one. The kernel events the backend's own
incremental removals cause are its echoes (weft.core.kernel_events): matched by value, they
ask for no repair pass.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from weft.agent.fastpath_state import FastPathState
from weft.agent.health import Health, Part
from weft.agent.metrics import AgentMetrics
from weft.agent.retry import Backoff
from weft.agent.store_watch import StoreView
from weft.backends.base import Backend, IncrementalBackend, ReconcileResult
from weft.backends.registry import backend_data_problem
from weft.core.config import IPAddress, IPNetwork, NetworkConfig
from weft.core.constants import CNI_BRIDGE
from weft.core.errors import WeftError
from weft.core.events import PeerDiff, diff_peers
from weft.core.kernel_events import AddressRemoved, EchoFilter, KernelEvent, concerns_link
from weft.core.lease import Lease
from weft.core.validate import TrustContext, ValidatedView, ViewKeeper
from weft.host.ingress import IngressFilter

log = logging.getLogger("weft.agent")
PeerChange = tuple[list[Lease], list[Lease]]  # the changed peers' old leases, their new ones


class Request(Protocol):
    def __call__(self, reason: str, *, host: bool = False, full: bool = True) -> None: ...


class ReconcileRequests:
    """What the next pass must do; asked for by every part, taken by the worker."""

    def __init__(self) -> None:
        self.wanted = asyncio.Event()
        self.host = True  # the host's own state too (files, nftables, FORWARD, the lock)
        # A store event applies only what it changed; the full level-based pass (dump the
        # kernel, converge everything) runs on start, on resync and after a kernel event.
        self.full = True

    def __call__(self, reason: str, *, host: bool = False, full: bool = True) -> None:
        """Something changed: converge soon. Bursts coalesce into one pass. `full=False`
        (a store event) applies only the difference between the last view and the newest;
        any full request in the burst makes the pass a full one."""
        if host:
            self.host = True
        if full:
            self.full = True
        if not self.wanted.is_set():
            log.debug("reconcile requested", extra={"reason": reason})
        self.wanted.set()


class Reconciler:
    def __init__(self, backend: Backend, store: StoreView, requests: ReconcileRequests, *,
                 config: NetworkConfig, public_ip: IPAddress,
                 public_ipv6: IPAddress | None = None,
                 underlay: tuple[IPNetwork, ...], lease: Callable[[], Lease],
                 converge_host: Callable[[], Awaitable[bool]],
                 ingress: IngressFilter | None, fastpath: FastPathState,
                 stand_down: Callable[[], str | None], health: Health,
                 metrics: AgentMetrics) -> None:
        self.backend = backend
        self.store = store
        self.requests = requests
        self.config = config
        self.public_ip = public_ip
        self.public_ipv6 = public_ipv6
        self.underlay = underlay  # the underlay's networks: a peer's address is checked in them
        self.lease = lease  # this host's lease (the lease keeper's, as it moves)
        self.converge_host = converge_host
        self.ingress = ingress
        self.fastpath = fastpath
        self.stand_down = stand_down  # why the fast path must stand down (weft.agent.conntrack)
        self.health = health
        self.metrics = metrics
        # The one view: validated, kept by difference (a store event re-validates the
        # subnets it named), and what the backend and the ingress filter last received.
        self.keeper = ViewKeeper()
        # Kernel events our own incremental deletions cause (weft's, not a repair to make:
        # each was a full pass of 3N entries per store event).
        self.echoes = EchoFilter()

    @property
    def view(self) -> ValidatedView:
        return self.keeper.view

    @staticmethod
    def _peers6(view: ValidatedView) -> list[IPNetwork]:
        """The peers' IPv6 subnets of a dual-stack network (validated with the view: in the
        IPv6 range, not this host's, claimed by no one else)."""
        return [p.ipv6_subnet for p in view.peers.values() if p.ipv6_subnet is not None]

    async def run(self) -> None:
        backoff = Backoff()
        while True:
            await self.requests.wanted.wait()
            self.requests.wanted.clear()
            if await self.pass_once():
                backoff.reset()
            else:
                await asyncio.sleep(backoff.next())
                self.requests.wanted.set()

    def kernel_changed(self, event: KernelEvent) -> None:
        """The kernel watcher's callback: anything but our own echo asks for a full pass
        (and the host's state too when the container bridge itself changed)."""
        if self.echoes.admit(event):
            self._kernel_event(event)

    def _kernel_event(self, event: KernelEvent) -> None:
        # The container bridge itself, or its gateway address, is the host pass's.
        bridge = concerns_link(event, CNI_BRIDGE) or event == AddressRemoved(CNI_BRIDGE)
        self.requests(str(event), host=bridge)

    def _trust(self) -> TrustContext:
        own = self.lease()
        return TrustContext(self.config, self.public_ip, own.subnet, self.underlay,
                            backend_data_problem, time.time(),
                            own_ipv6_subnet=own.ipv6_subnet, host_ipv6=self.public_ipv6)

    async def pass_once(self) -> bool:
        """One pass over everything the agent owns; False if it must be retried."""
        ok = True
        requests = self.requests
        if requests.host:
            requests.host = False
            if not await self.converge_host():
                # Retried with the worker's backoff: clearing it left the repair (and any
                # request that came in during this pass) to the next resync, 60 s away.
                requests.host, ok = True, False
        full, requests.full = requests.full, False
        named, released = self.store.take_changes()
        before = self.view.peers
        if full:
            view = self.keeper.full(self.store.leases.values(), self._trust(),
                                    released=released)
            diff = diff_peers(before, view.peers)
        else:
            view, touched = self.keeper.update(self.store.leases, named, self._trust(),
                                               released)
            diff = diff_peers(before, view.peers, touched)
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
            result = await self._apply(view, diff, change)
            if ingress and not ingress_first:
                ok = await self._ingress_step(view, change, full=full) and ok
            if result is not None and (result.added or result.removed):
                log.info("reconciled", extra={"added": result.added, "removed": result.removed,
                                              "peers": len(view.peers), "full": full})
            if result is not None and result.errors and not full:
                requests.full = True  # an entry failed: the next pass checks everything
            if full or diff:
                lease = self.lease()
                own = [lease.subnet, *([lease.ipv6_subnet] if lease.ipv6_subnet else [])]
                fastpath_error = await asyncio.to_thread(
                    self.fastpath.apply, own, [*own, *view.peers, *self._peers6(view)],
                    self.stand_down(), full=full)
                if fastpath_error is not None:
                    self.health.data_plane[Part.FASTPATH] = fastpath_error
                    ok = False
        except WeftError as exc:
            self.health.data_plane[Part.RECONCILE] = str(exc)
            ok = False
        except Exception as exc:
            # A bug, or a kernel answer nobody foresaw: logged with its traceback and
            # retried, never the end of the agent (it keeps the data plane it has).
            log.exception("reconcile failed unexpectedly", extra={"error": repr(exc)})
            self.health.data_plane[Part.RECONCILE] = repr(exc)
            ok = False
        finally:
            if full:
                self.metrics.reconciles.inc()
                self.metrics.reconcile_seconds.observe(time.perf_counter() - started)
        if not ok:
            requests.full = True
        new_errors = self.health.publish(view.errors)
        self.metrics.peers.set(len(view.peers))
        six = sum(1 for lease in view.peers.values() if lease.ipv6_subnet is not None)
        four = sum(1 for subnet in view.peers if subnet.version == 4)
        self.metrics.peer_subnets.labels("ipv4").set(four)
        self.metrics.peer_subnets.labels("ipv6").set(len(view.peers) - four + six)
        self.metrics.peer_errors.set(len(self.health.reported))
        self.metrics.reconcile_errors.inc(new_errors)
        return ok

    async def _ingress_step(self, view: ValidatedView,
                            change: PeerChange | None, *, full: bool) -> bool:
        """The underlay ingress filter follows the same validated view (a renewal, no
        diff, leaves it as it is); False when it could not be applied."""
        ingress_error = await asyncio.to_thread(self._apply_ingress, list(view.peers.values()),
                                                change, full)
        if ingress_error is not None:
            self.health.data_plane[Part.INGRESS] = ingress_error
            return False
        self.health.data_plane.pop(Part.INGRESS, None)
        return True

    def _apply_ingress(self, peers: list[Lease], change: PeerChange | None,
                       full: bool) -> str | None:
        """The underlay ingress filter from the validated view (weft.host.ingress): whole on
        a full pass, by difference on a store event; a failure is reported and retried,
        never blocks the backend."""
        if self.ingress is None:
            return None  # a test driving the worker alone
        try:
            self.ingress.apply(self.lease(), peers, full=full, change=change)
        except (WeftError, OSError, subprocess.SubprocessError) as exc:
            log.error("ingress filter not applied", extra={"error": str(exc)})
            return str(exc)
        return None

    async def _apply(self, view: ValidatedView, diff: PeerDiff,
                     change: PeerChange | None) -> ReconcileResult | None:
        """Give the backend the newest view: whole (a full pass) or only what changed
        (`change`). The last view is what the backend holds: a pass that failed is followed
        by a full one."""
        backend = self.backend
        if change is not None and isinstance(backend, IncrementalBackend):
            if not diff:
                return None  # nothing a peer's data plane depends on changed
            result = await self._update(backend, *change)
            if result is not None:
                self.metrics.updates.inc()
                self.health.backend_updated([str(s) for s in diff.subnets()], result.errors)
                return result
        self.echoes.forget()
        peers = sorted(view.peers.values(), key=lambda x: str(x.subnet))
        result = await asyncio.to_thread(backend.reconcile, peers)
        self.health.backend_replaced(result.errors)
        return result

    async def _update(self, backend: IncrementalBackend, removed: Sequence[Lease],
                      added: Sequence[Lease]) -> ReconcileResult | None:
        """The backend's incremental update; kernel events that arrive meanwhile wait until
        it says what it removed (its echoes)."""
        self.echoes.hold()
        result = None
        try:
            result = await asyncio.to_thread(backend.update, removed, added)
        finally:
            for event in self.echoes.settle(result.echoes if result is not None else ()):
                self._kernel_event(event)
        return result


_PEER_LINES = 20  # a join of thousands logs a summary, not a line per peer
_DEBUG_PEER_LINES = 200  # and at debug, the first of them


def _log_peers(diff: PeerDiff) -> None:
    """One info line per peer added, removed or changed, up to `_PEER_LINES` per pass;
    beyond that one summary line, and at debug the first `_DEBUG_PEER_LINES` peers: a
    host joining 5,000 peers spent a measurable part of its join formatting 5,000 log
    lines."""
    lines = [("peer added", lease) for lease in diff.added]
    lines += [("peer removed", lease) for lease in diff.removed]
    lines += [("peer changed", lease) for lease in diff.changed]
    many = len(lines) > _PEER_LINES
    if many:
        log.info("peers changed", extra={"added": len(diff.added), "removed": len(diff.removed),
                                         "changed": len(diff.changed)})
    if many and not log.isEnabledFor(logging.DEBUG):
        return
    for message, lease in lines[:_DEBUG_PEER_LINES]:
        log.log(logging.DEBUG if many else logging.INFO, message,
                extra={"subnet": str(lease.subnet), "public_ip": str(lease.public_ip)})
    if len(lines) > _DEBUG_PEER_LINES:
        log.debug("more peers changed", extra={"not_listed": len(lines) - _DEBUG_PEER_LINES})
