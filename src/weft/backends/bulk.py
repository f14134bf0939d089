"""Applying a plan's change to the kernel in one batch of rtnetlink messages (the edge
between pure deltas and weft.host.rtnl_batch)."""

from __future__ import annotations

from weft.backends.base import Delta, ReconcileResult
from weft.core.dataplane import FdbEntry, Neighbour, Route
from weft.core.errors import KernelError
from weft.core.kernel_events import FdbRemoved, KernelEvent, NeighbourRemoved, RouteRemoved
from weft.host import rtnl_batch
from weft.host.rtnl_batch import Op


def apply_tables(routes: Delta[Route], neighbours: Delta[Neighbour] | None = None,
                 fdb: Delta[FdbEntry] | None = None, device: str = "") -> ReconcileResult:
    """Removals first, then FDB, neighbours and routes added, all in one batch. A failed
    entry is reported by name and the rest still applied."""
    neighbours = neighbours or Delta()
    fdb = fdb or Delta()
    # A route or neighbour added again under the same key (a peer's new gateway or VTEP
    # MAC) is replaced in place (NLM_F_REPLACE), not deleted first: no moment without it,
    # and no deletion for the agent's own kernel watcher to take for a removal to repair.
    rerouted = {r.dst for r in routes.add}
    readdressed = {(n.ip, n.ifindex) for n in neighbours.add}
    ops: list[Op] = [rtnl_batch.route_op(r, remove=True) for r in routes.remove
                     if r.dst not in rerouted]
    ops += [rtnl_batch.neighbour_op(n, remove=True) for n in neighbours.remove
            if (n.ip, n.ifindex) not in readdressed]
    ops += [rtnl_batch.fdb_op(e, remove=True) for e in fdb.remove]
    ops += [rtnl_batch.fdb_op(e) for e in fdb.add]
    ops += [rtnl_batch.neighbour_op(n) for n in neighbours.add]
    ops += [rtnl_batch.route_op(r) for r in routes.add]
    try:
        errors = rtnl_batch.send_batch(ops)
    except OSError as exc:
        raise KernelError(f"program {len(ops)} kernel entries: {exc}") from None
    removed = len(ops) - len(fdb.add) - len(neighbours.add) - len(routes.add)
    # The kernel events these removals cause (the agent's watcher sees them too).
    echoes: list[KernelEvent] = [RouteRemoved(r.dst, r.table) for r in routes.remove
                                 if r.dst not in rerouted]
    echoes += [NeighbourRemoved(device, n.ip) for n in neighbours.remove
               if (n.ip, n.ifindex) not in readdressed]
    echoes += [FdbRemoved(device, e.mac.lower()) for e in fdb.remove]
    return ReconcileResult(added=len(ops) - removed - len(errors), removed=removed,
                           errors=errors, echoes=tuple(echoes))
