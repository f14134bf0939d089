"""The agent's single reconcile worker, driven by a real SQLite store's watch: bursts of
events coalesce, the newest view always wins, and two passes never overlap."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import time
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

from bounded import run
from weft.agent.fastpath_state import FastPathState
from weft.agent.health import Health
from weft.agent.metrics import AgentMetrics
from weft.agent.reconciler import Reconciler, ReconcileRequests
from weft.agent.retry import StoreRetry
from weft.agent.store_watch import StoreView, watch_store
from weft.backends.base import ReconcileResult
from weft.backends.registry import parse_config
from weft.core.lease import Lease
from weft.store.sqlite import SqliteLeaseStore

CONFIG = parse_config('{"Network": "198.19.0.0/16", "SubnetLen": 24}')
OWN = Lease(ipaddress.ip_network("198.19.1.0/24"), ipaddress.ip_address("198.18.0.1"), "vxlan",
            {"VtepMAC": "02:00:00:00:00:01"})


def peer(n: int) -> Lease:
    return Lease(ipaddress.ip_network(f"198.19.{n}.0/24"), ipaddress.ip_address(f"198.18.0.{n}"),
                 "vxlan", {"VtepMAC": f"02:00:00:00:00:{n:02x}"})


class SlowBackend:
    """A backend seam that takes its time and records what it was asked, and when."""

    def __init__(self, delay: float, fail_first: int = 0,
                 gate: threading.Event | None = None) -> None:
        self.delay = delay
        self.fail_first = fail_first
        self.gate = gate  # the first pass waits for it: the test says when it may end
        self.calls: list[frozenset[str]] = []
        self.active = 0
        self.overlapped = False
        self._lock = threading.Lock()

    def reconcile(self, peers: Sequence[Lease]) -> ReconcileResult:
        with self._lock:
            self.active += 1
            self.overlapped |= self.active > 1
        try:
            if self.gate is not None and not self.calls:
                self.gate.wait(30)
            time.sleep(self.delay)
            self.calls.append(frozenset(str(p.subnet) for p in peers))
            if len(self.calls) <= self.fail_first:
                raise RuntimeError("a bug in the backend")
            return ReconcileResult(added=len(peers))
        finally:
            with self._lock:
                self.active -= 1

    def status(self) -> Mapping[str, Any]:
        return {}


class Parts:
    """The worker and the store watch, handed a fake backend and a real store: nothing
    of the host (files, nftables, the kernel) is touched."""

    def __init__(self, store: SqliteLeaseStore, backend: SlowBackend) -> None:
        self.store = store
        self.health = Health(lambda: store.rejected.by_key)
        self.metrics = AgentMetrics()
        self.retry = StoreRetry(self.health, self.metrics.store_errors.inc)
        self.requests = ReconcileRequests()
        self.view = StoreView([], 0)

        async def host_state_in_place() -> bool:  # the netns suites' business
            return True

        self.worker = Reconciler(
            backend, self.view, self.requests,  # type: ignore[arg-type]
            config=CONFIG, public_ip=OWN.public_ip, underlay=(), lease=lambda: OWN,
            converge_host=host_state_in_place, ingress=None, fastpath=FastPathState(False),
            stand_down=lambda: None, health=self.health, metrics=self.metrics)

    def watch(self) -> Coroutine[Any, Any, None]:
        return watch_store(self.store, self.view, request=self.requests,
                           check_lease=lambda: None, retry=self.retry, health=self.health,
                           metrics=self.metrics)


async def _until(predicate: Any) -> None:
    """Poll: the worker's state changes in a thread and on the loop, with no event to await."""
    async with asyncio.timeout(10.0):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def test_a_burst_coalesces_and_the_newest_view_is_applied_last(tmp_path: Path) -> None:
    """21 store events while one pass runs: the worker runs ONE more pass, with the newest
    view. The first pass is held until the watch has taken every event in (the store's
    last revision), so the count does not depend on how fast this machine is."""
    gate = threading.Event()

    async def scenario() -> SlowBackend:
        writer = SqliteLeaseStore(str(tmp_path / "store.db"))
        reader = SqliteLeaseStore(str(tmp_path / "store.db"))
        backend = SlowBackend(delay=0.0, gate=gate)
        parts = Parts(reader, backend)
        async with asyncio.TaskGroup() as tg:
            worker = tg.create_task(parts.worker.run())
            watch = tg.create_task(parts.watch())
            await writer.create_lease(peer(2), 60)
            await _until(lambda: backend.active == 1)  # the first pass, held
            for n in range(3, 22):  # 20 changes while the first pass is still running
                await writer.create_lease(peer(n), 60)
            await writer.delete_lease(peer(5).subnet)
            _, last = await writer.list_leases()
            await _until(lambda: parts.view.revision >= last)
            gate.set()
            want = frozenset(f"198.19.{n}.0/24" for n in range(2, 22) if n != 5)
            await _until(lambda: backend.calls and backend.calls[-1] == want and
                         not parts.requests.wanted.is_set() and backend.active == 0)
            worker.cancel()
            watch.cancel()
        await writer.close()
        await reader.close()
        return backend

    try:
        backend = run(scenario())
    finally:
        gate.set()
    assert not backend.overlapped
    assert len(backend.calls) == 2  # the held pass, then one for all 21 events
    assert backend.calls[-1] == frozenset(f"198.19.{n}.0/24" for n in range(2, 22) if n != 5)


def test_a_pass_that_raises_is_retried_and_the_worker_lives_on(tmp_path: Path) -> None:
    async def scenario() -> tuple[SlowBackend, dict[str, str]]:
        store = SqliteLeaseStore(str(tmp_path / "store.db"))
        backend = SlowBackend(delay=0.0, fail_first=1)
        parts = Parts(store, backend)
        parts.view.relist([peer(2)], 0)
        parts.requests("test")
        async with asyncio.TaskGroup() as tg:
            worker = tg.create_task(parts.worker.run())
            # The second call starts in a thread; its pass clears the error on the loop
            # after it returns: wait for that end, not the call's start (the race CI hit).
            await _until(lambda: len(backend.calls) >= 2 and not parts.health.reported)
            errors = dict(parts.health.reported)
            worker.cancel()
        await store.close()
        return backend, errors

    backend, errors = run(scenario())
    assert backend.calls == [frozenset({"198.19.2.0/24"})] * 2
    assert errors == {}  # the retry succeeded and cleared the error


def test_a_poisoned_lease_never_reaches_the_backend(tmp_path: Path) -> None:
    async def scenario() -> tuple[SlowBackend, dict[str, str]]:
        store = SqliteLeaseStore(str(tmp_path / "store.db"))
        backend = SlowBackend(delay=0.0)
        parts = Parts(store, backend)
        bad = Lease(ipaddress.ip_network("198.19.9.0/24"), ipaddress.ip_address("198.18.0.9"),
                    "vxlan", {"VtepMAC": "zz"})
        parts.view.relist([peer(2), bad, OWN], 0)
        await parts.worker.pass_once()
        await store.close()
        return backend, dict(parts.health.reported)

    backend, errors = run(scenario())
    assert backend.calls == [frozenset({"198.19.2.0/24"})]
    assert "VtepMAC 'zz'" in errors["198.19.9.0/24"]
