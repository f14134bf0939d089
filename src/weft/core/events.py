"""Lease events and what they change. Pure: no I/O, no clock.

A store's watch yields `LeaseEvent`s in revision order. The agent folds them into its
view of all leases (`apply_events`) and says what changed between two views
(`diff_peers`): the backend applies that difference, and the whole view on a full pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

from weft.core.config import IPNetwork
from weft.core.lease import Lease, same_peer


class EventKind(Enum):
    PUT = "put"  # created, renewed or changed
    DELETE = "delete"  # released or expired


@dataclass(frozen=True)
class LeaseEvent:
    kind: EventKind
    subnet: IPNetwork
    revision: int
    lease: Lease | None = None  # set for PUT


LeaseMap = dict[IPNetwork, Lease]


def apply_events(leases: Mapping[IPNetwork, Lease], events: Iterable[LeaseEvent]) -> LeaseMap:
    """The lease view after `events`, without mutating `leases`."""
    out = dict(leases)
    for event in events:
        if event.kind is EventKind.PUT and event.lease is not None:
            out[event.subnet] = event.lease
        else:
            out.pop(event.subnet, None)
    return out


@dataclass(frozen=True)
class PeerDiff:
    added: tuple[Lease, ...]
    removed: tuple[Lease, ...]
    changed: tuple[Lease, ...]  # same subnet, different public IP or backend data

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def subnets(self) -> list[IPNetwork]:
        return [lease.subnet for group in (self.added, self.removed, self.changed)
                for lease in group]


def changes_data(leases: Mapping[IPNetwork, Lease], events: Iterable[LeaseEvent]) -> bool:
    """Whether `events` change anything but expiries: a round of renewals does not, and
    needs no reconcile anywhere (the store's TTL, not the agents, removes a lease)."""
    view = dict(leases)
    changed = False
    for event in events:
        before = view.get(event.subnet)
        if event.kind is EventKind.PUT and event.lease is not None:
            changed |= before is None or not same_peer(before, event.lease)
            view[event.subnet] = event.lease
        else:
            changed |= before is not None
            view.pop(event.subnet, None)
    return changed


def diff_peers(before: Mapping[IPNetwork, Lease], after: Mapping[IPNetwork, Lease],
               subnets: Iterable[IPNetwork] | None = None) -> PeerDiff:
    """What changed between two views; with `subnets`, only among those (a store event's:
    the rest is known to be the same, and comparing it is O(N) per event)."""
    if subnets is not None:
        before = {s: before[s] for s in subnets if s in before}
        after = {s: after[s] for s in subnets if s in after}
    added = tuple(lease for subnet, lease in after.items() if subnet not in before)
    removed = tuple(lease for subnet, lease in before.items() if subnet not in after)
    changed = tuple(
        lease
        for subnet, lease in after.items()
        if subnet in before and not same_peer(before[subnet], lease)
    )
    return PeerDiff(added, removed, changed)
