"""`weft status` against a store nobody answers for: one line that says which endpoint
and what to do, a failing exit code, and no traceback (no root, no etcd needed)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path


def _dead_port() -> int:
    """A loopback port nothing listens on (bound for a moment, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_status_against_an_unreachable_etcd_is_one_line_saying_what_to_do(
        tmp_path: Path) -> None:
    port = _dead_port()
    proc = subprocess.run(
        [sys.executable, "-m", "weft", "status", "--store", f"etcd://127.0.0.1:{port}",
         "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1
    assert proc.stdout == ""  # no table of a store it could not read
    assert proc.stderr.startswith("error: cannot reach etcd to list leases"), proc.stderr
    assert f"127.0.0.1:{port}" in proc.stderr
    assert "check that etcd is running and reachable" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
