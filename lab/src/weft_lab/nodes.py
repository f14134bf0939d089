"""A testbed's hosts and containers as plain records: what the runtimes get handed.

Below both the testbed (which makes them) and the runtimes (which start containers on
them), so the runtimes never import the testbed.
"""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Host:
    index: int
    netns: str
    # The agent's --public-ip: IPv4, or IPv6 on an IPv6-only underlay.
    underlay_ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    run_dir: Path
    attach: str = "bridge"
    cpu: int | None = None  # the one CPU this host's agent runs on, if pinned
    agent: subprocess.Popen[bytes] | None = None
    agent_args: list[str] = field(default_factory=list)
    # An IPv6 underlay address beside an IPv4 `underlay_ip` (a dual-stack underlay).
    underlay_ip6: ipaddress.IPv6Address | None = None

    @property
    def name(self) -> str:
        return f"h{self.index}"

    @property
    def subnet_env_path(self) -> Path:
        return self.run_dir / "subnet.env"

    @property
    def state_dir(self) -> Path:
        return self.run_dir / "state"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "agent.log"

    def cni_conf(self) -> dict[str, Any]:
        return {"cniVersion": "1.0.0", "name": "weft", "type": "weft-cni",
                "subnetFile": str(self.subnet_env_path), "dataDir": str(self.run_dir / "cni"),
                "delegate": {"type": self.attach}}


@dataclass
class Container:
    host: Host
    index: int
    netns: str
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    ip6: ipaddress.IPv6Address | None = None  # dual stack: its IPv6 address beside `ip`

    @property
    def name(self) -> str:
        return f"{self.host.name}c{self.index}"

    @property
    def container_id(self) -> str:
        return self.netns
