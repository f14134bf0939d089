"""The kernel objects a plan asks for: small frozen values, compared as sets."""

from __future__ import annotations

from dataclasses import dataclass

from weft.core.config import IPAddress, IPNetwork


@dataclass(frozen=True)
class Route:
    dst: IPNetwork
    gateway: IPAddress | None
    ifindex: int
    onlink: bool = False


@dataclass(frozen=True)
class Neighbour:
    ip: IPAddress
    mac: str
    ifindex: int


@dataclass(frozen=True)
class FdbEntry:
    mac: str
    dst: IPAddress
    ifindex: int
