"""The backend seam: a backend turns leases into data-plane state. It never talks to the store.

Lifecycle, driven by the agent:

    backend = create_backend(config, host)   # weft.backends.registry
    data = backend.prepare()          # ensure devices exist; BackendData for our lease
    mtu = backend.activate(lease)     # configure our own subnet; the overlay MTU
    backend.reconcile(peers)          # level-based, idempotent; called on every change
    backend.close()                   # SIGTERM: stop our threads/processes, leave the
                                      # kernel data plane in place so nothing is dropped
    backend.teardown()                # remove everything the backend owns (host leaving)

What the rest of the host needs to know about a backend (its ports, devices, overhead) it
learns from the backend's `BackendFacts`, never by asking which backend it is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from weft.core.config import BackendOptions, NetworkConfig
from weft.core.host import HostContext
from weft.core.kernel_events import KernelEvent
from weft.core.lease import Lease

T = TypeVar("T")
OptionsT = TypeVar("OptionsT", bound=BackendOptions)


@dataclass(frozen=True)
class BackendFacts:
    """What the host's filters, the fast path and the agent need to know about a backend,
    as plain values (as flannel's trafficmngr takes networks and ports, never backend
    types). Each backend declares its own, from its options and the underlay's name."""

    # Bytes the encapsulation adds to every packet on the underlay, by its IP version.
    overhead: Mapping[int, int]
    # The UDP port encapsulated packets use on the underlay: the ingress filter accepts it
    # from member hosts only, and the host's own encapsulated packets skip conntrack.
    # None: nothing encapsulated (host-gw).
    encap_port: int | None = None
    # In dual stack, the port encapsulated packets use on the IPv6 underlay when it is
    # another (wireguard's second device listens on its own): filtered as `encap_port`,
    # from the members' PublicIPv6. None: the same port.
    encap_port6: int | None = None
    # The ingress filter's members are (address, port), the port from each peer's lease
    # (udp); else addresses alone.
    members_by_port: bool = False
    # With `members_by_port`: a peer is a member on the IPv6 underlay only if its
    # BackendV6Data holds this key as true (udp's: a copy of BackendData, which a host of
    # an earlier weft publishes there, never does). None: any BackendV6Data port.
    member6_marker: str | None = None
    # The tunnel devices overlay traffic enters and leaves by.
    tunnels: tuple[str, ...] = ()
    # The underlay, when overlay packets cross it unencapsulated (host-gw, DirectRouting).
    bare_underlay: str | None = None
    # Where overlay packets for this host arrive unencapsulated, for the tc fast path;
    # None: a backend the fast path does not serve.
    arrival: str | None = None
    # Dual stack's IPv6 underlay device, where overlay packets arrive too on a host that has
    # one (vxlan's second device): the fast path's as well.
    arrival6: tuple[str, ...] = ()
    # Devices a peer's overlay source may arrive on whichever way the route back to it
    # goes (auto: a peer may send on another plane than ours to it); empty: the ingress
    # filter's strict reverse-path check.
    peer_iifs: tuple[str, ...] = ()
    # Routing tables the backend owns: a rule selecting one that is removed is repaired.
    tables: frozenset[int] = frozenset()
    # Every packet between hosts is encrypted and authenticated.
    encrypted: bool = False


def why_no_ipv6_underlay(config: NetworkConfig, host: HostContext,
                         carrier: str = "the IPv4 one") -> str | None:
    """None where a backend's IPv6 half gets a device or socket of its own on the IPv6
    underlay (dual stack over an IPv4 PublicIP, on a host with an IPv6 underlay address
    too); else why not, for its status. `carrier`: what carries both families instead."""
    if not config.dual_stack:
        return "not dual stack: no IPv6 overlay"
    if host.public_ip.version == 6:
        return f"the PublicIP is IPv6: {carrier} carries both families over the IPv6 underlay"
    if host.public_ipv6 is None:
        return ("this host has no IPv6 underlay address beside its IPv4 PublicIP: every "
                f"peer's IPv6 subnet rides {carrier} over IPv4")
    return None


def by_ip_version(overhead: Callable[[int], int]) -> dict[int, int]:
    """An overhead function's answers for IPv4 and IPv6 underlays."""
    return {version: overhead(version) for version in (4, 6)}


@dataclass(frozen=True)
class BackendSpec(Generic[OptionsT]):
    """One backend, as the registry (`weft.backends.registry`) knows it."""

    options: type[OptionsT]  # validated from the config's `Backend`
    factory: str  # "module:Class", a class taking (NetworkConfig, HostContext)
    facts: Callable[[OptionsT, str], BackendFacts]  # (its options, the underlay's name)
    overhead: Callable[[int], int]  # bytes added to every packet, by outer IP version
    data_problem: Callable[[Mapping[str, Any]], str | None]  # a peer's BackendData, checked
    # Why this backend cannot carry a dual-stack network (said at `weft config set`), or
    # None when it can.
    no_dual_stack: str | None = "it carries one address family only, so far"
    # An IPv6 overlay is routed via IPv6 next hops on the underlay (host-gw): the kernel
    # takes no IPv4 next hop for an IPv6 route, so each host needs an IPv6 underlay address.
    ipv6_next_hops: bool = False
    # Tunnel devices a dual-stack network adds (vxlan's on the IPv6 underlay): FORWARD's
    # scope and the kernel watcher's, beside `BackendFacts.tunnels`.
    ipv6_tunnels: Callable[[OptionsT], tuple[str, ...]] | None = None


