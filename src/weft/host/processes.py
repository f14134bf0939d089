"""Who a process is, read from /proc: alive or not, and in which network namespace.

Why here: the backends that run a helper process of their own (wireguard-go, the udp
forwarder) find it again after an agent restart by its pid, and must never adopt or kill a
process that is not theirs. Pids get reused and hosts simulated as network namespaces on
one machine share one /proc, so both ask the same two questions before they trust a pid:
is it still running (a zombie is not), and is it in this network namespace.
"""

from __future__ import annotations

import os


def netns_inode(pid: int | str) -> int | None:
    """The inode of `pid`'s network namespace ("self" for ours); None when it is gone or
    not ours to see."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def in_our_netns(pid: int | str) -> bool:
    """Whether `pid` runs in this process's network namespace."""
    theirs = netns_inode(pid)
    return theirs is not None and theirs == netns_inode("self")


def is_running(pid: int) -> bool:
    """Whether `pid` exists and has not exited: a zombie (Z) or a dead task (X) that its
    parent has not reaped yet counts as gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            # The command name (in parentheses) may hold spaces and ')': the state follows
            # the last ')'.
            state = f.read().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")
