"""The underlay ingress filter at the kernel edge: apply the plan, read its counters.

The rules themselves are built, pure, in `weft.host.ingress_rules`; this module runs them
through `nft -f` (one transaction) and reads the drop counters for `weft status` and the
metrics. The agent calls `IngressFilter.apply(own, peers, full=...)` once per reconcile.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
from collections import Counter
from collections.abc import Sequence
from typing import Any

from weft.core.config import IPAddress, NetworkConfig
from weft.core.errors import KernelError
from weft.core.lease import Lease
from weft.host.ingress_rules import (
    COUNTERS,
    INGRESS_TABLE,
    IngressPlan,
    ingress_delta,
    ingress_plan,
    ingress_ruleset,
    ingress_update,
    member_elements,
    reset_script,
    same_shape,
    split_listing,
    subnet_elements,
)
from weft.host.nftables import apply_nft
from weft.host.untrack import Untrack


class IngressFilter:
    """Owned state: the whole `inet weft-ingress` table. A full pass (`full=True`) checks it
    in place and rewrites it whole if anything differs; a store event (`full=False`) only
    adds and deletes the set elements that changed, when the table is as last written."""

    def __init__(self, config: NetworkConfig, public_ip: IPAddress, *, port: int | None,
                 by_port: bool = False, peer_iifs: Sequence[str] = (),
                 public_ipv6: IPAddress | None = None, port6: int | None = None,
                 marker6: str | None = None) -> None:
        self.config = config
        self.public_ip = public_ip
        self.public_ipv6 = public_ipv6  # dual stack: members' IPv6 underlay addresses too
        # The backend's facts (weft.backends.base.BackendFacts): the encapsulation port,
        # whether a member is (address, port), every device a peer's source may arrive on.
        self.port = port
        self.port6 = port6  # the IPv6 underlay's encapsulation port, if it is another
        self.by_port = by_port
        self.marker6 = marker6  # the key a peer's BackendV6Data holds if it listens there
        self.peer_iifs = tuple(peer_iifs)
        self.plan: IngressPlan | None = None
        # The masquerade decision's notrack part (the agent sets it); the table carries
        # prerouting's notrack rules, so a changed decision rewrites it at the next pass.
        self.untrack: Untrack | None = None
        # The table as the kernel listed it after the last whole write, set elements left
        # out (those follow the plan, by difference between whole writes).
        self._skeleton: str | None = None
        # `delete element` lines of our own deltas that `nft monitor` will echo: the
        # agent's netfilter watcher skips them instead of asking for a full pass.
        self._echoes: Counter[str] = Counter()
        self._lock = threading.Lock()

    def apply(self, own: Lease, peers: Sequence[Lease], *, full: bool = True,
              change: tuple[Sequence[Lease], Sequence[Lease]] | None = None) -> None:
        """Converge the table to the plan of `peers`. A store event (`full=False`) may give
        its `change` (the changed peers' old leases, their new ones): the plan then follows
        from the last one by that difference alone, not rebuilt from every peer."""
        old = self.plan
        if not full and change is not None and old is not None and own.subnet == old.own \
                and old.untrack == self.untrack:
            plan = ingress_update(self.config, self.public_ip, old, *change)
        else:
            plan = ingress_plan(self.config, self.public_ip, own, peers, port=self.port,
                                by_port=self.by_port, peer_iifs=self.peer_iifs,
                                untrack=self.untrack, public_ipv6=self.public_ipv6,
                                port6=self.port6, marker6=self.marker6)
        if not full and old is not None and self._skeleton is not None and same_shape(old, plan):
            self._apply_delta(old, plan)
            return
        if plan == old and self._in_place(plan):
            # In place, as the kernel shows it: writing it again would flush its sets and
            # chain, which wakes the agent's own netfilter watcher for another full pass,
            # and so on for ever (measured: a full reconcile every ~70 ms after any change).
            return
        self._write_whole(plan)

    def _apply_delta(self, old: IngressPlan, plan: IngressPlan) -> None:
        """O(changed) element updates; nft lists nothing (that is O(N) per event)."""
        delta = ingress_delta(old, plan)
        if not delta.script:
            self.plan = plan
            return
        with self._lock:
            self._echoes.update(delta.deleted)
        try:
            apply_nft(delta.script, "the ingress filter")
        except KernelError:
            # An element missing or there already: the table is not as written (a hand
            # edit the watcher will report too); rewrite it whole now.
            with self._lock:
                self._echoes.subtract(delta.deleted)
                self._echoes = +self._echoes
            self._write_whole(plan)
            return
        self.plan = plan

    def own_echo(self, line: str) -> bool:
        """True for a `nft monitor` line that is one of our own element deletions (each
        expected line is taken once): it needs no repair pass."""
        line = line.strip()
        with self._lock:
            if self._echoes[line] > 0:
                self._echoes[line] -= 1
                if not self._echoes[line]:
                    del self._echoes[line]
                return True
        return False

    def _in_place(self, plan: IngressPlan) -> bool:
        if self._skeleton is None:
            return False
        listed = _listing()
        if listed is None:
            return False
        skeleton, elements = split_listing(listed)
        return skeleton == self._skeleton and elements.get("members", frozenset()) == \
            member_elements(plan) and elements.get("subnets", frozenset()) == \
            subnet_elements(plan) and (plan.network6 is None or elements.get(
                "subnets6", frozenset()) == subnet_elements(plan, "subnets6")) and (
                plan.members6 is None or elements.get("members6", frozenset())
                == member_elements(plan, "members6"))

    def _write_whole(self, plan: IngressPlan) -> None:
        self.plan = self._skeleton = None  # unknown until the write is confirmed
        with self._lock:
            self._echoes.clear()  # bounded: a late echo costs one pass that writes nothing
        script = ingress_ruleset(plan)
        try:
            apply_nft(script, "the ingress filter")
        except KernelError:
            # A set of another type (the backend changed under the same table): start over.
            # Counters restart from zero then; nothing else is lost.
            apply_nft(reset_script() + script, "the ingress filter")
        self.plan = plan
        listed = _listing()
        self._skeleton = split_listing(listed)[0] if listed is not None else None

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
