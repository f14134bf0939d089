"""What weft exempts from connection tracking (pure): one value shared by the two tables
that carry the notrack rules, the ingress filter (prerouting) and the masquerade table
(output)."""

from __future__ import annotations

from dataclasses import dataclass

from weft.core.config import IPAddress


@dataclass(frozen=True)
class Untrack:
    """What the raw-priority rules exempt from conntrack."""

    # The host's own overlay address: replies to what this host masqueraded into the
    # overlay come back to it and must meet their conntrack entry, so it stays tracked.
    own_address: IPAddress
    public_ip: IPAddress
    encap_port: int | None  # the backend's UDP port on the underlay (BackendFacts.encap_port)
    # Dual stack on a host with an IPv6 underlay address: its encapsulated packets there
    # skip conntrack too (the port: BackendFacts.encap_port6, else `encap_port`).
    public_ipv6: IPAddress | None = None
    encap_port6: int | None = None

    def encapsulations(self, version: int) -> list[tuple[IPAddress, int]]:
        """(this host's underlay address, UDP port) its encapsulated packets of IP
        `version` leave from and arrive at; empty for a backend that encapsulates nothing."""
        if self.encap_port is None:
            return []
        ends = [(self.public_ip, self.encap_port)]
        if self.public_ipv6 is not None:
            ends.append((self.public_ipv6, self.encap_port6 or self.encap_port))
        return [(address, port) for address, port in ends if address.version == version]
