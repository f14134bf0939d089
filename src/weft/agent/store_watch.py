"""The store as the agent follows it: every lease it holds (unvalidated), kept current by
the watch, re-listed after a compaction, and what changed since the reconciler last
looked. Also the periodic config check: a changed config is refused, loudly."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from weft.agent.health import Health, Notice
from weft.agent.metrics import AgentMetrics
from weft.agent.retry import Backoff, StoreRetry
from weft.backends.registry import parse_config
from weft.core.config import IPNetwork, NetworkConfig
from weft.core.errors import (
    ConfigError,
    StoreError,
    StoreRewound,
    StoreUnavailable,
    WatchCompacted,
)
from weft.core.events import EventKind, LeaseEvent, LeaseMap, apply_events, changes_data
from weft.core.lease import Lease
from weft.store import LeaseStore

if TYPE_CHECKING:
    from weft.agent.reconciler import Request

log = logging.getLogger("weft.agent")


class OwnDeletions:
    """Whether this host's record was deleted (or vanished in a re-list) since the lease
    keeper last wrote it: the watch marks, the keeper reads and clears. Another host's
    record there then took a free subnet; without a deletion, something wrote over ours."""

    def __init__(self) -> None:
        self.subnet: IPNetwork | None = None
        self.deleted = False

    def written(self, subnet: IPNetwork) -> None:
        self.subnet, self.deleted = subnet, False

    def __call__(self, subnet: IPNetwork) -> bool:
        return self.deleted and subnet == self.subnet


class StoreView:
    def __init__(self, leases: Iterable[Lease], revision: int) -> None:
        self.leases: LeaseMap = {lease.subnet: lease for lease in leases}
        self.revision = revision
        self.own = OwnDeletions()
        # Leases a store that went back in time lost while they ran (their hosts re-assert
        # them): never taken by this host.
        self.vanished: LeaseMap = {}
        # The subnets a store event named since the last pass (renewals too: the next pass
        # takes their new expiries into the view); only those are validated again.
        self._pending: set[IPNetwork] = set()
        # Subnets whose record the store deleted since the last pass: a new holder there
        # took a free subnet (create-if-absent), not the running lease's (not an overwrite).
        self._released: set[IPNetwork] = set()
        self._rejected_seen: dict[str, str] = {}  # the store's non-lease records, last seen

    def record(self, subnet: IPNetwork) -> Lease | None:
        return self.leases.get(subnet)

    def take_changes(self) -> tuple[set[IPNetwork], set[IPNetwork]]:
        """(named, released) since the last call."""
        named, self._pending = self._pending, set()
        released, self._released = self._released, set()
        return named, released

    def apply(self, events: list[LeaseEvent], rejected: Mapping[str, str]) -> bool:
        """Fold a watch batch in; True if a peer's data (not only an expiry) changed, or
        the store's records that are not leases did (their errors must leave every
        status: a batch is empty when only they changed)."""
        if events:
            self.revision = events[-1].revision
        changed = (changes_data(self.leases, events) or not events
                   or rejected != self._rejected_seen)
        self._rejected_seen = dict(rejected)
        self.leases = apply_events(self.leases, events)
        self._pending.update(event.subnet for event in events)
        self._released.update(event.subnet for event in events
                              if event.kind is EventKind.DELETE)
        if any(e.kind is EventKind.DELETE and e.subnet == self.own.subnet for e in events):
            self.own.deleted = True
        return changed

    def relist(self, leases: Iterable[Lease], revision: int, *,
               rewound_at: float | None = None) -> None:
        """A full listing after the watch's history was compacted, or the store went back
        in time (`rewound_at`: now): then the leases it lost that had not ended are kept
        aside as held by live hosts (they re-assert them), never to be taken."""
        self.revision = revision
        self._pending.update(self.leases)  # whatever the missed history changed
        before = self.leases
        self.leases = {lease.subnet: lease for lease in leases}
        self._pending.update(self.leases)
        if rewound_at is not None:
            self.vanished.update((s, lease) for s, lease in before.items()
                                 if s not in self.leases and _live(lease, rewound_at))
            self.vanished = {s: lease for s, lease in self.vanished.items()
                             if _live(lease, rewound_at)}
        if self.own.subnet is not None and self.own.subnet not in self.leases:
            self.own.deleted = True

    def live_subnets(self, now: float) -> set[IPNetwork]:
        """The subnets whose last known lease has not ended: held by a live host, even if
        a store restored from an older snapshot no longer lists them."""
        return {s for leases in (self.leases, self.vanished)
                for s, lease in leases.items() if _live(lease, now)}


def _live(lease: Lease, now: float) -> bool:
    return lease.expiration == 0.0 or lease.expires_in(now) > 0


async def watch_store(store: LeaseStore, view: StoreView, *, request: Request,
                      check_lease: Callable[[], None], retry: StoreRetry, health: Health,
                      metrics: AgentMetrics, reassert: Callable[[], None] | None = None) -> None:
    """Follow the store from `view.revision`; every change asks for a pass by difference
    (`request(reason, full=False)`) and lets the lease keeper look at our own record
    (`check_lease`). The store away or refusing us ends nothing: the data plane stays. After
    a compaction or a store gone back in time, the view is listed anew and `reassert`
    (renew this host's lease now) is called."""
    reassert = reassert or check_lease
    backoff = Backoff()
    while True:
        try:
            async for events in store.watch(view.revision):
                backoff.reset()
                health.clear(Notice.STORE_WATCH)
                changed = view.apply(events, store.rejected.by_key)
                check_lease()
                if changed:
                    request("store", full=False)
                else:  # renewals: the expiry moved, nothing a data plane depends on
                    metrics.store_events_ignored.inc(len(events))
        except (WatchCompacted, StoreRewound) as exc:
            # Either way what the watch missed is unknown: list again, and put this host's
            # lease back at once if the store lost it (not at the next renewal: 12 h away
            # with the default TTL, while a new host could take the subnet).
            rewound = isinstance(exc, StoreRewound)
            if rewound:
                log.error("the store went back in time; re-listing and re-asserting this "
                          "host's lease", extra={"error": str(exc)})
            else:
                log.warning("watch history compacted; resyncing from a full list",
                            extra={"error": str(exc)})
            leases, revision = await retry.call("list leases", store.list_leases,
                                                refusals=Notice.STORE_WATCH)
            view.relist(leases, revision, rewound_at=time.time() if rewound else None)
            reassert()
            request("store resync", full=False)
        except StoreUnavailable as exc:
            retry.unavailable()
            delay = backoff.next()
            log.warning("watch lost the store; the data plane stays as it is",
                        extra={"error": str(exc), "retry_in": round(delay, 2)})
            await asyncio.sleep(delay)
        except StoreError as exc:  # refusing us: ask again (see `StoreRetry.refused`)
            retry.refused(Notice.STORE_WATCH, "watch", exc)
            await asyncio.sleep(backoff.next())


async def check_config(store: LeaseStore, config_text: str, config: NetworkConfig, *,
                       retry: StoreRetry, health: Health) -> None:
    """A config changed in the store is not applied live (a new Network or backend
    would renumber every container): it is refused loudly until the agent restarts."""
    try:
        text = await store.get_config()
    except StoreUnavailable:  # the next resync asks again
        return
    except StoreError as exc:
        retry.refused(Notice.STORE_CONFIG, "config check", exc)
        return
    health.clear(Notice.STORE_CONFIG)
    if text == config_text or text is None:
        health.clear(Notice.CONFIG)
        return
    try:
        changed = parse_config(text) != config
    except ConfigError as exc:
        message = f"the config in the store is invalid and was not applied: {exc}"
    else:
        if not changed:
            return
        message = ("the network config in the store changed; it is not applied to a "
                   "running agent: restart `weft agent` on every host to apply it")
    if health.notice(Notice.CONFIG, message):
        log.error("config change refused", extra={"error": message})
