"""The host's own state the agent owns besides the backend's: converged level-based.

The state directory, `subnet.env`, the masquerade table and the iptables FORWARD accepts
are each checked and put back when missing; nothing is rewritten that is already right, so
a pass that finds everything in place changes nothing (and so causes no new events).
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

from weft.core.config import IPNetwork
from weft.core.errors import PermissionProblem, WeftError
from weft.host.files import private_dir, write_atomic
from weft.host.forward_accept import ensure_forward_accept
from weft.host.masquerade import ensure_masquerade
from weft.host.untrack import Untrack
from weft.integrations.subnet_env import SubnetEnv

log = logging.getLogger("weft.agent")


@dataclass(frozen=True)
class HostState:
    network: IPNetwork
    subnet_file: Path
    state_dir: Path
    env: SubnetEnv
    ip_masq: bool
    # (tunnel devices, underlay when overlay packets cross it bare): the FORWARD accepts' scope
    devices: tuple[tuple[str, ...], str | None] = ((), None)
    untrack: Untrack | None = None  # the masquerade table's notrack part (its decision)


def converge_host_state(want: HostState) -> dict[str, str]:
    """Put back whatever is missing; returns what failed (part -> message), retried later."""
    errors: dict[str, str] = {}

    def step(part: str, action: str) -> None:
        log.warning("host state repaired", extra={"part": part, "action": action})

    try:
        if want.state_dir.is_symlink() or not want.state_dir.is_dir():
            # Made root's again, or refused (a symlink put in its place): weft.host.files.
            private_dir(want.state_dir, "state directory (--state-dir)")
            step("state_dir", f"recreated {want.state_dir}")
        rendered = want.env.render().encode()
        try:
            current = want.subnet_file.read_bytes()
        except FileNotFoundError:
            current = None
        if current != rendered:
            write_atomic(want.subnet_file, rendered)
            if current is None:
                step("subnet_env", f"rewrote {want.subnet_file}")
    except PermissionProblem as exc:
        errors["files"] = str(exc)
    except OSError as exc:
        errors["files"] = f"{exc.filename}: {exc.strerror}"
    try:
        if want.ip_masq and ensure_masquerade(want.network, want.env.subnet, want.untrack):
            step("masquerade", "reinstalled the nftables table")
    except (WeftError, OSError, subprocess.SubprocessError) as exc:
        errors["masquerade"] = str(exc)
    try:
        ensure_forward_accept(want.network, *want.devices)
    except (WeftError, OSError, subprocess.SubprocessError) as exc:
        # Hosts without Docker's DROP policy do not need the rules; never fatal.
        errors["forward_accept"] = str(exc)
    return errors
