"""Overlay traffic through a FORWARD chain that drops: Docker's iptables policy.

Docker (since 1.13) sets iptables' filter FORWARD policy to DROP and accepts only what it
knows, so packets between containers on different hosts would die in the host that
forwards them. An accept in weft's own nftables table cannot help (nftables runs every
base chain, and a drop anywhere wins), so like flannel weft appends two rules to that
chain itself, marked with a comment, and removes exactly those when the host leaves.
"""

from __future__ import annotations

import shutil
import subprocess

from weft.core.config import IPNetwork
from weft.core.errors import KernelError

COMMENT = "weft: overlay traffic"


def forward_accept_rules(network: IPNetwork) -> list[list[str]]:
    """The rule specs (pure): traffic from or to the overlay network is accepted."""
    return [[flag, str(network), "-m", "comment", "--comment", COMMENT, "-j", "ACCEPT"]
            for flag in ("-s", "-d")]


def _binary(network: IPNetwork) -> str | None:
    return shutil.which("iptables" if network.version == 4 else "ip6tables")


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    # -w: wait for the xtables lock (Docker, kube-proxy) instead of failing at once.
    return subprocess.run([argv[0], "-w", "5", *argv[1:]], capture_output=True, text=True,
                          check=False, timeout=30)


def ensure_forward_accept(network: IPNetwork) -> bool:
    """Append the rules to filter/FORWARD unless already there (idempotent). False when
    the host has no iptables at all: then nothing of Docker's can drop either."""
    binary = _binary(network)
    if binary is None:
        return False
    for rule in forward_accept_rules(network):
        if _run([binary, "-C", "FORWARD", *rule]).returncode == 0:
            continue
        added = _run([binary, "-A", "FORWARD", *rule])
        if added.returncode != 0:
            raise KernelError(f"iptables refused the FORWARD accept rule "
                              f"{' '.join(rule)}: {added.stderr.strip()}")
    return True


def remove_forward_accept(network: IPNetwork) -> None:
    """Delete every copy of the rules; rules of others stay."""
    binary = _binary(network)
    if binary is None:
        return
    for rule in forward_accept_rules(network):
        for _ in range(100):  # copies a crashed tool may have added; never loop forever
            if _run([binary, "-D", "FORWARD", *rule]).returncode != 0:
                break
