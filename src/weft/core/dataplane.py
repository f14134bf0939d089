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
    table: int = 254  # main; auto keeps one table per data plane too
    mtu: int | None = None  # a path MTU below the device's (auto), else the device's


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
