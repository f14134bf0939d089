"""Shared test setup: tests marked `netns` need root and network namespaces.

tests/unit needs no capability at all: scripts/test.sh runs it under
`setpriv --inh-caps=-all --bounding-set=-all`, where anything that needs root fails, and
a unit test marked `netns` is refused at collection. What needs root, namespaces or the
kernel's data plane belongs in tests/netns."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import FIGURE, missing

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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "requires(available, reason): needs a capability the CI installs "
                   "(helpers.requires: a failure with CI=true when missing, else a skip)")


@pytest.hookimpl(tryfirst=True)  # before the test's fixtures are set up
def pytest_runtest_setup(item: pytest.Item) -> None:
    if "netns" in item.keywords and (reason := _netns_unavailable()) is not None:
        missing(reason)
    for mark in item.iter_markers("requires"):
        available, reason = mark.args
        if not available:
            missing(reason)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The figures tests recorded (helpers.record_figure): a table at the end of the run,
    and JSON in the file WEFT_FIGURES names, for the docs."""
    figures = [dict(value, test=report.nodeid)
               for reports in terminalreporter.stats.values() for report in reports
               if getattr(report, "when", None) == "call"
               for name, value in getattr(report, "user_properties", ()) if name == FIGURE]
    if not figures:
        return
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    terminalreporter.write_sep("-", f"measured figures (load {load})")
    for f in figures:
        extra = ", ".join(f"{k} {v}" for k, v in f.items() if k not in ("case", "seconds", "test"))
        terminalreporter.write_line(f"{f['case']}: {f['seconds']:.2f} s" + (f"; {extra}" if extra else ""))
    if path := os.environ.get("WEFT_FIGURES"):
        Path(path).write_text(json.dumps({"load": load, "figures": figures}, indent=1) + "\n")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "netns" in item.keywords and item.path.is_relative_to(UNIT_TESTS):
            raise pytest.UsageError(f"{item.nodeid} is marked netns: tests/unit runs with no "
                                    "capability, move it to tests/netns")
