"""Running commands for the lab: one error type and the two helpers every lab part uses.

Below both the testbed and the container runtimes, so neither imports the other for them.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from weft.core.errors import WeftError


class TestbedError(WeftError):
    """The testbed could not be built or did not converge."""

    __test__ = False  # not a pytest test class


def sh(argv: Sequence[str], *, check: bool = True, timeout: float = 60.0,
       input: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          check=False, input=input)
    if check and proc.returncode != 0:
        raise TestbedError(f"`{' '.join(argv)}` failed ({proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()}")
    return proc


def netns_exec(netns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv]
