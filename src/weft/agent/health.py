"""One record of what is wrong on this host and with each peer: what `weft status` shows
and the metrics count.

    notices      Notice -> message   the store refusing us, a config change not applied,
                                     the lease moved or overwritten (set and cleared by
                                     the part that knows)
    host         part -> message     the host's own state (files, masquerade, FORWARD
                                     accepts, the lock) as the last host pass left it
    data_plane   Part -> message     the ingress filter, the fast path, a failed pass
    backend      peer -> message     the backend's per-peer errors
    reported     key -> message      every peer's error as the last pass published it:
                                     the store's records that are not leases, the view's
                                     refusals, the backend's and the data plane's errors

A peer's error is logged when it appears or changes and when it clears, not on every pass
(a bad record in the store must not flood the log).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any

log = logging.getLogger("weft.agent")


class Notice(Enum):
    """What a notice is about; its value is the key `weft status` shows."""

    STORE = "store"  # the store refuses the lease's renewal or recovery
    STORE_WATCH = "store_watch"  # ... the watch, or the re-list after a compaction
    STORE_CONFIG = "store_config"  # ... the periodic config check
    CONFIG = "config"  # the config in the store changed or is invalid: not applied
    LEASE = "lease"  # this host moved to a new subnet while it was away
    LEASE_CONFLICT = "lease_conflict"  # our subnet's record names another host
    UNDERLAY = "underlay"  # the underlay lacks a family the backend routes the overlay by


class Part(Enum):
    """A data-plane step that failed as a whole (not one peer's); the value is its key
    among the peers' errors in `weft status`."""

    INGRESS = "ingress"
    FASTPATH = "fastpath"
    RECONCILE = "reconcile"
    PUBLIC_IP = "public_ip"  # this host's address left its underlay interface


class Health:
    def __init__(self, rejected: Callable[[], Mapping[str, str]] = dict) -> None:
        # The store's records that are not even leases (a bad key or value), by key: read
        # from the store when a pass publishes, never copied.
        self._rejected = rejected
        self.notices: dict[Notice, str] = {}
        self.host: dict[str, str] = {}
        self.data_plane: dict[Part, str] = {}
        self.backend: dict[str, str] = {}
        self.reported: dict[str, str] = {}

    # --- notices ------------------------------------------------------------------------

    def notice(self, kind: Notice, message: str) -> bool:
        """Set a notice; True when it is new or its message changed (worth a log line)."""
        new = self.notices.get(kind) != message
        self.notices[kind] = message
        return new

    def clear(self, kind: Notice) -> bool:
        """Clear a notice; True if it was set."""
        return self.notices.pop(kind, None) is not None

    # --- the data plane -----------------------------------------------------------------

    def backend_replaced(self, errors: Mapping[str, str]) -> None:
        """A full backend pass: its errors are all there are, but the ingress filter's
        (its own step, kept until that step succeeds)."""
        self.backend = dict(errors)
        for part in (Part.FASTPATH, Part.RECONCILE):
            self.data_plane.pop(part, None)

    def backend_updated(self, peers: list[str], errors: Mapping[str, str]) -> None:
        """An incremental backend pass over `peers`: their errors are replaced."""
        for peer in peers:
            self.backend.pop(peer, None)
        self.data_plane.pop(Part.RECONCILE, None)
        self.backend.update(errors)

    def publish(self, view_errors: Mapping[str, str]) -> int:
        """The end of a pass: every peer's error as `weft status` shows it, logged where it
        changed. Returns how many are new."""
        errors = {**self._rejected(), **view_errors, **self.backend}
        errors.update((part.value, message) for part, message in self.data_plane.items())
        for peer, message in errors.items():
            if self.reported.get(peer) != message:
                log.error("peer not usable", extra={"peer": peer, "error": message})
        for peer in self.reported.keys() - errors.keys():
            log.info("peer error cleared", extra={"peer": peer})
        new = len(errors.keys() - self.reported.keys())
        self.reported = errors
        return new

    # --- weft status --------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {"errors": dict(self.reported), "host_errors": dict(self.host),
                "notices": {kind.value: message for kind, message in self.notices.items()}}
