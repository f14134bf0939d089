"""`Backend` options of the wireguard backend, and the bytes its encapsulation adds."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from weft.backends.base import BackendFacts, BackendSpec, by_ip_version
from weft.core.config import BackendOptions
from weft.core.constants import IP_HEADER, UDP_HEADER, WIREGUARD_DEVICE, WIREGUARD_HEADER


class WireguardOptions(BackendOptions):
    type: Literal["wireguard"] = Field(default="wireguard", alias="Type")
    listen_port: Annotated[int, Field(ge=1, le=65535)] = Field(default=51820, alias="ListenPort")
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
    return None


def wireguard_facts(options: WireguardOptions, underlay: str) -> BackendFacts:
    return BackendFacts(by_ip_version(wireguard_overhead), encap_port=options.listen_port,
                        tunnels=(WIREGUARD_DEVICE,), encrypted=True)


WIREGUARD_BACKEND = BackendSpec(WireguardOptions,
                                "weft.backends.wireguard.apply:WireguardBackend",
                                wireguard_facts, wireguard_overhead, wireguard_data_problem,
                                no_dual_stack=None)
