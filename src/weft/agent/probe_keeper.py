"""Keeps the peer-health prober (weft.agent.prober) in step with the agent: its peers with
the validated view, its own address with the lease (a moved lease: a new prober on the new
address), the plane of each peer and wireguard's handshakes with the backend's status.

A prober that cannot start (its port taken on the overlay address) or a backend status that
fails is logged and tried again: probing is what reports trouble, it must never end the
agent.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Mapping
from typing import Any

from weft.agent.peer_health import ProbePolicy
from weft.agent.prober import HealthProber, Targets
from weft.core.config import IPNetwork
from weft.core.errors import WeftError
from weft.core.lease import Lease

log = logging.getLogger("weft.agent")

VIEW_EVERY = 1.0  # seconds between looks at the view: a new peer is not a failing one
STATUS_EVERY = 5  # ... and every this many looks, at the backend's status (planes, handshakes)
RETRY = 10.0  # seconds before a prober that could not start is tried again


class ProbeKeeper:
    def __init__(self, policy: ProbePolicy, *, backend_type: str,
                 lease: Callable[[], Lease], mtu: Callable[[], int],
                 peers: Callable[[], Mapping[IPNetwork, Lease]],
                 backend_status: Callable[[], Mapping[str, Any]],
                 extra_summary: Callable[[], Mapping[str, Any]] = dict,
                 on_rtt: Callable[[float], None] = lambda _: None) -> None:
        self.policy = policy
        self.backend_type = backend_type
        self._lease = lease
        self._mtu = mtu
        self._peers = peers
        self._backend_status = backend_status
        self._extra_summary = extra_summary
        self._on_rtt = on_rtt
        self.prober: HealthProber | None = None

    async def run(self) -> None:
        peers: object = None
        planes: dict[IPNetwork, str] = {}
        looks = 0
        try:
            while True:
                own = self._lease().own_address.ip
                if self.prober is None or self.prober.own != own:
                    await asyncio.to_thread(self.close)
                    try:
                        self.prober = await asyncio.to_thread(
                            HealthProber, own, self._mtu(), self.policy,
                            summary=self._summary, on_rtt=self._on_rtt)
                    except OSError as exc:
                        log.warning("peer probes cannot start; retrying",
                                    extra={"address": str(own), "error": str(exc)})
                        await asyncio.sleep(RETRY)
                        continue
                    self.prober.start()
                    peers, looks = None, 0
                if looks % STATUS_EVERY == 0:
                    try:
                        status = await asyncio.to_thread(self._backend_status)
                    except (WeftError, OSError) as exc:
                        log.debug("backend status failed", extra={"error": str(exc)})
                    else:
                        self.prober.handshakes = dict(status.get("handshakes", {}))
                        if (now := _planes(status)) != planes:
                            planes, peers = now, None  # the targets name the planes
                looks += 1
                current = self._peers()
                if current is not peers:
                    peers = current
                    self.prober.set_targets(targets(current, planes, self.backend_type))
                await asyncio.sleep(VIEW_EVERY)
        finally:
            await asyncio.to_thread(self.close)

    def _summary(self) -> dict[str, Any]:
        """What a member's `weft doctor --cluster` gets from this host: read-only counts."""
        summary: dict[str, Any] = self.prober.summary() if self.prober is not None else {}
        summary.update(self._extra_summary())
        return summary

    def close(self) -> None:
        prober, self.prober = self.prober, None
        if prober is not None:
            prober.close()


def _planes(status: Mapping[str, Any]) -> dict[IPNetwork, str]:
    """The plane of each peer whose backend chooses one per peer (auto's `paths`)."""
    paths = status.get("paths", {})
    return {ipaddress.ip_network(s): str(p.get("plane", "")) for s, p in paths.items()
            if isinstance(p, Mapping)}


def targets(peers: Mapping[IPNetwork, Lease], planes: Mapping[IPNetwork, str],
            backend_type: str) -> Targets:
    """Each peer's overlay address, the plane its traffic is on (the backend's type unless
    the backend chooses per peer), its public IP."""
    # The subnet's network address is its own_address, without parsing one per peer: this
    # runs on every change of the view, over every peer.
    return {s: (lease.subnet.network_address, planes.get(s) or backend_type,
                str(lease.public_ip)) for s, lease in peers.items()}
