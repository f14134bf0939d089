"""Overlay traffic through a FORWARD chain that drops: Docker's iptables policy.

Docker (since 1.13) sets iptables' filter FORWARD policy to DROP and accepts only what it
knows, so packets between containers on different hosts would die in the host that
forwards them. An accept in weft's own nftables table cannot help (nftables runs every
base chain, and a drop anywhere wins), so like flannel weft appends two rules to that
chain itself, marked with a comment, and removes exactly those when the host leaves.

The rules are scoped to weft's devices (`-i`/`-o`): overlay traffic enters and leaves
through the tunnel device (for host-gw and direct routing: the underlay, overlay to
overlay only), so a packet that merely claims an overlay address on another interface
still meets the DROP policy. (The ingress filter, `weft.host.ingress_rules`, already
dropped overlay sources that arrived on the wrong interface.)

With br_netfilter loaded, a packet between two containers on one host's bridge (`weft0`,
the CNI plugin's) crosses iptables FORWARD too, as `-i weft0 -o weft0`, and Docker's DROP
policy drops it: containers on one host lose each other (flannel's CNI users meet it;
flannel accepts its whole network from and to any interface). weft adds one more rule for
that, scoped as tightly: in and out of its bridge, overlay to overlay. It is there whenever
br_netfilter is loaded in this namespace, whatever `bridge-nf-call-iptables` says now: the
sysctl can be turned on without any event the agent could see. Docker accepts its own
`docker0` traffic itself.

Only where they can matter: on a host whose FORWARD chain accepts everything and holds
no rule of anyone else, the rules would only walk every forwarded packet through a chain
(and, with iptables-nft, register one), so weft adds none there, and removes its own if
the chain no longer needs them. The agent checks again every resync, so a Docker started
later gets them then.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from weft.core.config import IPNetwork
from weft.core.errors import KernelError

COMMENT = "weft: overlay traffic"


def forward_accept_rules(network: IPNetwork, tunnels: Sequence[str],
                         direct: str | None, bridge: str | None = None) -> list[list[str]]:
    """The rule specs (pure): overlay traffic through weft's devices is accepted. `tunnels`
    and `direct` are the backend's facts (`BackendFacts.tunnels`, `.bare_underlay`): its
    tunnel devices, and the underlay if overlay packets cross it unencapsulated; `bridge`:
    the container bridge whose bridged packets cross FORWARD (br_netfilter), if any.
    Written in the order `iptables -S` prints them."""
    net = str(network)
    tail = ["-m", "comment", "--comment", COMMENT, "-j", "ACCEPT"]
    rules: list[list[str]] = []
    for tunnel in tunnels:
        rules += [["-d", net, "-i", tunnel, *tail], ["-s", net, "-o", tunnel, *tail]]
    if direct is not None:
        rules += [["-s", net, "-d", net, flag, direct, *tail] for flag in ("-i", "-o")]
    if bridge is not None:
        rules.append(["-s", net, "-d", net, "-i", bridge, "-o", bridge, *tail])
    return rules


def same_rule(line: str, spec: Sequence[str]) -> bool:
    """Whether a line of `iptables -S FORWARD` is the rule `spec` (pure): the same options
    with the same values, in any order."""
    words = _words(line)
    return words is not None and words[:2] == ["-A", "FORWARD"] and \
        _options(words[2:]) == _options(spec)


def weft_rules(listing: str, network: IPNetwork) -> list[list[str]]:
    """weft's FORWARD rules for `network` in an `iptables -S FORWARD` listing (pure), each
    as its spec (what `-D FORWARD` takes): marked with the comment, naming the network.
    Whatever devices they name: a rule of a device no longer used is one of them too."""
    found = []
    for line in listing.splitlines():
        words = _words(line)
        if words is not None and words[:2] == ["-A", "FORWARD"] and COMMENT in words \
                and str(network) in words:
            found.append(words[2:])
    return found


def _words(line: str) -> list[str] | None:
    try:
        return shlex.split(line)
    except ValueError:
        return None


def _options(words: Sequence[str]) -> list[tuple[str, ...]]:
    groups: list[tuple[str, ...]] = []
    for word in words:
        if word.startswith("-") or not groups:
            groups.append((word,))
        else:
            groups[-1] += (word,)
    return sorted(groups)


def bridged_through_iptables(version: int) -> bool:
    """Whether br_netfilter is loaded in this namespace (its sysctl is there): then
    bridged packets may cross iptables (ip6tables) FORWARD."""
    name = "bridge-nf-call-iptables" if version == 4 else "bridge-nf-call-ip6tables"
    return (Path("/proc/sys/net/bridge") / name).exists()


def forward_accept_needed(listing: str) -> bool:
    """From `iptables -S FORWARD` (pure): whether anything in the chain could drop overlay
    traffic: a policy other than ACCEPT, or any rule that is not weft's."""
    lines = [ln.strip() for ln in listing.splitlines()]
    others = [ln for ln in lines if ln.startswith("-A FORWARD") and COMMENT not in ln]
    return "-P FORWARD ACCEPT" not in lines or bool(others)


