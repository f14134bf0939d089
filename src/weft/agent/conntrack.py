"""The masquerade table and the overlay conntrack decision it carries: whether overlay <->
overlay traffic skips conntrack, unless destination NAT elsewhere on the host needs it
tracked (weft.host.masquerade decides; this part installs, remembers and re-checks)."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from typing import TYPE_CHECKING, Any

from weft.core.config import IPAddress, NetworkConfig
from weft.core.errors import WeftError
from weft.core.lease import Lease
from weft.host.ingress import IngressFilter
from weft.host.masquerade import (
    ConntrackDecision,
    ConntrackMode,
    decide_conntrack,
    host_dnat_tables,
    install_masquerade,
)
from weft.host.untrack import Untrack

if TYPE_CHECKING:
    from weft.agent.reconciler import Request

log = logging.getLogger("weft.agent")


class OverlayConntrack:
    def __init__(self, config: NetworkConfig, public_ip: IPAddress, *, ip_masq: bool,
                 mode: ConntrackMode, ingress: IngressFilter, encap_port: int | None,
                 request: Request, public_ipv6: IPAddress | None = None,
                 encap_port6: int | None = None) -> None:
        self.config = config
        self.encap_port = encap_port  # the backend's encapsulated packets skip conntrack too
        self.encap_port6 = encap_port6  # on the IPv6 underlay, if another port
        self.public_ip = public_ip
        self.public_ipv6 = public_ipv6
        self.ip_masq = ip_masq
        self.mode = mode
        self.ingress = ingress
        self.request = request
        self.decision: ConntrackDecision | None = None  # what the masquerade table does
        self.untrack: Untrack | None = None  # its notrack part (host state keeps it so)

    async def replace(self, lease: Lease) -> None:
        """A lease taken: the table is replaced whole (it names the subnet, which may be a
        new one). Later passes only put it back if it is missing, or rewrite it when the
        decision changes (`ensure` at every resync)."""
        if self.ip_masq:
            self.decision = None
            await self.ensure(lease)

    async def ensure(self, lease: Lease) -> None:
        """The nftables table, with overlay traffic untracked unless destination NAT
        elsewhere on the host needs it tracked; rewritten only when the decision changes.
        The first install's failure is fatal (as before); later ones are logged."""
        if not self.ip_masq:
            return
        first = self.decision is None
        try:
            # Looked for in every mode, so status tells when `untrack` breaks a DNAT.
            dnat = await asyncio.to_thread(host_dnat_tables)
            decision = decide_conntrack(self.mode, dnat)
            if decision == self.decision:
                return
            untrack = Untrack(lease.own_address.ip, self.public_ip, self.encap_port,
                              self.public_ipv6, self.encap_port6) \
                if decision.untracked else None
            await asyncio.to_thread(install_masquerade, self.config.network,
                                    lease.subnet, untrack)
            six = self.config.ipv6
            if six is not None and lease.ipv6_subnet is not None:
                # Dual stack: `ip6 weft` masquerades IPv6 leaving the network; its
                # overlay traffic stays tracked, the IPv6 underlay's encapsulation not.
                await asyncio.to_thread(install_masquerade, six.network, lease.ipv6_subnet,
                                        untrack)
            self.untrack = untrack
            if self.ingress.untrack != untrack:
                # Prerouting's notrack rules live in the ingress filter's chain.
                self.ingress.untrack = untrack
                if not first:
                    self.request("overlay conntrack decision")
        except (WeftError, OSError, subprocess.SubprocessError) as exc:
            if first:
                raise
            log.warning("could not update the masquerade table", extra={"error": str(exc)})
            return
        self.decision = decision
        log.info("overlay conntrack", extra=decision.to_json())

    def stand_down(self) -> str | None:
        """Why the fast path must stand down, or None. It skips netfilter: only where
        overlay packets skip conntrack (a DNATed connection's reply must meet conntrack to
        be un-NATed). No masquerade table (--ip-masq=false): nothing untracks, all is
        tracked."""
        if self.decision is None:
            return "overlay traffic is tracked: --ip-masq=false installs no notrack rules"
        return None if self.decision.untracked else \
            f"overlay traffic is tracked: {self.decision.reason}"

    def status(self) -> dict[str, Any] | None:
        return self.decision.to_json() if self.decision else None
