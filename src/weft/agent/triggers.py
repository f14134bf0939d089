"""What wakes the reconcile worker besides the store: the kernel, netfilter and the files.

Each watcher calls `changed(reason)` (the kernel's: `changed(event)`, a typed
`weft.core.kernel_events` value) when something weft owns may have been removed; the
worker then converges level-based (and a pass that finds everything in place changes
nothing, so weft's own changes do not feed back into a loop). A watcher that cannot run
here (no nft binary) says so once and leaves the periodic resync to catch the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import shutil
import socket
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

from asyncinotify import Inotify, Mask
from pyroute2.iproute.linux import AsyncIPRoute
from pyroute2.netlink.rtnl import (
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV4_RULE,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_IPV6_RULE,
    RTMGRP_LINK,
    RTMGRP_NEIGH,
    RTMGRP_TC,
)

from weft.core.constants import ROUTE_PROTOCOL
from weft.core.kernel_events import (
    AddressRemoved,
    FdbRemoved,
    KernelEvent,
    LinkAdded,
    LinkAddressChanged,
    LinkDown,
    LinkRemoved,
    NeighbourRemoved,
    RouteAdded,
    RouteRemoved,
    RuleRemoved,
    TcRemoved,
)
from weft.host.forward_accept import COMMENT as FORWARD_COMMENT

log = logging.getLogger("weft.agent")

Changed = Callable[[str], None]
KernelChanged = Callable[[KernelEvent], None]
_GROUPS = (RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR
           | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE | RTMGRP_IPV4_RULE | RTMGRP_IPV6_RULE)
_NUD_PERMANENT = 0x80
_AF_BRIDGE = 7


def kernel_removal(msg: Any, devices: dict[int, str], prefix: str,
                   tables: Collection[int] = ()) -> KernelEvent | None:
    """The event this rtnetlink message is when it may concern weft's state, or None
    (pure). `tables`: the routing tables the backend owns (its facts), whose rules are
    weft's."""
    event = msg.get("event")
    if event == "RTM_DELLINK":
        name = msg.get_attr("IFLA_IFNAME") or ""
        return LinkRemoved(name) if name.startswith(prefix) else None
    if event == "RTM_NEWLINK":
        name = msg.get_attr("IFLA_IFNAME") or ""
        down = not msg["flags"] & 1
        return LinkDown(name) if down and name.startswith(prefix) else None
    if event == "RTM_DELADDR":
        name = devices.get(msg["index"], "")
        return AddressRemoved(name) if name.startswith(prefix) else None
    if event == "RTM_DELROUTE":
        return _route_removed(msg) if msg["proto"] == ROUTE_PROTOCOL else None
    if event == "RTM_DELNEIGH":
        name = devices.get(msg["ifindex"], "")
        permanent = msg["state"] & _NUD_PERMANENT
        return _neighbour_removed(msg, name) if permanent and name.startswith(prefix) else None
    if event == "RTM_DELRULE":
        # The backend's fwmark rules (auto's); the table is in FRA_TABLE (the header's byte
        # holds only < 256).
        table = msg.get_attr("FRA_TABLE") or msg["table"]
        return RuleRemoved(table) if table in tables else None
    return None


def _neighbour_removed(msg: Any, device: str) -> NeighbourRemoved | FdbRemoved:
    """A neighbour keyed by its address; a bridge FDB entry (a VTEP's) by its MAC."""
    if msg["family"] == _AF_BRIDGE:
        return FdbRemoved(device, (msg.get_attr("NDA_LLADDR") or "").lower())
    ip = msg.get_attr("NDA_DST")
    return NeighbourRemoved(device, ipaddress.ip_address(ip) if ip else None)


def _route_removed(msg: Any) -> RouteRemoved:
    """The removed route's key as weft's own `Route` names it: destination and table (the
    table in RTA_TABLE: the header's byte holds only < 256)."""
    dst = msg.get_attr("RTA_DST") or ("::" if msg["family"] == socket.AF_INET6 else "0.0.0.0")
    return RouteRemoved(ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False),
                        msg.get_attr("RTA_TABLE") or msg["table"])


_RT_TABLE_MAIN = 254
_RTN_UNICAST = 1


