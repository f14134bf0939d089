"""`weft doctor`'s checks, pure: facts gathered beforehand -> pass / warn / fail, each with
one line saying what is wrong and what to do. The gathering is the edge
(weft.agent.doctor_facts); nothing here reads a file, runs a command or the clock.

The list is what operators of container overlays meet again and again (flannel's tracker
over ten years): subnet.env missing or stale, the wrong address advertised, MTU black holes,
Docker's bridge or FORWARD policy, other tools' firewall rules, br_netfilter, rp_filter,
VXLAN checksum offload bugs, a subnet claimed twice, unreachable peers, the store.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from weft.core.config import IPAddress, IPNetwork
from weft.core.constants import CNI_BRIDGE

Result = Literal["pass", "warn", "fail"]
COMMENT = "weft: overlay traffic"  # weft.host.forward_accept's rule comment
WEFT_NFT_TABLES = frozenset({"weft", "weft-ingress", "weft-untrack"})
# The kernels that mishandle the checksum offload of VXLAN packets that are NATed after
# encapsulation (flannel #1279, #1679, #1859: 63 s SYN delays through kube-proxy NAT);
# fixed upstream in 5.14 ("vxlan: do not modify the shared tunnel info..."): older kernels
# get a warning when the offload is on. A conservative rule, not a bisected one.
VXLAN_CSUM_FIXED = (5, 14)


@dataclass(frozen=True)
class Check:
    name: str
    result: Result
    message: str  # what is wrong (or what was found), and what to do

    def as_json(self) -> dict[str, str]:
        return {"name": self.name, "result": self.result, "message": self.message}


@dataclass(frozen=True)
class LeaseFact:
    subnet: IPNetwork
    public_ip: IPAddress
    expires_in: float
    key: str = ""


@dataclass(frozen=True)
class BridgeFact:
    name: str
    addresses: tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...]
    mtu: int
    # Containers' interfaces on it: a bridge with none keeps 1500 whatever dockerd's --mtu
    # (the kernel gives a bridge its smallest port's MTU), so only then does its MTU tell.
    ports: int = 1


@dataclass(frozen=True)
class Facts:
    """Everything the checks look at, gathered on this host."""

    agent: Mapping[str, Any] | None = None  # the agent's status; None: no agent answers
    agent_error: str = ""
    store_error: str | None = None  # None: the store answered
    config_error: str | None = None  # None: the config in the store is valid
    leases: Sequence[LeaseFact] = ()
    addresses: Mapping[str, tuple[IPAddress, ...]] = field(default_factory=dict)  # by device
    subnet_env_path: str = ""
    subnet_env: str | None = None  # its text; None: missing
    docker: BridgeFact | None = None  # Docker's default bridge, when there is one
    bridges: Sequence[BridgeFact] = ()  # the container bridges: weft's CNI one, Docker's
    iptables_forward: str | None = None  # `iptables -S FORWARD`; None: no iptables
    iptables_input: str | None = None  # `iptables -S INPUT`
    nft: Mapping[str, Any] | None = None  # `nft -j list ruleset`
    sysctl: Mapping[str, str] = field(default_factory=dict)  # "net/ipv4/conf/all/rp_filter"
    tx_checksum: Mapping[str, bool] = field(default_factory=dict)  # device -> offload on
    kernel: tuple[int, int] = (0, 0)


def _ok(name: str, message: str) -> Check:
    return Check(name, "pass", message)


# --- the agent and its lease ------------------------------------------------------------

def check_agent(f: Facts) -> Check:
    if f.agent is None:
        return Check("agent", "fail", f"{f.agent_error or 'no agent answers'}; start it "
                     "(`systemctl start weft`) and read its log (`journalctl -u weft`)")
    return _ok("agent", f"running; subnet {f.agent.get('subnet')}, backend "
               f"{f.agent.get('backend')}")


def check_lease(f: Facts) -> Check:
    if f.agent is None:
        return Check("lease", "warn", "no agent to ask which lease is this host's")
    subnet = ipaddress.ip_network(str(f.agent.get("subnet")))
    public_ip = ipaddress.ip_address(str(f.agent.get("public_ip")))
    iface = str(f.agent.get("underlay_iface", ""))
    here = f.addresses.get(iface, ())
    if public_ip not in here:
        where = [dev for dev, ips in f.addresses.items() if public_ip in ips]
        now = ", ".join(map(str, here)) or "no address"
        return Check("lease", "fail", (
            f"the lease names {public_ip}, which is no longer on {iface} (it has {now}"
            + (f"; {public_ip} is on {where[0]}" if where else "") + "): peers send to an "
            "address this host does not have; restart the agent so it advertises the "
            "current one (or pass --public-ip/--iface)"))
    if f.store_error is not None:
        return Check("lease", "warn", f"cannot read the store to check the lease of {subnet}")
    lease = next((x for x in f.leases if x.subnet == subnet), None)
    if lease is None:
        return Check("lease", "fail", f"the store holds no lease for {subnet}: the agent "
                     "takes it back at its next renewal; if it does not, restart it")
    if lease.public_ip != public_ip:
        return Check("lease", "fail", f"the store's lease of {subnet} names {lease.public_ip}"
                     f", not this host's {public_ip}: another host holds it; restart this "
                     "agent (it moves to a new subnet)")
    if lease.expires_in <= 0:
        return Check("lease", "fail", f"the lease of {subnet} expired: the agent cannot renew "
                     "it; check that the store is reachable and accepts its credentials")
    return _ok("lease", f"{subnet} on {public_ip} ({iface}), live")


def check_duplicate_address(f: Facts) -> Check:
    if f.agent is None or f.store_error is not None:
        return Check("duplicate address", "warn", "no agent or store to check against")
    public_ip = ipaddress.ip_address(str(f.agent.get("public_ip")))
    mine = sorted(str(x.subnet) for x in f.leases if x.public_ip == public_ip)
    if len(mine) > 1:
        return Check("duplicate address", "fail", (
            f"{len(mine)} leases name this host's address {public_ip}: {', '.join(mine)}; "
            "peers keep only one: give each host its own address (--public-ip), or delete "
            "the stale lease from the store"))
    return _ok("duplicate address", f"one lease names {public_ip}")


# --- subnet.env ----------------------------------------------------------------------------

def _env(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def check_subnet_env(f: Facts) -> Check:
    path = f.subnet_env_path
    if f.subnet_env is None:
        return Check("subnet.env", "fail", (
            f"{path} is missing: Docker and CNI read the subnet from it; a running agent "
            "writes it back at once, so the agent is not running or cannot write there "
            "(see host_errors in `weft status`)"))
    if f.agent is None:
        return Check("subnet.env", "warn", f"{path} exists; no agent to check it against")
    env = _env(f.subnet_env)
    subnet = ipaddress.ip_network(str(f.agent.get("subnet")))
    problems = []
    try:
        if ipaddress.ip_interface(env.get("FLANNEL_SUBNET", "")).ip not in subnet:
            problems.append(f"FLANNEL_SUBNET={env.get('FLANNEL_SUBNET')} is not in the "
                            f"lease's {subnet}")
    except (ValueError, TypeError):
        problems.append(f"FLANNEL_SUBNET={env.get('FLANNEL_SUBNET')!r} is not this host's "
                        f"{subnet}")
    if env.get("FLANNEL_MTU") != str(f.agent.get("mtu")):
        problems.append(f"FLANNEL_MTU={env.get('FLANNEL_MTU')}, the overlay's is "
                        f"{f.agent.get('mtu')}")
    if env.get("FLANNEL_NETWORK") != str(f.agent.get("network")):
        problems.append(f"FLANNEL_NETWORK={env.get('FLANNEL_NETWORK')}, the config's is "
                        f"{f.agent.get('network')}")
    if problems:
        return Check("subnet.env", "fail", (
            f"{path} is stale: {'; '.join(problems)}: the agent rewrites it when it changes; "
            "if it stays, something else writes it (or it is a copy): remove it, and "
            "restart what read it (dockerd)"))
    return _ok("subnet.env", f"{path} matches the lease ({subnet}, MTU {f.agent.get('mtu')})")


# --- the paths to the peers -----------------------------------------------------------------

def _peer_rows(f: Facts) -> dict[str, Any]:
    if f.agent is None:
        return {}
    rows: dict[str, Any] = (f.agent.get("peer_health") or {}).get("peers") or {}
    return rows


def check_mtu(f: Facts) -> Check:
    if f.agent is None or "peer_health" not in f.agent:
        return Check("MTU", "warn", "no probes to check the path MTU against")
    mtu = f.agent.get("mtu")
    short = sorted((p, r) for p, r in _peer_rows(f).items()
                   if r.get("pmtu") is not None and r["pmtu"] != mtu)
    if short:
        names = ", ".join(f"{p} ({r.get('public_ip')}) passes {r['pmtu']}" for p, r in short[:5])
        return Check("MTU", "fail", (
            f"the overlay MTU {mtu} does not fit the path to {len(short)} peer(s): {names}: "
            "full-size packets are lost (a black hole for TCP); set the underlay's MTU "
            "right on every link, or a smaller Backend.MTU in the config"))
    probed = sum(1 for r in _peer_rows(f).values() if r.get("pmtu") is not None)
    return _ok("MTU", f"{mtu} passes the path to every peer probed ({probed})")


def check_peers(f: Facts) -> Check:
    if f.agent is None or "peer_health" not in f.agent:
        return Check("peers", "warn", "no probes: no agent, or probing is off")
    rows = _peer_rows(f)
    down = sorted(((p, r) for p, r in rows.items() if r.get("state") == "unreachable"),
                  key=lambda pr: -float(pr[1].get("since_s") or 0))
    if down:
        names = "; ".join(f"{p} ({r.get('public_ip')}) on {r.get('plane')} for "
                          f"{round(r.get('since_s') or 0)}s" for p, r in down[:5])
        more = f" and {len(down) - 5} more" if len(down) > 5 else ""
        port = f.agent.get("encap_port")
        return Check("peers", "fail", (
            f"{len(down)} of {len(rows)} peers unreachable: {names}{more}: check that their "
            "agent runs (`weft doctor --cluster` says which side) and that the underlay "
            + (f"carries UDP port {port} between the hosts" if port else
               "routes between the hosts")))
    unknown = sum(1 for r in rows.values() if r.get("state") == "unknown")
    return _ok("peers", f"{len(rows) - unknown} of {len(rows)} peers reachable"
               + (f" ({unknown} not yet probed)" if unknown else ""))


# --- the firewall -------------------------------------------------------------------------------

def _forward_policy(listing: str) -> str:
    m = re.search(r"^-P FORWARD (\w+)", listing, re.M)
    return m[1] if m else "ACCEPT"


def check_forward(f: Facts) -> Check:
    if f.iptables_forward is None:
        return _ok("FORWARD", "no iptables on this host")
    lines = [ln.strip() for ln in f.iptables_forward.splitlines()]
    policy = _forward_policy(f.iptables_forward)
    ours = [i for i, ln in enumerate(lines) if COMMENT in ln]
    if policy != "ACCEPT" and not ours:
        return Check("FORWARD", "fail", (
            f"the FORWARD policy is {policy} (Docker sets it) and weft's accepts are "
            "missing: overlay traffic is dropped between hosts; the agent puts them back on "
            "its next pass: if they stay missing, read host_errors in `weft status`"))
    first_ours = ours[0] if ours else len(lines)
    drops = [ln for ln in lines[:first_ours] if ln.startswith("-A FORWARD")
             and re.search(r"-j (DROP|REJECT)\b", ln)]
    if drops:
        return Check("FORWARD", "fail", (
            f"a rule before weft's accepts drops forwarded packets: `{drops[0]}`: overlay "
            "traffic may match it; add an exception for the overlay network before it, "
            "or move it after weft's rules"))
    return _ok("FORWARD", f"policy {policy}; weft's accepts in place" if ours
               else f"policy {policy}")


def _nft_chains(nft: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [item["chain"] for item in nft.get("nftables", []) if "chain" in item]


def _nft_rules(nft: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [item["rule"] for item in nft.get("nftables", []) if "rule" in item]


def _drops(rule: Mapping[str, Any]) -> bool:
    return any("drop" in e or "reject" in e for e in rule.get("expr", [])
               if isinstance(e, dict))


def _port_of(rule: Mapping[str, Any]) -> set[int]:
    ports: set[int] = set()
    for e in rule.get("expr", []):
        match = e.get("match") if isinstance(e, dict) else None
        if not isinstance(match, dict):
            continue
        left, right = match.get("left"), match.get("right")
        if isinstance(left, dict) and left.get("payload", {}).get("field") == "dport":
            if isinstance(right, int):
                ports.add(right)
            elif isinstance(right, dict) and "set" in right:
                ports.update(x for x in right["set"] if isinstance(x, int))
    return ports


def check_other_rules(f: Facts) -> Check:
    """Other tools' nftables chains that drop forwarded traffic, and any rule (nftables or
    iptables INPUT) that drops the encapsulation port."""
    problems: list[str] = []
    port = f.agent.get("encap_port") if f.agent is not None else None
    if f.nft is not None:
        for chain in _nft_chains(f.nft):
            if chain.get("table") in WEFT_NFT_TABLES:
                continue
            if chain.get("hook") == "forward" and chain.get("policy") == "drop" \
                    and chain.get("table") not in ("filter",):  # iptables-nft: FORWARD check
                problems.append(f"nftables chain {chain.get('family')} {chain.get('table')} "
                                f"{chain.get('name')} drops forwarded packets by policy")
        for rule in _nft_rules(f.nft):
            if rule.get("table") in WEFT_NFT_TABLES or port is None:
                continue
            if _drops(rule) and port in _port_of(rule):
                problems.append(f"nftables {rule.get('family')} {rule.get('table')} "
                                f"{rule.get('chain')} drops UDP port {port}")
    if f.iptables_input is not None and port is not None:
        for ln in f.iptables_input.splitlines():
            if re.search(rf"--dport {port}\b", ln) and re.search(r"-j (DROP|REJECT)\b", ln):
                problems.append(f"iptables INPUT `{ln.strip()}` drops UDP port {port}")
    if problems:
        return Check("other rules", "fail", (
            f"{problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1
                                else "") + ": overlay packets die there; allow the overlay "
            "network and the encapsulation port from the other hosts"))
    return _ok("other rules", "no other rule drops the overlay or its port")


def _bridge_accepted(listing: str, bridge: str) -> bool:
    """Whether FORWARD accepts packets from `bridge` back out of it (Docker adds such a rule
    for docker0, the agent one for weft0, scoped to the overlay), or accepts everything
    unconditionally."""
    for line in listing.splitlines():
        try:
            words = shlex.split(line)
        except ValueError:
            continue
        if words[:2] != ["-A", "FORWARD"] or words[-2:] != ["-j", "ACCEPT"]:
            continue
        rest = words[2:-2]
        if not rest:
            return True
        options = dict(zip(rest[::2], rest[1::2], strict=False))
        if len(rest) % 2 == 0 and options.get("-i") == bridge \
                and options.get("-o") == bridge and options.get("-m", "comment") == "comment" \
                and set(options) <= {"-i", "-o", "-s", "-d", "-m", "--comment"}:
            return True
    return False


def check_br_netfilter(f: Facts) -> Check:
    """With br_netfilter, packets between two containers on one bridge cross iptables
    FORWARD (as `-i B -o B`): under Docker's DROP policy they need an accept (the agent
    adds one for weft0 while br_netfilter is loaded; Docker one for docker0), or
    containers on one host lose each other."""
    value = f.sysctl.get("net/bridge/bridge-nf-call-iptables")
    if value is None:
        return _ok("br_netfilter", "not loaded: packets between containers on one bridge "
                   "skip iptables (Kubernetes Services need it: `modprobe br_netfilter`)")
    listing = f.iptables_forward or ""
    policy = _forward_policy(listing)
    if value == "1" and policy != "ACCEPT":
        blocked = [b.name for b in f.bridges if b.ports and not _bridge_accepted(listing,
                                                                                   b.name)]
        if blocked:
            b = blocked[0]
            what = (f"the agent adds its accept for {b} on its next pass: if it stays "
                    "missing, read host_errors in `weft status`" if b == CNI_BRIDGE else
                    f"`iptables -I FORWARD -i {b} -o {b} -j ACCEPT` (dockerd adds it unless "
                    "started with --icc=false)")
            return Check("br_netfilter", "fail", (
                f"bridge-nf-call-iptables=1 sends packets between containers on {b} through "
                f"FORWARD (policy {policy}) and no rule accepts them: containers on this "
                f"host cannot reach each other; {what}"
                " (or `sysctl -w net.bridge.bridge-nf-call-iptables=0` if nothing needs it)"))
    return _ok("br_netfilter", f"bridge-nf-call-iptables={value}; "
               + ("FORWARD accepts bridged packets" if policy == "ACCEPT" else
                  "every container bridge's own traffic is accepted"))


def check_rp_filter(f: Facts) -> Check:
    if f.agent is None:
        return Check("rp_filter", "warn", "no agent to name the overlay's devices")
    every = f.sysctl.get("net/ipv4/conf/all/rp_filter", "0")
    strict = []
    for device in f.agent.get("devices") or []:
        mine = f.sysctl.get(f"net/ipv4/conf/{device}/rp_filter")
        if mine is not None and max(int(every), int(mine)) == 1:
            strict.append(str(device))
    if strict and f.agent.get("backend") == "auto":
        return Check("rp_filter", "fail", (
            f"strict reverse-path filtering on {', '.join(strict)}: a peer answering on "
            "another plane is dropped; the agent loosens it at start: restart it, or "
            f"`sysctl -w net.ipv4.conf.{strict[0]}.rp_filter=2`"))
    if strict:
        return Check("rp_filter", "warn", (
            f"strict reverse-path filtering on {', '.join(strict)}: fine while each peer's "
            "packets come back the way they left; if a peer is reachable one way only, "
            f"`sysctl -w net.ipv4.conf.{strict[0]}.rp_filter=2`"))
    return _ok("rp_filter", "loose or off on the overlay's devices")


def check_vxlan_offload(f: Facts) -> Check:
    risky = [d for d, on in f.tx_checksum.items() if on and d.startswith("weft.vx")]
    if risky and f.kernel < VXLAN_CSUM_FIXED:
        k = ".".join(map(str, f.kernel))
        return Check("VXLAN offload", "warn", (
            f"kernel {k} with checksum offload on {risky[0]}: kernels before 5.14 can send "
            "VXLAN packets that are NATed after encapsulation with bad checksums (SYNs "
            f"lost for 63 s); `ethtool -K {risky[0]} tx-checksum-ip-generic off`"))
    if not f.tx_checksum:
        return _ok("VXLAN offload", "no VXLAN device of weft's to check")
    k = ".".join(map(str, f.kernel))
    states = ", ".join(f"{d} {'on' if on else 'off'}" for d, on in sorted(f.tx_checksum.items()))
    return _ok("VXLAN offload", f"checksum offload {states}; kernel {k} handles it")


# --- Docker ---------------------------------------------------------------------------------

def check_docker(f: Facts) -> Check:
    d = f.docker
    if d is None:
        return _ok("Docker", "no Docker bridge on this host")
    if f.agent is None:
        return Check("Docker", "warn", f"{d.name} exists; no agent to check it against")
    subnet = ipaddress.ip_network(str(f.agent.get("subnet")))
    inside = [a for a in d.addresses if a.version == subnet.version and a.ip in subnet]
    mtu = f.agent.get("mtu")
    if not inside:
        have = ", ".join(map(str, d.addresses)) or "no address"
        return Check("Docker", "fail", (
            f"{d.name} has {have}, not in this host's subnet {subnet}: containers get "
            "addresses no peer routes to; start dockerd with `$(weft docker-opts)` "
            "(--bip and --mtu from subnet.env)"))
    if isinstance(mtu, int) and d.mtu > mtu and d.ports:
        return Check("Docker", "fail", (
            f"{d.name} has MTU {d.mtu}, the overlay's is {mtu}: full-size packets between "
            "hosts are lost; start dockerd with `$(weft docker-opts)`"))
    return _ok("Docker", f"{d.name} on {inside[0]}, " + (
        f"MTU {d.mtu}" if d.ports else "no container yet to show its MTU"))


# --- the store ------------------------------------------------------------------------------

def check_store(f: Facts) -> Check:
    if f.store_error is not None:
        return Check("store", "fail", f"{f.store_error}; check --store and the credentials, "
                     "and that the store runs and is reachable from this host")
    if f.config_error is not None:
        return Check("store", "fail", f"the network config in the store is invalid: "
                     f"{f.config_error}: fix it with `weft config set FILE`")
    return _ok("store", f"reachable, config valid, {len(f.leases)} leases")


CHECKS: Sequence[Callable[[Facts], Check]] = (
    check_agent, check_lease, check_subnet_env, check_store, check_duplicate_address,
    check_peers, check_mtu, check_forward, check_other_rules, check_br_netfilter,
    check_rp_filter, check_vxlan_offload, check_docker,
)


def diagnose(facts: Facts) -> list[Check]:
    return [check(facts) for check in CHECKS]


def exit_status(checks: Sequence[Check]) -> int:
    """0 only when nothing fails (warnings pass)."""
    return 1 if any(c.result == "fail" for c in checks) else 0


# --- the cluster view --------------------------------------------------------------------------
#
# Each host's probe is answered by the peer's agent on the same pair of ports, so the way
# from X to Y carries X's probes and the answers to Y's alike: X reaching Y proves both
# ways. When X cannot reach Y, what arrives tells the sides apart: if Y's own probes still
# arrive at X (X `hears` Y), the way from Y to X works and the way from X to Y is broken.

Direction = Literal["one way", "both ways", "partly", "unknown", "no answer"]
OtherWay = Literal["works", "broken", "unknown"]


@dataclass(frozen=True)
class View:
    """One host's view of its peers (its summary, or this host's own probe rows)."""

    unreachable: frozenset[str]
    hears: frozenset[str] = frozenset()  # of the unreachable: those whose probes arrive
    complete: bool = True  # every other peer reachable (no list cut short, none unprobed)


def view_of_summary(summary: Any) -> View | None:
    """A peer's summary (its agent's answer, as it sent it) as its view; None, as no
    answer, if it is not of a summary's shape (counts an object, unreachable and hears
    lists of subnets as strings): a peer's bad answer must not stop the cluster view."""
    if not isinstance(summary, Mapping):
        return None
    counts = summary.get("counts") or {}
    down, hears = (summary.get(key) or [] for key in ("unreachable", "hears"))
    if not isinstance(counts, Mapping) or not all(
            isinstance(names, list) and all(isinstance(n, str) for n in names)
            for names in (down, hears)):
        return None
    return View(frozenset(down), frozenset(hears),
                not summary.get("truncated") and not counts.get("unknown", 0))