def _binary(network: IPNetwork) -> str | None:
    return shutil.which("iptables" if network.version == 4 else "ip6tables")


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    # -w: wait for the xtables lock (Docker, kube-proxy) instead of failing at once.
    return subprocess.run([argv[0], "-w", "5", *argv[1:]], capture_output=True, text=True,
                          check=False, timeout=30)


def ensure_forward_accept(network: IPNetwork, tunnels: Sequence[str],
                          direct: str | None, bridge: str | None = None) -> bool:
    """Append the rules to filter/FORWARD unless already there (idempotent), when the
    chain could drop overlay traffic; otherwise make sure none of weft's is there. The rule
    for `bridge` only while br_netfilter is loaded. Every other rule of weft's for this
    network goes: a device no longer used (dual stack's second tunnel once it is turned
    off, another backend's), the bridge's once br_netfilter is gone, an earlier release's,
    a second copy. True when the rules are in place. Listing the chain creates no table."""
    binary = _binary(network)
    if binary is None:
        return False  # no iptables at all: then nothing of Docker's can drop either
    listing = _run([binary, "-S", "FORWARD"])
    if listing.returncode == 0 and not forward_accept_needed(listing.stdout):
        _delete(binary, weft_rules(listing.stdout, network))
        return False
    bridged = bridge if bridge is not None and bridged_through_iptables(network.version) \
        else None
    wanted = forward_accept_rules(network, tunnels, direct, bridged)
    for rule in wanted:
        if _run([binary, "-C", "FORWARD", *rule]).returncode == 0:
            continue
        added = _run([binary, "-A", "FORWARD", *rule])
        if added.returncode != 0:
            raise KernelError(f"iptables refused the FORWARD accept rule "
                              f"{' '.join(rule)}: {added.stderr.strip()}")
    # `-C` can miss a rule while another tool (dockerd restarting) rewrites the chain, and
    # the rule is then appended twice: exactly one copy of each stays.
    kept: list[list[str]] = []
    unwanted = []
    for spec in weft_rules(_run([binary, "-S", "FORWARD"]).stdout, network):
        match = next((r for r in wanted if _options(r) == _options(spec)), None)
        if match is None or match in kept:
            unwanted.append(spec)
        else:
            kept.append(match)
    _delete(binary, unwanted)
    return True


def remove_forward_accept(network: IPNetwork) -> None:
    """Delete every rule of weft's for `network`; rules of others stay."""
    binary = _binary(network)
    if binary is not None:
        _delete(binary, weft_rules(_run([binary, "-S", "FORWARD"]).stdout, network))


def _delete(binary: str, specs: list[list[str]]) -> None:
    for spec in specs:  # one `-D` per listed copy: each deletes one
        _run([binary, "-D", "FORWARD", *spec])