def tc_hook_change(msg: Any, known: dict[int, str],
                   masters: dict[int, int] | None = None) -> KernelEvent | None:
    """With the fast path on, what may need its tc hooks converged (pure): a new device,
    a device that joined or left a bridge (`masters`: each known device's, 0 for none; a
    container's veth on the CNI bridge), or a route not weft's (a container's veth and its
    route, added by the CNI plugin), or a tc filter or qdisc removed (weft's may be among
    them)."""
    event = msg.get("event")
    if event == "RTM_NEWLINK" and (msg["index"] not in known or (
            masters is not None
            and masters.get(msg["index"], 0) != (msg.get_attr("IFLA_MASTER") or 0))):
        return LinkAdded(msg.get_attr("IFLA_IFNAME") or "")
    # Only unicast routes of the main table: the kernel's local and broadcast routes (every
    # address change) and a routing daemon's other tables would mean a full pass each.
    if (event == "RTM_NEWROUTE" and msg["proto"] != ROUTE_PROTOCOL
            and msg["table"] == _RT_TABLE_MAIN and msg["type"] == _RTN_UNICAST):
        return RouteAdded()
    if event in ("RTM_DELTFILTER", "RTM_DELQDISC"):
        return TcRemoved()
    return None


async def watch_kernel(changed: KernelChanged, prefix: str, *, tc_hooks: bool = False,
                       tables: Collection[int] = (), underlay: str | None = None,
                       underlay_changed: Callable[[], None] | None = None) -> None:
    """rtnetlink multicast: a device, address, route, neighbour or routing rule of weft's
    (a rule of one of the backend's `tables`) removed (and with `tc_hooks`, what the fast
    path's hooks follow: `tc_hook_change`); an address added to or removed from the
    `underlay` device calls `underlay_changed` (the host's address may have moved)."""
    async with AsyncIPRoute() as ipr:
        await ipr.bind(groups=_GROUPS | (RTMGRP_TC if tc_hooks else 0))
        devices: dict[int, str] = {}
        macs: dict[int, str] = {}  # a MAC peers hold (the VTEP's) changed under us
        masters: dict[int, int] = {}  # the bridge each device is a port of (the fast path)
        # pyroute2 0.9: get_links() gives an async generator, and get() ends after one
        # datagram's batch of multicast messages, so it is called again for the next.
        async for link in await ipr.get_links():
            devices[link["index"]] = link.get_attr("IFLA_IFNAME") or ""
            macs[link["index"]] = link.get_attr("IFLA_ADDRESS") or ""
            masters[link["index"]] = link.get_attr("IFLA_MASTER") or 0
        while True:
            async for msg in ipr.get():
                event = tc_hook_change(msg, devices, masters) if tc_hooks else None
                if msg.get("event") == "RTM_NEWLINK":
                    index, name = msg["index"], msg.get_attr("IFLA_IFNAME") or ""
                    mac = msg.get_attr("IFLA_ADDRESS") or ""
                    if name.startswith(prefix) and macs.get(index, mac) != mac and not event:
                        event = LinkAddressChanged(name)
                    devices[index], macs[index] = name, mac
                    masters[index] = msg.get_attr("IFLA_MASTER") or 0
                event = event or kernel_removal(msg, devices, prefix, tables)
                if event is not None:
                    changed(event)
                if (underlay_changed is not None
                        and msg.get("event") in ("RTM_NEWADDR", "RTM_DELADDR")
                        and devices.get(msg["index"]) == underlay):
                    underlay_changed()


# A rule that rewrites destinations (kube-proxy's Service DNAT, Docker publishing a port,
# a REDIRECT or TPROXY), in nft's words or iptables-nft's targets.
_DESTINATION_NAT = re.compile(r"\b(dnat|redirect|tproxy)\b", re.IGNORECASE)
DESTINATION_NAT_ADDED = "destination NAT added"
# What `nft monitor` prints when its netlink socket overran (ENOBUFS) and dropped events.
NFT_EVENTS_LOST = "# ERROR: We lost some netlink events"