def view_of_rows(rows: Mapping[str, Mapping[str, Any]]) -> View:
    """This host's own view, from the probe rows of its agent's status."""
    down = frozenset(p for p, r in rows.items() if r.get("state") == "unreachable")
    return View(down, frozenset(p for p in down if rows[p].get("hears")),
                all(r.get("state") != "unknown" for r in rows.values()))


@dataclass(frozen=True)
class PairFailure:
    """A pair whose traffic fails. `source` -> `target` is the way known broken (for
    `both ways` both are; `partly`, `unknown`: which way is not known); `other_way` is what
    the opposite way does."""

    source: str
    target: str
    broken: Direction
    other_way: OtherWay
    message: str

    def as_json(self) -> dict[str, str]:
        return {"from": self.source, "to": self.target, "broken": self.broken,
                "other_way": self.other_way, "message": self.message}


def mesh(own: str, views: Mapping[str, View | None],
         names: Mapping[str, str] | None = None) -> list[PairFailure]:
    """`weft doctor --cluster`: each failing pair, with the way that fails. `views`: per
    host (subnet) its view, None when it did not answer; `own`'s view is this host's own.
    `names`: public IPs by subnet, for the messages."""
    names = names or {}

    def name(host: str) -> str:
        return f"{host} ({names[host]})" if host in names else host

    def witness(host: str) -> str | None:
        """Who shows that `host`'s agent runs: itself answering, or a peer reaching it or
        hearing its probes."""
        if views.get(host) is not None:
            return host
        return next((x for x, v in sorted(views.items()) if x != host and v is not None
                     and ((v.complete and host not in v.unreachable) or host in v.hears)),
                    None)

    def carries(x: str, y: str) -> bool | None:
        """Whether the way from x to y carries x's packets; None: not known."""
        vx, vy = views.get(x), views.get(y)
        if vx is not None and vx.complete and y not in vx.unreachable:
            return True  # x reaches y: both ways carry
        if vy is not None and vy.complete and x not in vy.unreachable:
            return True
        if vy is not None and x in vy.hears:
            return True  # y hears x's probes
        if vx is not None and y in vx.hears:
            # y runs and its way to x carries, yet x's probes go unanswered: lost on the way
            return False
        if vy is not None and x in vy.unreachable:
            return False if witness(x) is not None else None  # x runs, yet y hears nothing
        return None

    failures: list[PairFailure] = []
    seen: set[frozenset[str]] = set()
    for x, vx in sorted(views.items()):
        for y in sorted(vx.unreachable if vx is not None else ()):
            if frozenset((x, y)) in seen:
                continue
            seen.add(frozenset((x, y)))
            there, back = carries(x, y), carries(y, x)
            if there is False and back is False:
                failures.append(PairFailure(
                    x, y, "both ways", "broken",
                    f"{x} <-> {y}: broken both ways: neither hears the other's probes; look "
                    f"at the underlay between {names.get(x, x)} and {names.get(y, y)} and "
                    "at both hosts' firewalls"))
                continue
            if back is False:
                x, y, there, back = y, x, back, there  # name the broken way first
            if there is False:
                other: OtherWay = "works" if back else "unknown"
                runs = witness(x)
                failures.append(PairFailure(x, y, "one way", other, (
                    f"{x} -> {y}: packets from {name(x)} do not arrive at {name(y)}"
                    + ("; the other way works" if back else
                       f"; {x}'s agent runs ({runs} hears or reaches it), the other way is "
                       "unknown"
                       if runs not in (None, x) else "; the other way is unknown")
                    + f": look for what drops {names.get(x, x)}'s packets on "
                    f"{names.get(y, y)} (its INPUT, the encapsulation port), on "
                    f"{names.get(x, x)} (OUTPUT) or between the two")))
            elif there and back:
                failures.append(PairFailure(x, y, "partly", "works", (
                    f"{x} -> {y}: {x} cannot reach {y}, though packets pass both ways: "
                    "full-size ones are lost (the path MTU between them; see the MTU check)")))
            elif views.get(y) is not None or witness(y) is not None:
                failures.append(PairFailure(x, y, "unknown", "unknown", (
                    f"{x} -> {y}: {x} cannot reach {y} (which way is broken is not known)")))
    named = {frozenset((f.source, f.target)) for f in failures}
    for peer, view in sorted(views.items()):
        if view is not None:
            continue
        if witness(peer) is None:
            failures.append(PairFailure(own, peer, "no answer", "unknown", (
                f"{peer}: no answer to {own} (its agent down, or the path between the two "
                "broken)")))
        elif frozenset((own, peer)) not in named:
            failures.append(PairFailure(own, peer, "no answer", "unknown", (
                f"{peer}: no answer to {own}, though its agent runs ({witness(peer)} hears "
                "or reaches it): the path between the two drops the request or its answer")))
    return failures


