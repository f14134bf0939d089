"""Shared test setup: tests marked `netns` need root and network namespaces.

tests/unit needs no capability at all: scripts/test.sh runs it under
`setpriv --inh-caps=-all --bounding-set=-all`, where anything that needs root fails, and
a unit test marked `netns` is refused at collection. What needs root, namespaces or the
kernel's data plane belongs in tests/netns."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

UNIT_TESTS = Path(__file__).parent / "unit"


@functools.cache
def _netns_unavailable() -> str | None:
    """Why namespace tests can't run here, or None. Probed once, at the first `netns` test's
    set-up, never at import: a run of tests/unit alone creates no namespace and needs no
    capability."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip`)"
    name = f"weft-probe-{os.getpid()}"  # per process: two suites may run side by side
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True,
                           text=True, check=False)
    if probe.returncode != 0:
        return f"cannot create network namespaces: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], check=False)
    return None


@pytest.fixture
def scratch_netns() -> Iterator[str]:
    """An empty network namespace (lo up) of this test's own, removed after it."""
    name = f"weft-sc{os.getpid()}-ns"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if "netns" in item.keywords and (reason := _netns_unavailable()) is not None:
        pytest.skip(reason)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "netns" in item.keywords and item.path.is_relative_to(UNIT_TESTS):
            raise pytest.UsageError(f"{item.nodeid} is marked netns: tests/unit runs with no "
                                    "capability, move it to tests/netns")
