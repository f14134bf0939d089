"""The tc BPF fast path on a host's devices, converged by the agent like the rest of its state.

Where it goes (`hook_devices`): `from_underlay` on the device overlay packets for this host
arrive on (the underlay for host-gw, the VXLAN device for vxlan: after decapsulation), and
`from_container` where the containers' packets enter the host: each container's host-side
veth for ptp; for bridge attachment the CNI bridge and each of its veth ports, where a frame
addressed to the bridge is taken before the bridge sees it (br_netfilter, loaded on any
Docker or Kubernetes host, would run every bridged packet through the IP hooks first:
measured: a fifth of dual stack's IPv6 bandwidth). The port's copy of the program holds
its bridge (`bridge` map). Containers come and go after the agent
starts, so the devices are found anew at every full pass (the kernel trigger asks for one
when a link or route appears): every device with a route into this host's subnet.

Owned: the ingress filter at preference 49, handle 1, whose program is fastpath.c's, on any
device of this namespace. Nothing else is replaced or deleted; a clsact qdisc is removed
only when weft's filter was the last one on it. The programs' maps are per attached copy (tc
loads the object once per filter), so `subnets` and `subnets6` (leased subnets of each
family, the source check) and `peers` (veths for bpf_redirect_peer) are written into each
copy with bpftool: the whole difference in one `bpftool batch` (a process per key cost
seconds of CPU at 5,000 peers, and every store event waited behind them). What was written
is remembered, so a store event's pass writes only its change; a verifying pass reads the
maps back first.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2.iproute.linux import IPRoute

from weft.core.config import IPNetwork
from weft.core.errors import KernelError, KernelFeatureMissing
from weft.host.fastpath import FROM_CONTAINER, FROM_UNDERLAY, attach_argv, check_built
from weft.host.rtnl_dump import device_routes

PREF = 49
# The program names tc reports (the function names in fastpath.c), by section.
PROGRAM_NAMES = {FROM_CONTAINER: "from_container", FROM_UNDERLAY: "from_underlay"}
_COUNTER_INDEX = {FROM_CONTAINER: 0, FROM_UNDERLAY: 1}


@dataclass(frozen=True)
class BridgeOf:
    """The bridge a port belongs to: its ifindex and MAC."""

    ifindex: int
    mac: str


@dataclass(frozen=True)
class Hook:
    device: str
    section: str
    port_of: BridgeOf | None = None  # a bridge port's bridge


def plan_hooks(arrivals: Sequence[str], container_devices: Iterable[str],
               ports: Mapping[str, BridgeOf] | None = None) -> list[Hook]:
    """The hooks for these devices (pure): one program per device, the arrivals' first;
    a bridge port's knows its bridge (`ports`)."""
    ports = ports or {}
    hooks = [Hook(a, FROM_UNDERLAY) for a in dict.fromkeys(arrivals)]
    hooks += [Hook(d, FROM_CONTAINER, ports.get(d))
              for d in sorted(set(container_devices) - set(arrivals))]
    return hooks


def bridge_value(port_of: BridgeOf | None) -> tuple[str, ...]:
    """bpftool's value bytes for the `bridge` map (pure): the bridge's ifindex (host order,
    little endian here), its MAC, two bytes of padding; all zero off a bridge port."""
    if port_of is None:
        return ("0",) * 12
    mac = bytes.fromhex(port_of.mac.replace(":", ""))
    return tuple(str(b) for b in port_of.ifindex.to_bytes(4, "little") + mac + bytes(2))


def subnet_key(net: IPNetwork) -> list[str]:
    """bpftool's key bytes for the LPM trie (pure): prefix length (host order, little
    endian here) then the address in network order (4 bytes for `subnets`, 16 for
    `subnets6`)."""
    return [str(b) for b in (net.prefixlen.to_bytes(4, "little") + net.network_address.packed)]


