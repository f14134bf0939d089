"""Kernel events that concern weft's state, as values (pure: no I/O).

The agent's kernel watcher turns rtnetlink messages into these (`weft.agent.triggers`),
and a backend's incremental apply names the ones its own deletions will cause as the same
values (`ReconcileResult.echoes`): the reconciler matches the two by equality, so an
expected echo asks for no repair pass and anything else does. `str()` of an event is the
reason the agent logs; nothing compares that text.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from weft.core.config import IPAddress, IPNetwork


@dataclass(frozen=True)
class LinkRemoved:
    name: str

    def __str__(self) -> str:
        return f"link {self.name} deleted"


@dataclass(frozen=True)
class LinkDown:
    name: str

    def __str__(self) -> str:
        return f"link {self.name} is down"


@dataclass(frozen=True)
class LinkAddressChanged:
    """A device's MAC changed under us (peers hold the VTEP's)."""

    name: str

    def __str__(self) -> str:
        return f"link {self.name} address changed"


@dataclass(frozen=True)
class LinkAdded:
    """A new device (with the fast path on: a container's veth to hook)."""

    name: str

    def __str__(self) -> str:
        return f"link {self.name} added"


@dataclass(frozen=True)
class AddressRemoved:
    device: str

    def __str__(self) -> str:
        return f"address removed from {self.device}"


@dataclass(frozen=True)
class RouteRemoved:
    """One of weft's routes (its protocol) removed; the key the kernel knows it by."""

    dst: IPNetwork
    table: int

    def __str__(self) -> str:
        return "route removed"


@dataclass(frozen=True)
class RouteAdded:
    """A unicast route of the main table that is not weft's (a container's, with the fast
    path on)."""

    def __str__(self) -> str:
        return "route added"


@dataclass(frozen=True)
class NeighbourRemoved:
    """A permanent neighbour removed on `device`."""

    device: str
    ip: IPAddress | None

    def __str__(self) -> str:
        return f"neighbour removed on {self.device}"


@dataclass(frozen=True)
class FdbRemoved:
    """A permanent FDB entry (a VTEP's MAC, lower case) removed on `device`."""

    device: str
    mac: str

    def __str__(self) -> str:
        return f"neighbour removed on {self.device}"


@dataclass(frozen=True)
class RuleRemoved:
    """A routing rule for one of weft's tables (auto's fwmark rules) removed."""

    table: int

    def __str__(self) -> str:
        return f"routing rule for table {self.table:#x} removed"


@dataclass(frozen=True)
class TcRemoved:
    """A tc filter or qdisc removed (the fast path's may be among them)."""

    def __str__(self) -> str:
        return "tc filter removed"


KernelEvent = (LinkRemoved | LinkDown | LinkAddressChanged | LinkAdded | AddressRemoved
               | RouteRemoved | RouteAdded | NeighbourRemoved | FdbRemoved | RuleRemoved
               | TcRemoved)
LinkEvent = LinkRemoved | LinkDown | LinkAddressChanged | LinkAdded


def concerns_link(event: KernelEvent, name: str) -> bool:
    """Whether `event` is about the device `name` itself (removed, down, re-addressed,
    added)."""
    return isinstance(event, LinkEvent) and event.name == name


class EchoFilter:
    """Which kernel events are the echoes of weft's own incremental changes.

    Expected echoes are counted: each one matches one event. While an update runs its
    echoes are not known yet, so events arriving then are held and matched once the
    update says what it deleted (`settle`)."""

    def __init__(self) -> None:
        self._expected: Counter[KernelEvent] = Counter()
        self._held: list[KernelEvent] | None = None

    def admit(self, event: KernelEvent) -> bool:
        """True when `event` is a change to repair; False for an echo, or for an event held
        until the running update settles."""
        if self._expected[event] > 0:
            self._expected[event] -= 1
            return False
        if self._held is not None:
            self._held.append(event)
            return False
        return True

    def hold(self) -> None:
        """An update starts: hold what arrives until it says what it caused."""
        self._held = []

    def settle(self, echoes: Iterable[KernelEvent]) -> list[KernelEvent]:
        """The update ended having caused `echoes`: the held events that are not among
        them, each a change to repair."""
        self._expected.update(echoes)
        held, self._held = self._held or [], None
        return [event for event in held if self.admit(event)]

    def forget(self) -> None:
        """A full pass checks everything: echoes still expected would only hide a removal."""
        self._expected.clear()
