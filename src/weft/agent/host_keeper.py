"""The host pass of the reconcile worker: the host's own state (weft.agent.host_state) for
the lease this host holds now, the state dir's lock taken again if the dir was removed,
and the status socket served anew if it was."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from weft.agent.health import Health
from weft.agent.host_state import HostState, Written, converge_host_state
from weft.agent.identity import ensure_host_id
from weft.agent.lease_keeper import OwnLease
from weft.agent.lock import StateDirLock
from weft.core.config import IPNetwork
from weft.core.errors import UsageError, WeftError
from weft.host.untrack import Untrack
from weft.integrations.subnet_env import SubnetEnv

log = logging.getLogger("weft.agent")


class HostKeeper:
    def __init__(self, own: OwnLease, *, network: IPNetwork, subnet_file: Path,
                 ipv6_network: IPNetwork | None = None,
                 state_dir: Path, ip_masq: bool, devices: tuple[tuple[str, ...], str | None],
                 untrack: Callable[[], Untrack | None], lock: StateDirLock,
                 status_socket: Path, on_socket_gone: Callable[[], None],
                 health: Health, host_id: str = "") -> None:
        self.own = own
        self.host_id = host_id  # written back if the state dir goes (weft.agent.identity)
        self.network = network
        self.ipv6_network = ipv6_network  # dual stack: subnet.env's FLANNEL_IPV6_NETWORK
        self.subnet_file = subnet_file
        self.state_dir = state_dir
        self.ip_masq = ip_masq
        self.devices = devices  # the FORWARD accepts' scope (weft.host.forward_accept)
        self.untrack = untrack  # the masquerade table's notrack part, as last decided
        self.lock = lock
        self.status_socket = status_socket
        self.on_socket_gone = on_socket_gone
        self.health = health
        self._written = Written()  # the files this run wrote (a repair vs a first write)

    def _want(self) -> HostState:
        return HostState(self.network, self.subnet_file, self.state_dir,
                         SubnetEnv(self.network, self.own.lease.subnet, self.own.mtu,
                                   self.ip_masq, self.ipv6_network,
                                   self.own.lease.ipv6_subnet),
                         self.ip_masq, self.devices, self.untrack())

    async def converge(self) -> bool:
        """Put back what is missing; False (retried) if some part could not be."""
        host_errors = await asyncio.to_thread(converge_host_state, self._want(),
                                              self._written)
        if self.host_id and "files" not in host_errors:
            try:
                if await asyncio.to_thread(ensure_host_id, self.state_dir, self.host_id):
                    log.warning("host state repaired",
                                extra={"part": "host_id", "action": "rewrote the host identity"})
            except (WeftError, OSError) as exc:
                host_errors["host_id"] = str(exc)
        try:
            if self.lock.reassert():
                log.warning("host state repaired",
                            extra={"part": "lock", "action": f"relocked {self.lock.path}"})
        except (UsageError, OSError) as exc:
            host_errors["lock"] = str(exc)
        self.health.host = host_errors
        if not self.status_socket.exists():
            self.on_socket_gone()
        if host_errors:
            log.error("could not repair host state", extra=host_errors)
            return False
        return True