@dataclass
class ReconcileResult:
    """What one reconcile pass changed; errors are per peer, never fatal to the pass."""

    added: int = 0
    removed: int = 0
    errors: dict[str, str] = field(default_factory=dict)  # peer subnet -> message
    # The kernel events this pass's own deletions raise in the agent's kernel watcher
    # (`weft.backends.bulk.apply_tables`): expected, so they ask for no repair pass.
    echoes: tuple[KernelEvent, ...] = ()

    def __iadd__(self, other: ReconcileResult) -> ReconcileResult:
        self.added += other.added
        self.removed += other.removed
        self.errors.update(other.errors)
        self.echoes += other.echoes
        return self


class Backend(Protocol):
    def prepare(self) -> Mapping[str, Any]: ...

    def activate(self, lease: Lease) -> int: ...

    def reconcile(self, peers: Sequence[Lease]) -> ReconcileResult: ...

    def status(self) -> Mapping[str, Any]:
        """Facts for `weft status` (implementation, offloads, counters); never secrets."""
        ...

    def close(self) -> None: ...

    def teardown(self) -> None: ...


@runtime_checkable
class IncrementalBackend(Protocol):
    """A backend that can also apply one store event's change alone (vxlan, host-gw);
    the others get a full `reconcile` for every change."""

    def update(self, removed: Sequence[Lease], added: Sequence[Lease]) -> ReconcileResult | None:
        """Apply only what a store event changed: `removed` are the peers' old leases,
        `added` their new ones (a changed peer is in both). None when the backend has no
        facts to plan with yet; the caller then runs a full `reconcile`."""
        ...


class BackendFactory(Protocol):
    def __call__(self, config: NetworkConfig, host: HostContext) -> Backend: ...


@dataclass(frozen=True)
class Delta(Generic[T]):
    """What to add to and remove from one kernel table."""

    add: frozenset[T] = frozenset()
    remove: frozenset[T] = frozenset()

    def __len__(self) -> int:
        return len(self.add) + len(self.remove)


def delta(desired: frozenset[T] | set[T], actual: frozenset[T] | set[T],
          key: Callable[[T], object] | None = None) -> Delta[T]:
    """The change that makes `actual` become `desired` (pure). As in `converge`, a stale
    entry whose `key` a desired one shares is not removed: adding the desired one
    overwrites it in the kernel, and removing it afterwards would remove the new one."""
    kept = {key(item) for item in desired} if key is not None else set()
    stale = actual - desired
    return Delta(frozenset(desired - actual),
                 frozenset(i for i in stale if key is None or key(i) not in kept))


def apply_delta(table: set[T], change: Delta[T], key: Callable[[T], object] | None = None
                ) -> set[T]:
    """A table after `change`, as the kernel would hold it (pure; used by the tests that
    compare incremental and full plans): an added entry replaces one with its key."""
    out = set(table) - set(change.remove)
    if key is not None:
        replaced = {key(item) for item in change.add}
        out = {item for item in out if key(item) not in replaced}
    return out | set(change.add)


def converge(
    desired: set[T], actual: set[T], add: Callable[[T], None], remove: Callable[[T], None],
    describe: Callable[[T], str] = str, key: Callable[[T], object] | None = None,
) -> ReconcileResult:
    """Make `actual` become `desired`: add what is missing, remove what is stale.
    A failing object is recorded and the rest still applied (one bad peer never blocks
    the others); adding first means a changed entry is replaced, never briefly absent.

    `key` names what the kernel identifies an object by, where that is less than the whole
    object: a stale object whose key a desired one shares was already overwritten by the
    add (a neighbour whose MAC changed), and deleting it would delete the new one."""
    result = ReconcileResult()
    for item in desired - actual:
        try:
            add(item)
            result.added += 1
        except Exception as exc:
            result.errors[describe(item)] = str(exc)
    kept = {key(item) for item in desired} if key is not None else set()
    for item in actual - desired:
        if key is not None and key(item) in kept:
            continue
        try:
            remove(item)
            result.removed += 1
        except Exception as exc:
            result.errors[describe(item)] = str(exc)
    return result


def backend_mismatch(peer: Lease, expected: str) -> str | None:
    """Why `peer` cannot be a peer of a `expected` host, or None if it can."""
    if peer.backend_type == expected:
        return None
    return (f"peer {peer.public_ip} runs backend {peer.backend_type!r}, this host "
            f"{expected!r}; every host of a network must use the same backend")
