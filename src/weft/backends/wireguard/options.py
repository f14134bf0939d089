"""`Backend` options of the wireguard backend, and the bytes its encapsulation adds."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from weft.backends.base import BackendFacts, BackendSpec, by_ip_version
from weft.core.config import BackendOptions
from weft.core.constants import IP_HEADER, UDP_HEADER, WIREGUARD_DEVICE, WIREGUARD_HEADER

# Dual stack's second device, on the IPv6 underlay where this host has an address there.
WIREGUARD_DEVICE6 = f"{WIREGUARD_DEVICE}v6"
DEFAULT_PORT6 = 51821  # flannel's ListenPortV6


class WireguardOptions(BackendOptions):
    type: Literal["wireguard"] = Field(default="wireguard", alias="Type")
    listen_port: Annotated[int, Field(ge=1, le=65535)] = Field(default=51820, alias="ListenPort")
    # Dual stack: the port of the second device, on the IPv6 underlay (flannel's
    # ListenPortV6, default 51821); a device has one port, and each listens on every
    # address, so the two devices' ports differ. `port6` is the one used.
    listen_port_v6: Annotated[int, Field(ge=1, le=65535)] | None = Field(
        default=None, alias="ListenPortV6")
    persistent_keepalive: Annotated[int, Field(ge=0, le=65535)] = Field(
        default=0, alias="PersistentKeepaliveInterval"
    )
    psk: str | None = Field(default=None, alias="PSK", repr=False)
    # "auto" uses the kernel module where it exists, else wireguard-go.
    implementation: Literal["auto", "kernel", "wireguard-go"] = Field(
        default="auto", alias="Implementation"
    )

    @field_validator("psk")
    @classmethod
    def _psk_is_a_key(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            raw = base64.b64decode(value, validate=True)
        except binascii.Error:
            raw = b""
        if len(raw) != 32:
            raise ValueError("must be a base64-encoded 32-byte key (as `wg genpsk` prints)")
        return value

    @model_validator(mode="after")
    def _two_ports(self) -> WireguardOptions:
        if self.listen_port_v6 == self.listen_port:
            raise ValueError(f"ListenPortV6 {self.listen_port_v6} is ListenPort's too; the "
                             "IPv6 underlay's device needs a port of its own")
        return self

    @property
    def port6(self) -> int:
        """The IPv6 underlay device's port: ListenPortV6, by default 51821 (flannel's), or
        the port after ListenPort when ListenPort is 51821 itself."""
        if self.listen_port_v6 is not None:
            return self.listen_port_v6
        if self.listen_port != DEFAULT_PORT6:
            return DEFAULT_PORT6
        return self.listen_port + 1


def wireguard_overhead(ip_version: int) -> int:
    """Outer IP + UDP + WireGuard's data header and Poly1305 tag."""
    return IP_HEADER[ip_version] + UDP_HEADER + WIREGUARD_HEADER


def wireguard_data_problem(data: Mapping[str, Any]) -> str | None:
    """Why a peer's wireguard BackendData cannot be used, or None."""
    key = data.get("PublicKey")
    try:
        raw = base64.b64decode(key, validate=True) if isinstance(key, str) else b""
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        return "PublicKey is not a base64-encoded 32-byte WireGuard key"
    # BackendV6Data of a host with an IPv6 underlay device: that device's port (flannel's
    # layout; BackendData carries none, its port is ListenPort).
    port = data.get("Port")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                             or not 1 <= port <= 65535):
        return f"Port {port!r} is not a UDP port (1-65535)"
    return None


def wireguard_facts(options: WireguardOptions, underlay: str) -> BackendFacts:
    return BackendFacts(by_ip_version(wireguard_overhead), encap_port=options.listen_port,
                        encap_port6=options.port6,
                        tunnels=(WIREGUARD_DEVICE,), encrypted=True)


def wireguard_ipv6_tunnels(options: WireguardOptions) -> tuple[str, ...]:
    """Dual stack's second device, on the IPv6 underlay (flannel's flannel-wg-v6)."""
    return (WIREGUARD_DEVICE6,)


WIREGUARD_BACKEND = BackendSpec(WireguardOptions,
                                "weft.backends.wireguard.apply:WireguardBackend",
                                wireguard_facts, wireguard_overhead, wireguard_data_problem,
                                no_dual_stack=None, ipv6_tunnels=wireguard_ipv6_tunnels)
