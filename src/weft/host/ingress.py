"""The underlay ingress filter at the kernel edge: apply the plan, read its counters.

The rules themselves are built, pure, in `weft.host.ingress_rules`; this module runs them
through `nft -f` (one transaction) and reads the drop counters for `weft status` and the
metrics. The agent calls `IngressFilter.apply(peers)` once per reconcile.
"""

from __future__ import annotations

import json
import re
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

    def __init__(self, config: NetworkConfig, public_ip: IPAddress) -> None:
        self.config = config
        self.public_ip = public_ip
        self.plan: IngressPlan | None = None
        self._listed: str | None = None  # the table as the kernel listed it after `apply`

    def apply(self, own: Lease, peers: Sequence[Lease]) -> None:
        plan = ingress_plan(self.config, self.public_ip, own, peers)
        if plan == self.plan and self._listed is not None and _listing() == self._listed:
            # In place, as the kernel shows it: writing it again would flush its sets and
            # chain, which wakes the agent's own netfilter watcher for another full pass,
            # and so on for ever (measured: a full reconcile every ~70 ms after any change).
            return
        script = ingress_ruleset(plan)
        try:
            apply_nft(script, "the ingress filter")
        except KernelError:
            # A set of another type (the backend changed under the same table): start over.
            # Counters restart from zero then; nothing else is lost.
            apply_nft(reset_script() + script, "the ingress filter")
        self.plan = plan
        self._listed = _listing()

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


_COUNTS = re.compile(rb"packets \d+ bytes \d+")


def _listing() -> str | None:
    """The table as `nft list` prints it, counter values left out (they move with traffic);
    None when it cannot be read."""
    nft = shutil.which("nft")
    if nft is None:
        return None
    proc = subprocess.run([nft, "list", "table", "inet", INGRESS_TABLE], capture_output=True,
                          check=False, timeout=30)
    if proc.returncode != 0:
        return None
    return _COUNTS.sub(b"", proc.stdout).decode(errors="replace")


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
