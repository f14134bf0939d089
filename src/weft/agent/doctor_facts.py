"""`weft doctor`'s edge: gather the facts its pure checks (weft.agent.doctor) look at.

Everything is read-only: the agent's status socket, the store's config and leases, the
kernel's addresses and links (`ip -j`), `iptables -S`, `nft -j list ruleset`, sysctls under
/proc/sys, the ethtool features of weft's VXLAN devices. A tool that is missing or fails
leaves its fact empty (a check then says what it could not see), never an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from weft.agent.doctor import BridgeFact, Facts, LeaseFact
from weft.agent.status import query_status
from weft.backends.registry import parse_config
from weft.core.config import IPAddress
from weft.core.constants import CNI_BRIDGE
from weft.core.errors import UsageError, WeftError
from weft.host.system import tx_checksum_offload
from weft.store import LeaseStore

DOCKER_BRIDGE = "docker0"
SYSCTLS = ("net/bridge/bridge-nf-call-iptables", "net/ipv4/conf/all/rp_filter")


def _run(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _sysctl(name: str) -> str | None:
    try:
        return (Path("/proc/sys") / name).read_text().strip()
    except OSError:
        return None


def _addresses() -> tuple[dict[str, tuple[IPAddress, ...]], list[dict[str, Any]]]:
    links: list[dict[str, Any]] = json.loads(_run(["ip", "-j", "addr", "show"]) or "[]")
    by_device = {
        str(link["ifname"]): tuple(ipaddress.ip_address(a["local"])
                                   for a in link.get("addr_info", [])
                                   if "local" in a and a.get("scope") != "link")
        for link in links}
    return by_device, links


def _bridge(links: list[dict[str, Any]], name: str) -> BridgeFact | None:
    for link in links:
        if link.get("ifname") == name:
            addrs = tuple(ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}")
                          for a in link.get("addr_info", []) if "local" in a
                          and not str(a["local"]).startswith("fe80"))
            ports = sum(1 for other in links if other.get("master") == name)
            return BridgeFact(name, addrs, int(link.get("mtu", 0)), ports)
    return None


def _kernel() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(m[1]), int(m[2])) if m else (0, 0)


async def _store_facts(store: LeaseStore | WeftError
                       ) -> tuple[str | None, str | None, list[LeaseFact]]:
    if isinstance(store, WeftError):  # it could not even be opened
        return str(store), None, []
    try:
        text = await store.get_config()
        leases, _ = await store.list_leases()
    except WeftError as exc:
        return str(exc), None, []
    except OSError as exc:
        return f"the store cannot be reached: {exc}", None, []
    finally:
        with contextlib.suppress(Exception):
            await store.close()
    config_error: str | None = None
    if text is None:
        config_error = "the store holds no network config"
    else:
        try:
            parse_config(text)
        except WeftError as exc:
            config_error = str(exc)
    now = time.time()
    return None, config_error, [LeaseFact(x.subnet, x.public_ip, x.expires_in(now), x.key)
                                for x in leases]


async def gather(store: LeaseStore | WeftError, state_dir: Path, subnet_file: Path) -> Facts:
    """`store`: the store opened, or why it could not be (a check reports it)."""
    agent: dict[str, Any] | None = None
    agent_error = ""
    try:
        agent = await query_status(state_dir)
    except UsageError as exc:
        agent_error = str(exc)
    except OSError as exc:
        agent_error = f"cannot ask the agent in {state_dir}: {exc.strerror}"
    store_error, config_error, leases = await _store_facts(store)

    def from_the_host() -> dict[str, Any]:
        by_device, links = _addresses()
        devices = [str(d) for d in (agent or {}).get("devices") or []]
        sysctl = {name: v for name in (*SYSCTLS, *(f"net/ipv4/conf/{d}/rp_filter"
                                                   for d in devices))
                  if (v := _sysctl(name)) is not None}
        offload = {d: on for d in devices if d.startswith("weft.vx")
                   if (on := tx_checksum_offload(d)) is not None}
        nft = _run(["nft", "-j", "list", "ruleset"])
        try:
            subnet_env: str | None = subnet_file.read_text()
        except OSError:
            subnet_env = None
        bridges = [b for name in (CNI_BRIDGE, DOCKER_BRIDGE)
                   if (b := _bridge(links, name)) is not None]
        return {"addresses": by_device, "docker": _bridge(links, DOCKER_BRIDGE),
                "bridges": bridges,
                "iptables_forward": _run(["iptables", "-S", "FORWARD"]),
                "iptables_input": _run(["iptables", "-S", "INPUT"]),
                "nft": json.loads(nft) if nft else None, "sysctl": sysctl,
                "tx_checksum": offload, "subnet_env": subnet_env}

    host = await asyncio.to_thread(from_the_host)
    return Facts(agent=agent, agent_error=agent_error, store_error=store_error,
                 config_error=config_error, leases=leases,
                 subnet_env_path=str(subnet_file), kernel=_kernel(), **host)