def netfilter_change(line: str) -> str | None:
    """What an `nft monitor` line means for weft (pure): something removed or flushed, or
    a FORWARD chain turned into one that could drop overlay traffic (a DROP policy, a rule
    of another tool such as dockerd's): then weft's FORWARD accepts must be (re)checked.
    weft's own accepts carry their comment and wake nothing. A destination NAT rule added
    anywhere: overlay traffic may need conntrack now (`DESTINATION_NAT_ADDED`; the
    agent decides again at once instead of at its next resync)."""
    if line.startswith(("delete", "flush")):
        return "netfilter rules removed"
    if line.startswith(NFT_EVENTS_LOST):
        return "netfilter events lost"  # the socket overran: anything may have changed
    if line.startswith("add rule") and _DESTINATION_NAT.search(line):
        return DESTINATION_NAT_ADDED
    if " filter FORWARD " not in line:
        return None
    if line.startswith("add chain") and "policy drop" in line:
        return "FORWARD policy set to drop"
    if line.startswith("add rule") and FORWARD_COMMENT not in line:
        return "FORWARD rule added"
    return None


async def watch_netfilter(changed: Changed, own: Callable[[str], bool] | None = None) -> None:
    """`nft monitor`: tables, chains or rules deleted or flushed (iptables-nft included).
    `own` names the lines weft itself caused (the ingress filter's element deletions on a
    store event): those need no repair pass."""
    nft = shutil.which("nft")
    if nft is None:
        log.warning("nft not found: netfilter changes are repaired at the next resync only")
        return
    # Every event, filtered here: nft 1.0 accepts one object type after `monitor` at
    # most (`monitor tables chains rules` is a syntax error and ends the watcher at once).
    proc = await asyncio.create_subprocess_exec(
        nft, "monitor", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        while raw := await proc.stdout.readline():
            line = raw.decode(errors="replace")
            reason = netfilter_change(line)
            if reason is None or (own is not None and own(line)):
                continue
            changed(reason)
        # nft ended: an error for the guard to log and restart, not a silent end.
        error = (await proc.stderr.read()).decode(errors="replace").strip()
        raise OSError(f"`nft monitor` exited: {error or 'no message'}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


_FILE_EVENTS = (Mask.DELETE | Mask.MOVED_FROM | Mask.DELETE_SELF | Mask.MOVE_SELF
                | Mask.CLOSE_WRITE | Mask.MOVED_TO)


def file_event(mask: Mask, path: Path | None,
               watched: Collection[Path]) -> tuple[str | None, bool]:
    """What an inotify event means (pure): why to wake the worker (None: nothing), and
    whether the watches must be set up anew because a watched directory is gone.

    A watched directory's removal is also taken from its parent's DELETE (the state dir
    sits in the subnet file's directory), not only from its own DELETE_SELF: the kernel
    sends that one only when the last reference to the directory is dropped, and a file
    still open in it (the agent's own lock, until the worker relocks) holds it back.
    `path` is None when the watch is already gone (asyncinotify holds it weakly)."""
    if mask & (Mask.DELETE_SELF | Mask.MOVE_SELF | Mask.IGNORED):
        return f"directory {path} removed", True
    if mask & (Mask.DELETE | Mask.MOVED_FROM):
        if path in watched:
            return f"directory {path} removed", True
        return f"{path} removed", False
    if mask & (Mask.CLOSE_WRITE | Mask.MOVED_TO):
        return f"{path} written", False
    return None, False


async def watch_files(changed: Changed, directories: Iterable[Path]) -> None:
    """inotify on the directories of subnet.env and the state: a file removed or replaced
    by someone else, or the directory itself removed (then watched again once the worker
    has recreated it)."""
    wanted = sorted(set(directories))
    while True:
        with Inotify() as inotify:
            watched = 0
            for directory in wanted:
                with contextlib.suppress(OSError):
                    inotify.add_watch(directory, _FILE_EVENTS)
                    watched += 1
            if watched == len(wanted):
                async for event in inotify:
                    reason, rewatch = file_event(event.mask, event.path, wanted)
                    if reason is not None:
                        changed(reason)
                    if rewatch:
                        break
            else:
                changed("a directory weft writes to is missing")
        await asyncio.sleep(0.5)  # the worker recreates the directory meanwhile
