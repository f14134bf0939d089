"""The agent: the daemon on each host.

    config ──▶ acquire/reclaim lease ──▶ backend up ──▶ subnet.env, forwarding, masquerade
                                           │
          one TaskGroup: watch peers ──▶ reconcile   renew lease   status socket

Reconciliation is level-based: every change folds into the full lease view and the
backend converges the kernel to it. On SIGTERM the agent exits and leaves the data plane
standing, so a restart drops no traffic; `--release-on-exit` is for a host that leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
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

from weft.agent.leasing import acquire_lease
from weft.agent.metrics import AgentMetrics
from weft.agent.status import STATUS_SOCKET, serve_status
from weft.backends.base import Backend
from weft.backends.registry import create_backend
from weft.core.config import IPAddress, NetworkConfig, parse_config
from weft.core.constants import DEFAULT_LEASE_TTL, DEFAULT_STATE_DIR, DEFAULT_SUBNET_FILE
from weft.core.errors import (
    LeaseNotFound,
    StoreUnavailable,
    UsageError,
    WatchCompacted,
    WeftError,
)
from weft.core.events import LeaseMap, apply_events, diff_peers
from weft.core.host import HostContext
from weft.core.lease import Lease
from weft.host.forward_accept import ensure_forward_accept, remove_forward_accept
from weft.host.masquerade import install_masquerade, remove_masquerade
from weft.host.system import detect_host, enable_forwarding, require_root
from weft.integrations.subnet_env import SubnetEnv, write_subnet_env
from weft.store import LeaseStore

log = logging.getLogger("weft.agent.daemon")
T = TypeVar("T")

@dataclass
class AgentOptions:
    store: LeaseStore
    public_ip: IPAddress | None = None
    iface: str | None = None
    subnet_file: Path = Path(DEFAULT_SUBNET_FILE)
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    lease_ttl: float = DEFAULT_LEASE_TTL
    ip_masq: bool = True
    metrics_addr: str | None = None
    release_on_exit: bool = False
    # Converge the kernel again now and then even when no lease changed: repairs what
    # someone else deleted and restarts a data-plane helper that died (wireguard-go).
    resync_interval: float = 60.0


@dataclass
class Backoff:
    """Exponential backoff with jitter for store retries (pure but for the sleep)."""

    initial: float = 0.5
    cap: float = 15.0
    current: float = field(default=0.0, init=False)

    def next(self) -> float:
        self.current = min(self.cap, self.current * 2 if self.current else self.initial)
        return self.current * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.current = 0.0


class Agent:
    def __init__(self, options: AgentOptions) -> None:
        self.opts = options
        self.store = options.store
        self.metrics = AgentMetrics()
        self.config: NetworkConfig | None = None
        self.backend: Backend | None = None
        self.host: HostContext | None = None
        self.lease: Lease | None = None
        self.leases: LeaseMap = {}
        self.revision = 0
        self.last_errors: dict[str, str] = {}
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()

    # --- start-up -----------------------------------------------------------------------

    async def _retry(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run a store operation until it succeeds; the store being down is not fatal."""
        backoff = Backoff()
        while True:
            try:
                return await op()
            except StoreUnavailable as exc:
                self.metrics.store_errors.inc()
                delay = backoff.next()
                log.warning("store unavailable; retrying",
                            extra={"op": what, "error": str(exc), "retry_in": round(delay, 2)})
                await asyncio.sleep(delay)

    async def _load_config(self) -> NetworkConfig:
        text = await self._retry("get config", self.store.get_config)
        if text is None:
            raise UsageError("the store holds no network config: run `weft config set FILE`")
        return parse_config(text)

    async def start(self) -> None:
        require_root()
        self.config = config = await self._load_config()
        # pyroute2's sync API runs its own event loop, so netlink work happens off this one.
        self.host = host = await asyncio.to_thread(
            detect_host, self.opts.public_ip, self.opts.iface, self.opts.state_dir
        )
        host.state_dir.mkdir(parents=True, exist_ok=True)
        self.backend = backend = create_backend(config, host)
        data = await asyncio.to_thread(backend.prepare)
        lease, reclaimed = await self._retry(
            "acquire lease",
            lambda: acquire_lease(self.store, config, host.public_ip, config.backend.type,
                                  data, self.opts.lease_ttl),
        )
        self._set_lease(lease)
        log.info("lease reclaimed" if reclaimed else "lease acquired",
                 extra={"subnet": str(lease.subnet), "public_ip": str(host.public_ip),
                        "expires_in": round(lease.expires_in(time.time()))})
        mtu = await asyncio.to_thread(backend.activate, lease)
        enable_forwarding(config.network.version)
        await self._ensure_forward_accept()
        if self.opts.ip_masq:
            install_masquerade(config.network, lease.subnet)
        write_subnet_env(self.opts.subnet_file,
                         SubnetEnv(config.network, lease.subnet, mtu, self.opts.ip_masq))
        self.metrics.export_backend(backend.status)
        leases, self.revision = await self._retry("list leases", self.store.list_leases)
        # The first pass also removes what an earlier run left that no lease wants.
        await self._update({lease.subnet: lease for lease in leases})
        if self.opts.metrics_addr:
            self.metrics.serve(self.opts.metrics_addr)

    def _set_lease(self, lease: Lease) -> None:
        self.lease = lease
        self.metrics.lease_expiry.set(lease.expiration)

    # --- reconcile ----------------------------------------------------------------------

    async def _update(self, leases: LeaseMap) -> None:
        assert self.backend is not None
        assert self.lease is not None
        own = self.lease.subnet
        before = {s: lease for s, lease in self.leases.items() if s != own}
        after = {s: lease for s, lease in leases.items() if s != own}
        self.leases = leases
        diff = diff_peers(before, after)
        for lease in diff.added:
            log.info("peer added", extra={"subnet": str(lease.subnet),
                                          "public_ip": str(lease.public_ip)})
        for lease in diff.removed:
            log.info("peer removed", extra={"subnet": str(lease.subnet),
                                            "public_ip": str(lease.public_ip)})
        for lease in diff.changed:
            log.info("peer changed", extra={"subnet": str(lease.subnet),
                                            "public_ip": str(lease.public_ip)})
        started = time.perf_counter()
        try:
            peers = sorted(after.values(), key=lambda x: str(x.subnet))
            result = await asyncio.to_thread(self.backend.reconcile, peers)
        except WeftError as exc:
            self.metrics.reconcile_errors.inc()
            self.last_errors = {"reconcile": str(exc)}
            log.error("reconcile failed", extra={"error": str(exc)})
            return
        finally:
            self.metrics.reconciles.inc()
            self.metrics.reconcile_seconds.observe(time.perf_counter() - started)
        self.metrics.peers.set(len(after))
        self.last_errors = result.errors
        for peer, message in result.errors.items():
            self.metrics.reconcile_errors.inc()
            log.error("reconcile error for peer", extra={"peer": peer, "error": message})
        if result.added or result.removed:
            log.info("reconciled", extra={"added": result.added, "removed": result.removed,
                                          "peers": len(after)})

    async def _watch(self) -> None:
        backoff = Backoff()
        while True:
            try:
                async for events in self.store.watch(self.revision):
                    backoff.reset()
                    self.revision = events[-1].revision
                    await self._update(apply_events(self.leases, events))
                    self.ready.set()
            except WatchCompacted as exc:
                log.warning("watch history compacted; resyncing from a full list",
                            extra={"error": str(exc)})
                leases, self.revision = await self._retry("list leases", self.store.list_leases)
                await self._update({lease.subnet: lease for lease in leases})
            except StoreUnavailable as exc:
                self.metrics.store_errors.inc()
                delay = backoff.next()
                log.warning("watch lost the store; the data plane stays as it is",
                            extra={"error": str(exc), "retry_in": round(delay, 2)})
                await asyncio.sleep(delay)

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.opts.resync_interval)
            await self._ensure_forward_accept()  # Docker may have started since
            await self._update(self.leases)

    async def _ensure_forward_accept(self) -> None:
        """Keep overlay traffic through a dropping FORWARD chain; a failure is logged and
        retried at the next resync, never fatal (hosts without Docker do not need it)."""
        assert self.config is not None
        try:
            await asyncio.to_thread(ensure_forward_accept, self.config.network)
        except (WeftError, OSError, subprocess.SubprocessError) as exc:
            log.warning("could not add the FORWARD accept rules", extra={"error": str(exc)})

    async def _renew(self) -> None:
        assert self.lease is not None
        assert self.config is not None
        assert self.host is not None
        backoff = Backoff()
        while True:
            delay = max(0.0, self.lease.renew_at(self.opts.lease_ttl) - time.time())
            await asyncio.sleep(delay)
            try:
                lease = await self.store.renew_lease(self.lease, self.opts.lease_ttl)
            except StoreUnavailable as exc:
                self.metrics.store_errors.inc()
                wait = min(backoff.next(), max(0.5, self.lease.expires_in(time.time()) / 4))
                log.warning("lease renewal failed; retrying",
                            extra={"error": str(exc), "retry_in": round(wait, 2)})
                await asyncio.sleep(wait)
                continue
            except LeaseNotFound:
                # Our lease expired (the store was away longer than the TTL). Take the
                # same subnet back if it is still free; otherwise the host must restart.
                log.error("lease lost; trying to take the same subnet back",
                          extra={"subnet": str(self.lease.subnet)})
                created = await self._retry(
                    "recreate lease",
                    functools.partial(self.store.create_lease, self.lease, self.opts.lease_ttl),
                )
                if created is None:
                    raise WeftError(
                        f"lease for {self.lease.subnet} was lost and another host took the "
                        "subnet; restart the agent to acquire a new one"
                    ) from None
                lease = created
            backoff.reset()
            self._set_lease(lease)
            self.metrics.lease_renewals.inc()
            log.info("lease renewed", extra={"subnet": str(lease.subnet),
                                             "expires_in": round(lease.expires_in(time.time()))})

    # --- status socket ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        assert self.backend is not None
        assert self.host is not None
        lease = self.lease
        backend_status: Mapping[str, Any] = self.backend.status()
        return {
            "public_ip": str(self.host.public_ip),
            "subnet": str(lease.subnet) if lease else None,
            "lease_expires_in": round(lease.expires_in(time.time())) if lease else None,
            "backend": self.config.backend.type if self.config else None,
            "backend_status": dict(backend_status),
            "peers": sorted(str(s) for s in self.leases if lease is None or s != lease.subnet),
            "revision": self.revision,
            "errors": self.last_errors,
        }

    async def _serve_status(self) -> None:
        await serve_status(self.opts.state_dir / STATUS_SOCKET, self.status)

    # --- run ----------------------------------------------------------------------------

    async def run(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self._watch()), tg.create_task(self._renew()),
                         tg.create_task(self._resync()), tg.create_task(self._serve_status())]
                self.ready.set()
                log.info("agent running", extra={"subnet": str(self.lease.subnet if self.lease
                                                               else "")})
                await self._stop.wait()
                for task in tasks:
                    task.cancel()
        finally:
            await self._shutdown()

    def _remove_host_rules(self) -> None:
        """The masquerade table and the FORWARD accept rules, when the host leaves."""
        assert self.config is not None
        try:
            if self.opts.ip_masq:
                remove_masquerade(self.config.network)
            remove_forward_accept(self.config.network)
        except (WeftError, OSError, subprocess.SubprocessError) as exc:
            log.warning("could not remove weft's firewall rules", extra={"error": str(exc)})

    async def _shutdown(self) -> None:
        assert self.backend is not None
        await asyncio.to_thread(self.backend.close)
        if self.opts.release_on_exit and self.lease is not None:
            log.info("releasing lease and removing the data plane",
                     extra={"subnet": str(self.lease.subnet)})
            with contextlib.suppress(StoreUnavailable):
                await self.store.delete_lease(self.lease.subnet)
            await asyncio.to_thread(self._remove_host_rules)
            await asyncio.to_thread(self.backend.teardown)
            self.opts.subnet_file.unlink(missing_ok=True)
        else:
            log.info("agent stopped; data plane left in place")
        (self.opts.state_dir / STATUS_SOCKET).unlink(missing_ok=True)
        await self.store.close()


def parse_ip(value: str | None) -> IPAddress | None:
    if value is None:
        return None
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise UsageError(f"--public-ip {value!r} is not an IP address") from None
