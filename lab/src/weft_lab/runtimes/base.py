"""The seam between the testbed and a container runtime (docker, podman).

A runtime is handed the run it serves as a `RunView` (what it reads of the testbed) and
the plain `Host`/`Container` records, so the runtimes never import the testbed: the
testbed imports them, and nothing points back.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from weft_lab.nodes import Container, Host


class RunView(Protocol):
    """What a runtime needs of the testbed run: its id, directory, hosts and `weft`."""

    @property
    def run_id(self) -> str: ...

    @property
    def run_dir(self) -> Path: ...

    @property
    def hosts(self) -> Sequence[Host]: ...

    def weft(self, *args: str, netns: str | None = None, check: bool = True,
             timeout: float = 60.0) -> subprocess.CompletedProcess[str]: ...


class ContainerRuntime(Protocol):
    name: str

    def start_host(self, host: Host, timeout: float = 60.0) -> None:
        """Make the host ready for containers (after its agent wrote subnet.env)."""

    def stop_host(self, host: Host, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Stop the host's daemon, if the runtime has one; containers keep running."""

    def run_container(self, c: Container) -> None:
        """Create and start c; set c.ip; give its namespace the testbed's name c.netns."""

    def remove_container(self, c: Container) -> None: ...

    def exec_argv(self, c: Container, argv: list[str]) -> list[str]:
        """The command line that runs argv inside the container."""

    def destroy(self) -> None:
        """Remove every container, daemon and mount the runtime made, pass or fail."""

