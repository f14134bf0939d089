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