def _tc(argv: Sequence[str], stdin: str | None = None) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=30,
                          input=stdin)
    if proc.returncode != 0:
        raise KernelError(f"`{' '.join(argv)}` failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def _filter_at_slot(dev: str) -> dict[str, Any] | None:
    """The filter at weft's place (ingress, preference 49, handle 1) on `dev`, whoever's."""
    try:
        out = _tc(["tc", "-j", "filter", "show", "dev", dev, "ingress"])
    except KernelError:
        return None  # no clsact qdisc, or the device is gone
    for f in json.loads(out or "[]"):
        options = f.get("options") or {}
        if f.get("pref") == PREF and options.get("handle") == "0x1":
            result: dict[str, Any] = f
            return result
    return None


def _kind(link: Any) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return None if info is None else info.get_attr("IFLA_INFO_KIND")


def _is_ours(f: dict[str, Any] | None) -> bool:
    prog = (f or {}).get("options", {}).get("prog") or {}
    return prog.get("name") in PROGRAM_NAMES.values()


def _owned_filter(dev: str) -> dict[str, Any] | None:
    """weft's filter on `dev`'s ingress, or None."""
    f = _filter_at_slot(dev)
    return f if _is_ours(f) else None


def _map_ids(prog_id: int) -> dict[str, int]:
    prog = json.loads(_tc(["bpftool", "-j", "prog", "show", "id", str(prog_id)]))
    ids: dict[str, int] = {}
    for map_id in prog.get("map_ids", []):
        info = json.loads(_tc(["bpftool", "-j", "map", "show", "id", str(map_id)]))
        ids[info["name"]] = map_id
    return ids


def _map_keys(map_id: int) -> set[tuple[str, ...]]:
    dump = json.loads(_tc(["bpftool", "-j", "map", "dump", "id", str(map_id)]) or "[]")
    return {tuple(str(int(b, 16)) for b in e["key"]) for e in dump}


def _sync_map(map_id: int, wanted: set[tuple[str, ...]], have: set[tuple[str, ...]]) -> None:
    """Make the map's keys exactly `wanted` (value 1), given the keys it has: one bpftool
    process for the whole difference."""
    lines = [f"map update id {map_id} key {' '.join(k)} value 1" for k in sorted(wanted - have)]
    lines += [f"map delete id {map_id} key {' '.join(k)}" for k in sorted(have - wanted)]
    if lines:
        _tc(["bpftool", "batch", "file", "-"], stdin="\n".join(lines) + "\n")


def _counter(map_id: int, index: int) -> int:
    dump = json.loads(_tc(["bpftool", "-j", "map", "dump", "id", str(map_id)]) or "[]")
    total = 0
    for e in dump:
        formatted = e.get("formatted") or {}
        if formatted.get("key") == index:
            total += sum(int(v["value"]) for v in formatted.get("values", []))
    return total


class FastPath:
    """The fast path of one host: compiled object in hand, tools checked."""

    def __init__(self, obj: Path) -> None:
        for tool in ("tc", "bpftool"):
            if shutil.which(tool) is None:
                raise KernelFeatureMissing(f"the fast path needs `{tool}` (iproute2, bpftool;"
                                           " scripts/setup.sh installs them)")
        self.obj = obj
        self.own: list[IPNetwork] = []  # this host's subnets (one per family), set by the agent
        self.attached: list[Hook] = []
        # Devices whose place (preference 49, handle 1) holds another program: never
        # replaced (weft owns only what it made); their packets take the normal path.
        self.skipped: dict[str, str] = {}
        # The programs this process loaded: a filter of the same name left by an earlier
        # run (another build, other maps) is replaced, not adopted.
        self._programs: set[int] = set()
        self._maps: dict[int, dict[str, int]] = {}  # a program's maps, fixed for its life
        self._keys: dict[int, set[tuple[str, ...]]] = {}  # what weft last wrote, per map
        self._bridges: dict[int, tuple[str, ...]] = {}  # each `bridge` map's value, written
        self.veths: set[int] = set()  # the container veths of the last full pass

    @staticmethod
    def present(names: Iterable[str]) -> list[str]:
        """Those of `names` that are devices here (dual stack's IPv6 underlay device is
        made only on a host with an IPv6 underlay address)."""
        with IPRoute() as ipr:
            return [name for name in names if ipr.link_lookup(ifname=name)]

    def container_devices(self, exclude: Iterable[str]
                          ) -> tuple[list[str], set[int], dict[str, BridgeOf]]:
        """Devices with a route into one of this host's subnets (the CNI bridge, or ptp
        veths) and a bridge's veth ports; the ifindexes of the routed veths
        (bpf_redirect_peer needs a veth); each port's bridge."""
        skip = set(exclude)
        names: list[str] = []
        veths: set[int] = set()
        ports: dict[str, BridgeOf] = {}
        with IPRoute() as ipr:
            links = {link["index"]: link for link in ipr.get_links()}
        for index, link in sorted(links.items()):
            name = link.get_attr("IFLA_IFNAME")
            if name in skip or name == "lo":
                continue
            # The kernel filters by device: the arrival, which holds every peer's route, is
            # never read (weft.host.rtnl_dump).
            if not any(net.subnet_of(own)  # type: ignore[arg-type]
                       for own in self.own
                       for net in device_routes(index, 2 if own.version == 4 else 10)
                       if net.version == own.version):
                continue
            names.append(name)
            if _kind(link) == "veth":
                veths.add(index)
            elif _kind(link) == "bridge":
                bridge = BridgeOf(index, link.get_attr("IFLA_ADDRESS") or "")
                for port in links.values():
                    port_name = port.get_attr("IFLA_IFNAME")
                    if port.get_attr("IFLA_MASTER") == index and _kind(port) == "veth" \
                            and port_name not in skip:
                        ports[port_name] = bridge
        names += sorted(set(ports) - set(names))
        return names, veths, ports

    def converge(self, hooks: Sequence[Hook], subnets: Iterable[IPNetwork],
                 veths: set[int], *, verify: bool = True) -> list[str]:
        """Attach what is missing, write the maps; the devices that were (re)attached.
        `verify`: read every map back instead of trusting what was last written (a full
        pass: an entry deleted by hand with bpftool raises no event to wake a pass)."""
        attached: list[str] = []
        subnets = list(subnets)
        wanted_subnets = {tuple(subnet_key(s)) for s in subnets if s.version == 4}
        wanted_subnets6 = {tuple(subnet_key(s)) for s in subnets if s.version == 6}
        wanted_peers = {tuple(str(b) for b in i.to_bytes(4, "little")) for i in veths}
        self.skipped = {}
        kept: list[Hook] = []
        programs: set[int] = set()
        bridges: dict[int, tuple[str, ...]] = {}  # `bridge` maps to write: map id -> value
        for hook in hooks:
            slot = _filter_at_slot(hook.device)
            if slot is not None and not _is_ours(slot):
                prog = (slot.get("options") or {}).get("prog") or {}
                self.skipped[hook.device] = (
                    f"another filter ({slot.get('kind')} {prog.get('name', '')}".rstrip()
                    + f") holds ingress preference {PREF} handle 1: left in place")
                continue
            kept.append(hook)
            current = slot
            if current is None or current["options"]["prog"]["name"] != \
                    PROGRAM_NAMES[hook.section] or \
                    int(current["options"]["prog"]["id"]) not in self._programs:
                check_built(self.obj)  # tc loads it by path: still the one weft built
                for argv in attach_argv(hook.device, self.obj, hook.section):
                    _tc(argv)
                attached.append(hook.device)
                current = _owned_filter(hook.device)
                if current is None:
                    raise KernelError(f"tc attached no fast path filter on {hook.device}")
                self._programs.add(int(current["options"]["prog"]["id"]))
            programs.add(prog_id := int(current["options"]["prog"]["id"]))
            maps = self._maps_of(prog_id)
            self._sync(maps["subnets"], wanted_subnets, verify)
            self._sync(maps["subnets6"], wanted_subnets6, verify)
            if hook.section == FROM_UNDERLAY:
                self._sync(maps["peers"], wanted_peers, verify)
            else:
                # A new copy's map is all zero; a port's is written, and again on a
                # verifying pass (bpftool may have changed it).
                value = bridge_value(hook.port_of)
                if self._bridges.get(maps["bridge"], bridge_value(None)) != value or (
                        verify and hook.port_of is not None):
                    bridges[maps["bridge"]] = value
        if bridges:
            _tc(["bpftool", "batch", "file", "-"], stdin="".join(
                f"map update id {m} key 0 0 0 0 value {' '.join(v)}\n"
                for m, v in bridges.items()))
            self._bridges.update(bridges)
        self.attached = kept
        self.veths = veths
        # Forget the programs (and their maps) that are no longer attached.
        self._maps = {p: m for p, m in self._maps.items() if p in programs}
        live = {map_id for maps in self._maps.values() for map_id in maps.values()}
        self._keys = {m: k for m, k in self._keys.items() if m in live}
        self._bridges = {m: v for m, v in self._bridges.items() if m in live}
        return attached

    def _maps_of(self, prog_id: int) -> dict[str, int]:
        if prog_id not in self._maps:
            self._maps[prog_id] = _map_ids(prog_id)
        return self._maps[prog_id]

    def _sync(self, map_id: int, wanted: set[tuple[str, ...]], verify: bool) -> None:
        have = None if verify else self._keys.get(map_id)
        self._keys.pop(map_id, None)  # not known again until the write has succeeded
        _sync_map(map_id, wanted, _map_keys(map_id) if have is None else have)
        self._keys[map_id] = set(wanted)

    def detach_others(self, keep: Iterable[str]) -> None:
        """weft's filter off every device not in `keep` (a container's veth that moved, a
        bridge no longer used)."""
        remove_fastpath(exclude=set(keep))

    def status(self) -> dict[str, Any]:
        redirected = {"from_container": 0, "from_underlay": 0}
        devices: list[str] = []
        for hook in self.attached:
            current = _owned_filter(hook.device)
            if current is None:
                continue
            devices.append(hook.device)
            maps = self._maps_of(int(current["options"]["prog"]["id"]))
            redirected[PROGRAM_NAMES[hook.section]] += _counter(
                maps["redirected"], _COUNTER_INDEX[hook.section])
        result: dict[str, Any] = {"attached": devices, "redirected_packets": redirected}
        if self.skipped:
            result["skipped"] = dict(self.skipped)
        return result


def remove_fastpath(exclude: set[str] | None = None) -> list[str]:
    """weft's fast path filters off every device of this namespace (but `exclude`); the
    devices it was removed from. A clsact qdisc goes too when nothing else is on it."""
    if shutil.which("tc") is None:
        return []
    qdiscs = json.loads(_tc(["tc", "-j", "qdisc", "show"]) or "[]")
    removed: list[str] = []
    for q in qdiscs:
        dev = q.get("dev")
        if q.get("kind") != "clsact" or not dev or dev in (exclude or set()):
            continue
        if _owned_filter(dev) is None:
            continue
        _tc(["tc", "filter", "del", "dev", dev, "ingress", "pref", str(PREF), "handle", "1",
             "bpf"])
        removed.append(dev)
        others = [json.loads(_tc(["tc", "-j", "filter", "show", "dev", dev, d]) or "[]")
                  for d in ("ingress", "egress")]
        if not any(others):
            _tc(["tc", "qdisc", "del", "dev", dev, "clsact"])
    return removed
