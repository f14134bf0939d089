"""weft.host.processes: a backend trusts a pid only while it runs (a zombie does not) and
only in this network namespace."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import wait_for
from weft.host.processes import in_our_netns, is_running, netns_inode


def test_a_live_process_here_is_running_and_ours() -> None:
    assert is_running(os.getpid())
    assert in_our_netns(os.getpid())
    assert in_our_netns("self")
    assert netns_inode(os.getpid()) == netns_inode("self") is not None


def test_an_exited_child_is_not_running_before_and_after_it_is_reaped() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    # Not reaped yet: a zombie, still in /proc, yet gone for whoever asks to adopt it.
    wait_for("the child to exit", lambda: not is_running(child.pid))
    assert os.path.exists(f"/proc/{child.pid}")
    child.wait()
    assert not is_running(child.pid)
    assert netns_inode(child.pid) is None
    assert not in_our_netns(child.pid)
