"""The seam between the testbed and a container runtime (docker, podman)."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from weft.lab.testbed import Container, Host, Testbed


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


def make_runtime(name: str, tb: Testbed) -> ContainerRuntime | None:
    if name == "docker":
        from weft.lab.runtimes.docker import DockerRuntime

        return DockerRuntime(tb)
    if name == "podman":
        from weft.lab.runtimes.podman import PodmanRuntime

        return PodmanRuntime(tb)
    return None
