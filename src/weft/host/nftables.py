"""The nftables edge: scripts run through `nft -f -`, each one kernel transaction.

Why the nft command and not a binding: libnftables' Python module is not on PyPI, and a
script applied by `nft -f` is atomic, which is the property weft needs (never half-applied).
"""

from __future__ import annotations

import shutil
import subprocess

from weft.core.errors import KernelError, KernelFeatureMissing


def apply_nft(script: str, what: str = "weft's rules") -> None:
    """Run one nft script as one transaction: all of it applies, or none of it."""
    nft = shutil.which("nft")
    if nft is None:
        raise KernelFeatureMissing("`nft` not found: install the nftables package")
    proc = subprocess.run([nft, "-f", "-"], input=script, text=True, capture_output=True,
                          check=False)
    if proc.returncode != 0:
        raise KernelError(f"nftables refused {what}: {proc.stderr.strip()}")


def table_exists(family: str, table: str) -> bool:
    """Whether `table` is in the ruleset now (a flush or a `delete table` removes it)."""
    nft = shutil.which("nft")
    if nft is None:
        raise KernelFeatureMissing("`nft` not found: install the nftables package")
    proc = subprocess.run([nft, "list", "table", family, table], capture_output=True,
                          text=True, check=False)
    return proc.returncode == 0


def read_nft_ruleset() -> str:
    """`nft -j list ruleset`: the whole ruleset of this namespace as JSON text."""
    nft = shutil.which("nft")
    if nft is None:
        raise KernelFeatureMissing("`nft` not found: install the nftables package")
    proc = subprocess.run([nft, "-j", "list", "ruleset"], text=True, capture_output=True,
                          check=False, timeout=30)
    if proc.returncode != 0:
        raise KernelError(f"nftables would not list the ruleset: {proc.stderr.strip()}")
    return proc.stdout
