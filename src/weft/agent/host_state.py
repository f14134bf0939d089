"""The host's own state the agent owns besides the backend's: converged level-based.

The state directory, `subnet.env`, the gateway address on the container bridge (when the
CNI plugin made one), the masquerade table and the iptables FORWARD accepts are each
checked and put back when missing; nothing is rewritten that is already right, so a pass
that finds everything in place changes nothing (and so causes no new events).
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from weft.core.config import IPNetwork
from weft.core.constants import CNI_BRIDGE
from weft.core.errors import PermissionProblem, WeftError
from weft.host.files import private_dir, write_atomic
from weft.host.forward_accept import ensure_forward_accept
from weft.host.masquerade import ensure_masquerade
from weft.host.netlink import Netlink
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


@dataclass
class Written:
    """What this agent wrote in this run, so a later pass tells a repair (someone removed
    or changed the file) from the first write or an update of its own (a new lease)."""

    subnet_env: bytes | None = field(default=None, repr=False)


def converge_subnet_env(path: Path, rendered: bytes, written: Written) -> None:
    """Write subnet.env if it is not `rendered`. The first write of a run and an update of
    the agent's own file are info; putting back a file someone removed or changed is a
    repair, a warning."""
    try:
        current: bytes | None = path.read_bytes()
    except FileNotFoundError:
        current = None
    if current != rendered:
        write_atomic(path, rendered)
        if written.subnet_env is None:
            log.info("subnet.env written", extra={"path": str(path)})
        elif current == written.subnet_env:
            log.info("subnet.env updated", extra={"path": str(path)})
        else:
            log.warning("host state repaired", extra={
                "part": "subnet_env",
                "action": f"rewrote {path} ({'removed' if current is None else 'changed'})"})
    written.subnet_env = rendered


def converge_host_state(want: HostState, written: Written | None = None) -> dict[str, str]:
    """Put back whatever is missing; returns what failed (part -> message), retried later.
    `written` carries what this agent wrote across passes (a fresh one: a first start)."""
    errors: dict[str, str] = {}

    def step(part: str, action: str) -> None:
        log.warning("host state repaired", extra={"part": part, "action": action})

    try:
        if want.state_dir.is_symlink() or not want.state_dir.is_dir():
            # Made root's again, or refused (a symlink put in its place): weft.host.files.
            private_dir(want.state_dir, "state directory (--state-dir)")
            step("state_dir", f"recreated {want.state_dir}")
        converge_subnet_env(want.subnet_file, want.env.render().encode(),
                            Written() if written is None else written)
    except PermissionProblem as exc:
        errors["files"] = str(exc)
    except OSError as exc:
        errors["files"] = f"{exc.filename}: {exc.strerror}"
    try:
        gateway = ipaddress.ip_interface(f"{want.env.gateway}/{want.env.subnet.prefixlen}")
        with Netlink() as nl:
            if nl.ensure_gateway(CNI_BRIDGE, want.network, gateway):
                step("gateway", f"put {gateway} on {CNI_BRIDGE} (the only address of "
                                f"{want.network} there)")
    except (WeftError, OSError) as exc:
        errors["gateway"] = str(exc)
    try:
        if want.ip_masq and ensure_masquerade(want.network, want.env.subnet, want.untrack):
            step("masquerade", "reinstalled the nftables table")
        six, subnet6 = want.env.ipv6_network, want.env.ipv6_subnet
        if want.ip_masq and six is not None and subnet6 is not None \
                and ensure_masquerade(six, subnet6, want.untrack):
            step("masquerade", "reinstalled the ip6 nftables table")
    except (WeftError, OSError, subprocess.SubprocessError) as exc:
        errors["masquerade"] = str(exc)
    try:
        # weft's bridge too: with br_netfilter its bridged packets cross FORWARD.
        ensure_forward_accept(want.network, *want.devices, CNI_BRIDGE)
        if want.env.ipv6_network is not None:
            ensure_forward_accept(want.env.ipv6_network, *want.devices, CNI_BRIDGE)
    except (WeftError, OSError, subprocess.SubprocessError) as exc:
        # Hosts without Docker's DROP policy do not need the rules; never fatal.
        errors["forward_accept"] = str(exc)
    return errors
