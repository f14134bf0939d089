"""The underlay ingress filter at the kernel edge: apply the plan, read its counters.

The rules themselves are built, pure, in `weft.host.ingress_rules`; this module runs them
through `nft -f` (one transaction) and reads the drop counters for `weft status` and the
metrics. The agent calls `IngressFilter.apply(peers)` once per reconcile.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any

from weft.core.config import IPAddress, NetworkConfig
from weft.core.errors import KernelError
from weft.core.lease import Lease
from weft.host.ingress_rules import (
    COUNTERS,
    INGRESS_TABLE,
    IngressPlan,
    ingress_plan,
    ingress_ruleset,
    reset_script,
)
from weft.host.nftables import apply_nft


class IngressFilter:
    """Owned state: the whole `inet weft-ingress` table, rebuilt by every `apply`."""

    def __init__(self, config: NetworkConfig, public_ip: IPAddress,
                 peer_iifs: Sequence[str] = ()) -> None:
        self.config = config
        self.public_ip = public_ip
        self.peer_iifs = tuple(peer_iifs)  # auto: every device a peer's plane arrives on
        self.plan: IngressPlan | None = None

    def apply(self, own: Lease, peers: Sequence[Lease]) -> None:
        plan = ingress_plan(self.config, self.public_ip, own, peers, self.peer_iifs)
        script = ingress_ruleset(plan)
        try:
            apply_nft(script, "the ingress filter")
        except KernelError:
            # A set of another type (the backend changed under the same table): start over.
            # Counters restart from zero then; nothing else is lost.
            apply_nft(reset_script() + script, "the ingress filter")
        self.plan = plan

    def counters(self) -> dict[str, int]:
        """Dropped packets by reason; empty when the table is not there (yet)."""
        return read_counters()

    def status(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "backend": self.config.backend.type,
            "port": plan.port if plan else None,
            "members": len(plan.members) if plan else 0,
            "dropped": self.counters(),
        }

    def remove(self) -> None:
        apply_nft(reset_script(), "the ingress filter")


def read_counters() -> dict[str, int]:
    nft = shutil.which("nft")
    if nft is None:
        return {}
    proc = subprocess.run([nft, "-j", "list", "counters", "table", "inet", INGRESS_TABLE],
                          capture_output=True, text=True, check=False, timeout=10)
    if proc.returncode != 0:
        return {}
    found: dict[str, int] = {}
    try:
        for item in json.loads(proc.stdout).get("nftables", []):
            counter = item.get("counter") if isinstance(item, dict) else None
            if isinstance(counter, dict) and counter.get("name") in COUNTERS:
                found[str(counter["name"])] = int(counter.get("packets", 0))
    except (ValueError, TypeError, AttributeError):
        return {}
    return found
