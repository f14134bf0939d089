"""Backends by `Type`: a plain dict, explicit wiring, no import side effects.

Adding a backend is its package plus one entry here: its `BackendSpec` (declared in its
package's `options.py`): the options model validated from the config's `Backend`, its
factory, its facts (`BackendFacts`: ports, devices, overhead), its per-packet overhead
and the check of a peer's BackendData. Nothing outside `weft.backends` asks which backend
a host runs: it is handed the facts. Factories are named, not imported: the udp and
wireguard backends pull in threads, crypto and more, and a host imports only the one it
runs. Pure: importing this module imports only the options models.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from weft.backends.auto.options import AUTO_BACKEND
from weft.backends.base import BackendFacts, BackendSpec
from weft.backends.hostgw.options import HOSTGW_BACKEND
from weft.backends.udp.options import UDP_BACKEND
from weft.backends.vxlan.options import VXLAN_BACKEND
from weft.backends.wireguard.options import WIREGUARD_BACKEND
from weft.core import config as core_config
from weft.core.config import BackendOptions, BackendTypes, NetworkConfig
from weft.core.errors import ConfigError
from weft.core.host import HostContext

if TYPE_CHECKING:
    from weft.backends.base import Backend

BACKENDS: dict[str, BackendSpec[Any]] = {
    "vxlan": VXLAN_BACKEND,
    "host-gw": HOSTGW_BACKEND,
    "udp": UDP_BACKEND,
    "auto": AUTO_BACKEND,
    "wireguard": WIREGUARD_BACKEND,
}

# The backend of a config whose `Backend` names no `Type` (flannel's default too).
DEFAULT_TYPE = "vxlan"
TYPES = BackendTypes({name: spec.options for name, spec in BACKENDS.items()}, DEFAULT_TYPE)


def parse_config(text: str | bytes) -> NetworkConfig:
    """Parse and validate the JSON network config, `Backend` by its `Type`'s own options
    model, or raise ConfigError naming the field and the value. A dual-stack network on a
    backend that cannot carry one is refused here, at `weft config set`, not peer by peer
    at run time."""
    config = core_config.parse_config(text, TYPES)
    why = BACKENDS[config.backend.type].no_dual_stack
    if config.dual_stack and why is not None:
        raise ConfigError(f"EnableIPv6: the {config.backend.type} backend cannot carry a "
                          f"dual-stack network: {why}")
    return config


def ipv6_next_hops(config: NetworkConfig) -> str | None:
    """What a host of this network needs from its underlay beyond its PublicIP, or None:
    a backend that routes an IPv6 overlay via underlay next hops (host-gw) needs an IPv6
    address on one segment shared by every host. Said at `weft config set` and checked
    by the agent at start."""
    six = config.ipv6.network if config.ipv6 is not None else (
        config.network if config.network.version == 6 else None)
    if six is None or not BACKENDS[config.backend.type].ipv6_next_hops:
        return None
    return (f"{config.backend.type} routes {six} via IPv6 next hops (the kernel takes no "
            "IPv4 next hop for an IPv6 route): every host needs an IPv6 address on one "
            "segment shared by all (--public-ipv6, or found on --iface); over an IPv4-only "
            "underlay use vxlan, udp or wireguard")


def create_backend(config: NetworkConfig, host: HostContext) -> Backend:
    module, _, name = BACKENDS[config.backend.type].factory.partition(":")
    factory = getattr(importlib.import_module(module), name)
    return cast("Backend", factory(config, host))


def backend_facts(options: BackendOptions, underlay: str,
                  dual_stack: bool = False) -> BackendFacts:
    """What the rest of the host needs to know about the backend `options` configure, on a
    host whose underlay device is `underlay` (`dual_stack`: of a dual-stack network)."""
    spec = BACKENDS[options.type]
    facts = spec.facts(options, underlay)
    if dual_stack and spec.ipv6_tunnels is not None:
        six = spec.ipv6_tunnels(options)
        facts = dataclasses.replace(facts, tunnels=facts.tunnels + six,
                                    arrival6=six if facts.arrival is not None else ())
    return facts


def overhead(backend_type: str, ip_version: int = 4) -> int:
    """Bytes an encapsulation adds to every packet on the underlay."""
    try:
        return BACKENDS[backend_type].overhead(ip_version)
    except KeyError:
        raise ValueError(f"no backend {backend_type!r}") from None


def overlay_mtu(options: BackendOptions, underlay_mtu: int, ip_version: int) -> int:
    """The MTU of the overlay: `Backend.MTU` if set, else what the underlay leaves."""
    return options.mtu or underlay_mtu - overhead(options.type, ip_version)


def backend_data_problem(backend_type: str, data: Mapping[str, Any]) -> str | None:
    """Why a lease's BackendData cannot be used by its own backend, or None."""
    spec = BACKENDS.get(backend_type)
    if spec is None:
        return f"unknown BackendType {backend_type!r}"
    return spec.data_problem(data)
