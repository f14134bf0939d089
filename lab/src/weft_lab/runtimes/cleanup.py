"""Removing what a runtime started, even after a crash: found by path and by cgroup name.

dockerd, containerd and podman mount overlays, network namespaces and shm under their
data and exec roots (all kept in the run's directory), and put containers in cgroups
under a parent named after the run (`weft-<run>-h1`). So a run's leftovers are exactly
the mounts below its directory and the cgroups carrying its prefix.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_parent(run_id: str, host: str) -> str:
    """The cgroup parent a runtime puts a host's containers under."""
    return f"weft-{run_id}-{host}"


def _run_cgroups(run_id: str) -> list[Path]:
    """Every cgroup directory of the run, deepest first (v1 hierarchies and v2)."""
    prefix = f"weft-{run_id}-"
    found: list[Path] = []
    if not CGROUP_ROOT.is_dir():
        return found
    roots = [CGROUP_ROOT] + [p for p in CGROUP_ROOT.iterdir() if p.is_dir()]
    for root in roots:
        with contextlib.suppress(OSError):
            for top in root.iterdir():
                if top.is_dir() and top.name.startswith(prefix):
                    found += [Path(d) for d, _, _ in os.walk(top)]
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def kill_run_cgroups(run_id: str) -> None:
    """SIGKILL every process in the run's cgroups, then remove the (empty) cgroups."""
    groups = _run_cgroups(run_id)
    for group in groups:
        with contextlib.suppress(OSError):
            for pid in (group / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
    for group in groups:
        for _ in range(50):  # a killed process leaves its cgroup a moment later
            try:
                group.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)


def unmount_below(path: Path) -> None:
    """Detach every mount at or below `path` (deepest first), so it can be deleted."""
    base = str(path.resolve())
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    points = []
    for line in lines:
        point = line.split()[4].replace("\\040", " ")
        if point == base or point.startswith(base + "/"):
            points.append(point)
    libc = ctypes.CDLL(None, use_errno=True)
    mnt_detach = 2
    # Stacked mounts need one detach each: the count of a point's lines, deepest first.
    for point in sorted(points, key=len, reverse=True):
        libc.umount2(point.encode(), mnt_detach)


# Network namespaces a runtime made outside the run's directory (podman's
# /run/netns/netns-<uuid>), one path per line, so a crashed run's are found too.
NETNS_LEDGER = "runtime-netns"
RUNTIME_NETNS_DIR = Path("/run/netns")


def record_runtime_netns(run_dir: Path, path: str) -> None:
    """Note a namespace file a runtime created for one of the run's containers."""
    if not path:
        return
    ledger = run_dir / NETNS_LEDGER
    known = set(ledger.read_text().split()) if ledger.exists() else set()
    if path not in known:
        with ledger.open("a") as f:
            f.write(path + "\n")


def remove_runtime_netns(run_dir: Path, only: set[str] | None = None) -> list[str]:
    """Unmount and delete every recorded namespace file the runtime left behind.

    podman removes a container's namespace at `rm`, except the ones left by `podman
    restart` (a fresh namespace per start) and by a killed podman; only files recorded
    for this run (`only`: of these paths), and only under /run/netns, are touched.
    """
    ledger = run_dir / NETNS_LEDGER
    if not ledger.exists():
        return []
    libc = ctypes.CDLL(None, use_errno=True)
    removed = []
    for line in ledger.read_text().split():
        if only is not None and line not in only:
            continue
        path = Path(line)
        if path.parent != RUNTIME_NETNS_DIR or not path.exists():
            continue
        libc.umount2(str(path).encode(), 2)  # MNT_DETACH: the nsfs bind mount
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path.name)
    return removed


def remove_runtime_leftovers(run_id: str, run_dir: Path) -> None:
    """What `remove_run` adds for the docker and podman runtimes: kill, unmount."""
    kill_run_cgroups(run_id)
    if run_dir.exists():
        unmount_below(run_dir)
        remove_runtime_netns(run_dir)
