"""The netlink edge: every kernel change weft makes goes through here (pyroute2).

Kernel objects are described by small frozen dataclasses (`weft.core.dataplane`), so
backends compute the desired state purely and diff it against `routes()`, `neighbours()`
and `fdb()`; this module applies the difference and translates pyroute2's NetlinkError
into weft.core.errors.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pyroute2.iproute.linux import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.rtmsg import RTNH_F_ONLINK

from weft.core.config import IPAddress, IPNetwork
from weft.core.constants import ROUTE_PROTOCOL
from weft.core.dataplane import FdbEntry, Neighbour, Route
from weft.core.errors import KernelError, KernelFeatureMissing, PermissionProblem
from weft.core.host import UnderlayFacts

NUD_PERMANENT = 0x80
NTF_SELF = 0x02
AF_BRIDGE = 7


@dataclass(frozen=True)
class LinkInfo:
    index: int
    name: str
    kind: str | None
    mac: str
    mtu: int
    up: bool
    data: dict[str, Any]  # kind-specific attributes (e.g. IFLA_VXLAN_ID)


def translate(exc: NetlinkError, what: str) -> Exception:
    """A NetlinkError as the weft error a user can act on."""
    if exc.code == errno.EPERM:
        return PermissionProblem(f"{what}: permission denied; run as root (CAP_NET_ADMIN)")
    if exc.code == errno.EOPNOTSUPP:
        return KernelFeatureMissing(f"{what}: the kernel does not support this ({exc})")
    return KernelError(f"{what}: {exc}")


class Netlink:
    """A netlink session in the current network namespace."""

    def __init__(self) -> None:
        self._ipr = IPRoute()

    def close(self) -> None:
        self._ipr.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _op(self, what: str) -> Iterator[None]:
        try:
            yield
        except NetlinkError as exc:
            raise translate(exc, what) from None

    # --- links --------------------------------------------------------------------------

    def link(self, name: str) -> LinkInfo | None:
        with self._op(f"look up link {name}"):
            found = self._ipr.link_lookup(ifname=name)
            if not found:
                return None
            (msg,) = self._ipr.get_links(found[0])
        info = msg.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info else None
        data_attr = info.get_attr("IFLA_INFO_DATA") if info else None
        data = dict(data_attr["attrs"]) if data_attr is not None and "attrs" in data_attr else {}
        return LinkInfo(
            index=msg["index"],
            name=name,
            kind=kind,
            mac=msg.get_attr("IFLA_ADDRESS") or "",
            mtu=msg.get_attr("IFLA_MTU"),
            up=bool(msg["flags"] & 1),
            data=data,
        )

    def create_link(self, name: str, kind: str, **attrs: Any) -> LinkInfo:
        with self._op(f"create {kind} device {name}"):
            try:
                self._ipr.link("add", ifname=name, kind=kind, **attrs)
            except NetlinkError as exc:
                if exc.code in (errno.EOPNOTSUPP, errno.ENODEV) or "Unknown" in str(exc):
                    raise KernelFeatureMissing(
                        f"cannot create a {kind} device: the kernel lacks {kind} support "
                        f"({exc}); load the module or choose another backend"
                    ) from None
                raise
        link = self.link(name)
        if link is None:
            raise KernelError(f"device {name} vanished right after it was created")
        return link

    def delete_link(self, name: str) -> None:
        link = self.link(name)
        if link is not None:
            with self._op(f"delete device {name}"):
                self._ipr.link("del", index=link.index)

    def set_link(self, index: int, **attrs: Any) -> None:
        with self._op(f"set link {index} {attrs}"):
            self._ipr.link("set", index=index, **attrs)

    def ensure_up(self, link: LinkInfo, mtu: int) -> None:
        if link.mtu != mtu:
            self.set_link(link.index, mtu=mtu)
        if not link.up:
            self.set_link(link.index, state="up")

    # --- addresses ----------------------------------------------------------------------

    def addresses(self, index: int) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
        with self._op(f"list addresses of link {index}"):
            msgs = self._ipr.get_addr(index=index)
        return [
            ipaddress.ip_interface(f"{m.get_attr('IFA_ADDRESS')}/{m['prefixlen']}")
            for m in msgs
            if m.get_attr("IFA_ADDRESS") and not str(m.get_attr("IFA_ADDRESS")).startswith("fe80")
        ]

    def ensure_only_address(
        self, index: int, want: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    ) -> None:
        """Our own device carries exactly this address (an old subnet's is removed)."""
        have = self.addresses(index)
        if want not in have:
            with self._op(f"add address {want}"):
                self._ipr.addr("add", index=index, address=str(want.ip),
                               prefixlen=want.network.prefixlen)
        for other in have:
            if other != want and other.version == want.version:
                with self._op(f"remove stale address {other}"):
                    self._ipr.addr("del", index=index, address=str(other.ip),
                                   prefixlen=other.network.prefixlen)

    def ensure_gateway(self, name: str, network: IPNetwork,
                       gateway: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> bool:
        """The container bridge `name`, if it exists, carries `gateway` and no other address
        inside the overlay `network` (an old subnet's gateway goes). True if it changed."""
        link = self.link(name)
        if link is None:
            return False  # no container attached yet: the CNI plugin makes the bridge
        have = self.addresses(link.index)
        changed = False
        if gateway not in have:
            with self._op(f"add address {gateway} to {name}"):
                self._ipr.addr("add", index=link.index, address=str(gateway.ip),
                               prefixlen=gateway.network.prefixlen)
            changed = True
        for other in have:
            if other != gateway and other.ip in network:
                with self._op(f"remove stale address {other} from {name}"):
                    self._ipr.addr("del", index=link.index, address=str(other.ip),
                                   prefixlen=other.network.prefixlen)
                changed = True
        return changed
    def ensure_address(
        self, index: int, want: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    ) -> None:
        """A device (not weft's own: lo) carries this address too; nothing else changes."""
        if want not in self.addresses(index):
            with self._op(f"add address {want}"):
                self._ipr.addr("add", index=index, address=str(want.ip),
                               prefixlen=want.network.prefixlen)

    def remove_addresses_in(self, index: int, subnet: IPNetwork) -> None:
        """Remove every address of `subnet` from a device (a subnet this host lost)."""
        for have in self.addresses(index):
            if have.ip in subnet:
                with self._op(f"remove address {have}"):
                    self._ipr.addr("del", index=index, address=str(have.ip),
                                   prefixlen=have.network.prefixlen)

    # --- routes -------------------------------------------------------------------------

    def routes(self, version: int) -> set[Route]:
        """Routes in the main table that weft installed (by their protocol number)."""
        family = 2 if version == 4 else 10
        with self._op("list routes"):
            msgs = self._ipr.get_routes(family=family, table=254, proto=ROUTE_PROTOCOL)
        out: set[Route] = set()
        for m in msgs:
            if m["proto"] != ROUTE_PROTOCOL:
                continue
            dst = ipaddress.ip_network(f"{m.get_attr('RTA_DST')}/{m['dst_len']}")
            gw = m.get_attr("RTA_GATEWAY")
            out.add(
                Route(
                    dst,
                    ipaddress.ip_address(gw) if gw else None,
                    m.get_attr("RTA_OIF"),
                    bool(m["flags"] & RTNH_F_ONLINK),
                )
            )
        return out

    def replace_route(self, route: Route) -> None:
        kwargs: dict[str, Any] = {
            "dst": str(route.dst),
            "oif": route.ifindex,
            "proto": ROUTE_PROTOCOL,
            "table": 254,
        }
        if route.gateway is not None:
            kwargs["gateway"] = str(route.gateway)
        if route.onlink:
            kwargs["flags"] = RTNH_F_ONLINK
        with self._op(f"route {route.dst} via {route.gateway}"):
            self._ipr.route("replace", **kwargs)

    def delete_route(self, route: Route) -> None:
        kwargs: dict[str, Any] = {"dst": str(route.dst), "oif": route.ifindex,
                                  "proto": ROUTE_PROTOCOL, "table": 254}
        if route.gateway is not None:
            kwargs["gateway"] = str(route.gateway)
        try:
            self._ipr.route("del", **kwargs)
        except NetlinkError as exc:
            if exc.code != errno.ESRCH:  # already gone: that is what we wanted
                raise translate(exc, f"delete route {route.dst}") from None

    def delete_routes(self, version: int) -> None:
        """Remove every route weft installed (a host leaving for good)."""
        for route in self.routes(version):
            self.delete_route(route)

    # --- policy rules (auto: a routing table per data plane) --------------------------------

    def ensure_rule(self, version: int, fwmark: int, table: int, priority: int) -> None:
        """`ip rule add fwmark M lookup T priority P`, unless it is there."""
        family = 2 if version == 4 else 10
        with self._op(f"rule fwmark {fwmark:#x} lookup {table}"):
            for m in self._ipr.get_rules(family=family):
                if (m.get_attr("FRA_FWMARK") == fwmark and m.get_attr("FRA_TABLE") == table
                        and m.get_attr("FRA_PRIORITY") == priority):
                    return
            self._ipr.rule("add", family=family, table=table, fwmark=fwmark,
                           priority=priority)

    def delete_rule(self, version: int, fwmark: int, table: int, priority: int) -> None:
        family = 2 if version == 4 else 10
        try:
            self._ipr.rule("del", family=family, table=table, fwmark=fwmark, priority=priority)
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.ESRCH):
                raise translate(exc, f"delete rule fwmark {fwmark:#x}") from None

    # --- neighbours and FDB (VXLAN) -----------------------------------------------------

    def neighbours(self, index: int, *, permanent: bool = True) -> set[Neighbour]:
        """Neighbours on a device: weft's own (permanent) by default, or every one known."""
        with self._op("list neighbours"):
            msgs = self._ipr.get_neighbours(ifindex=index)
        return {
            Neighbour(ipaddress.ip_address(m.get_attr("NDA_DST")), m.get_attr("NDA_LLADDR"), index)
            for m in msgs
            if (m["state"] & NUD_PERMANENT or not permanent)
            and m.get_attr("NDA_LLADDR") and m.get_attr("NDA_DST")
        }

    def bridge_ports(self, index: int) -> int:
        """How many devices are enslaved to the bridge `index`."""
        with self._op("list links"):
            return sum(1 for m in self._ipr.get_links() if m.get_attr("IFLA_MASTER") == index)

    def replace_neighbour(self, n: Neighbour) -> None:
        with self._op(f"neighbour {n.ip} -> {n.mac}"):
            self._ipr.neigh("replace", dst=str(n.ip), lladdr=n.mac, ifindex=n.ifindex,
                            state=NUD_PERMANENT)

    def delete_neighbour(self, n: Neighbour) -> None:
        try:
            self._ipr.neigh("del", dst=str(n.ip), lladdr=n.mac, ifindex=n.ifindex)
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.ESRCH):
                raise translate(exc, f"delete neighbour {n.ip}") from None

    def fdb(self, index: int) -> set[FdbEntry]:
        with self._op("list forwarding database"):
            msgs = self._ipr.fdb("dump", ifindex=index)
        out: set[FdbEntry] = set()
        for m in msgs:
            if m["ifindex"] != index or not m.get_attr("NDA_DST"):
                continue
            out.add(FdbEntry(m.get_attr("NDA_LLADDR"), ipaddress.ip_address(m.get_attr("NDA_DST")),
                             index))
        return out

    def append_fdb(self, e: FdbEntry) -> None:
        with self._op(f"fdb {e.mac} -> {e.dst}"):
            try:
                self._ipr.fdb("append", ifindex=e.ifindex, lladdr=e.mac, dst=str(e.dst),
                              state=NUD_PERMANENT)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise

    def delete_fdb(self, e: FdbEntry) -> None:
        try:
            self._ipr.fdb("del", ifindex=e.ifindex, lladdr=e.mac, dst=str(e.dst))
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.ESRCH):
                raise translate(exc, f"delete fdb {e.mac}") from None

    # --- the underlay -------------------------------------------------------------------

    def underlay_facts(self, ifname: str) -> UnderlayFacts:
        link = self.link(ifname)
        if link is None:
            raise KernelError(f"underlay interface {ifname} is gone")
        return UnderlayFacts(link.index, tuple(self.addresses(link.index)))

    def default_route_ifname(self) -> str | None:
        with self._op("look up the default route"):
            for m in self._ipr.get_default_routes(family=2, table=254):
                oif = m.get_attr("RTA_OIF")
                if oif:
                    links = self._ipr.get_links(oif)
                    return str(links[0].get_attr("IFLA_IFNAME"))
        return None

    def ifname_with_address(self, ip: IPAddress) -> str | None:
        with self._op("list addresses"):
            for m in self._ipr.get_addr():
                if m.get_attr("IFA_ADDRESS") == str(ip):
                    links = self._ipr.get_links(m["index"])
                    return str(links[0].get_attr("IFLA_IFNAME"))
        return None
