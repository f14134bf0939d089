"""`Backend` options of the host-gw backend: plain routes add no bytes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from weft.core.config import BackendOptions


class HostGwOptions(BackendOptions):
    type: Literal["host-gw"] = Field(default="host-gw", alias="Type")


def hostgw_overhead(ip_version: int) -> int:
    return 0
