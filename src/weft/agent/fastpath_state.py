"""The agent's fast path (on by default; `--no-fastpath` turns it off): whether the tc BPF
fast path can run here, and its convergence at every full pass (weft.host.fastpath_hooks
does the kernel work).

It serves IPv4, IPv6 and dual-stack overlays alike. Unavailable (not host-gw or vxlan, no
clang, bpftool or tc, a compile error) is a reason shown in `weft status`, never an agent
failure: the normal path carries everything the fast path would.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from weft.core.config import IPNetwork, NetworkConfig
from weft.core.errors import WeftError
from weft.host.fastpath import fastpath_object
from weft.host.fastpath_hooks import FastPath, plan_hooks, remove_fastpath

log = logging.getLogger("weft.agent")


class FastPathState:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.fastpath: FastPath | None = None
        self.arrival: str | None = None
        self.arrival6: tuple[str, ...] = ()  # dual stack's IPv6 underlay device, if made
        self.reason: str | None = None if enabled else "off (--no-fastpath)"
        self.standing_down: str | None = None
        self.origin: str | None = None  # where its object came from (weft.host.fastpath)

    def start(self, config: NetworkConfig, arrival: str | None, state_dir: Path,
              arrival6: Sequence[str] = ()) -> None:
        """Compile and check, or record why not. `arrival`: where overlay packets for this
        host arrive unencapsulated (the backend's facts); None: a backend the fast path
        does not serve. `arrival6`: dual stack's IPv6 underlay device, served too where
        the backend made it. With the switch off, a previous run's filters are taken off
        (the agent owns them)."""
        if not self.enabled:
            self._remove_previous("switch off")
            return
        self.arrival, self.arrival6 = arrival, tuple(arrival6)
        if self.arrival is None:
            self.reason = (f"unavailable: the fast path serves host-gw and vxlan (without "
                           f"DirectRouting), not {config.backend.type}")
        else:
            try:
                obj, self.origin = fastpath_object(state_dir / "bpf")
                self.fastpath = FastPath(obj)
            except (WeftError, OSError, subprocess.SubprocessError) as exc:
                self.reason = f"unavailable: {exc}"
        if self.reason is not None:
            log.warning("fast path not used; the normal path carries everything",
                        extra={"reason": self.reason})
            # A previous run's filters (frozen maps, no netfilter) must not outlive it.
            self._remove_previous("unavailable")

    @staticmethod
    def _remove_previous(why: str) -> None:
        try:
            if removed := remove_fastpath():
                log.info(f"fast path removed ({why})", extra={"devices": removed})
        except (WeftError, OSError, subprocess.SubprocessError) as exc:
            log.warning("could not remove the fast path", extra={"error": str(exc)})

    def apply(self, own: Sequence[IPNetwork], subnets: Iterable[IPNetwork],
              stand_down: str | None = None, *, full: bool = True) -> str | None:
        """Converge the hooks and maps for this host's subnets `own` (one per family; a lease
        can move) and the leased `subnets` (both families); an error string
        (retried), or None. With `stand_down` (why overlay traffic must stay in
        netfilter), the hooks come off instead. Not `full` (a store event's pass):
        the devices are those of the last full pass (a container's device or route
        appearing wakes a full one), and only the maps' change is written."""
        fp = self.fastpath
        if fp is None or self.arrival is None:
            return None
        fp.own = list(own)
        if stand_down is not None:
            if self.standing_down != stand_down:
                log.warning("fast path standing down", extra={"reason": stand_down})
            self.standing_down = stand_down
            try:
                remove_fastpath()
            except (WeftError, OSError, subprocess.SubprocessError) as exc:
                return f"fast path: {exc}"
            fp.attached = []
            return None
        if self.standing_down is not None:
            log.info("fast path back on", extra={"was": self.standing_down})
        self.standing_down = None
        try:
            if full or not fp.attached:
                arrivals = [self.arrival, *fp.present(self.arrival6)]
                devices, veths, ports = fp.container_devices(exclude=arrivals)
                hooks = plan_hooks(arrivals, devices, ports)
                fp.detach_others(h.device for h in hooks)
            else:
                hooks, veths = list(fp.attached), fp.veths
            attached = fp.converge(hooks, subnets, veths, verify=full)
        except (WeftError, OSError, subprocess.SubprocessError, KeyError) as exc:
            log.error("fast path not converged", extra={"error": str(exc)})
            return f"fast path: {exc}"
        if attached:
            log.info("fast path attached", extra={"devices": attached})
        return None

    def status(self) -> dict[str, Any]:
        active = self.fastpath is not None and self.standing_down is None
        result: dict[str, Any] = {"enabled": self.enabled, "active": active,
                                  "reason": self.reason or self.standing_down}
        if self.origin is not None:
            result["object"] = self.origin
        if active and self.fastpath is not None:
            try:
                result |= self.fastpath.status()
            except (WeftError, OSError, subprocess.SubprocessError, ValueError,
                    KeyError) as exc:  # bpftool's JSON not as expected: say so
                result["error"] = str(exc)
        return result

    def close(self) -> None:
        """Off on shutdown: the normal path takes over at once, no packet lost; a
        restarted agent attaches it again."""
        if self.fastpath is None:
            return
        try:
            remove_fastpath()
        except (WeftError, OSError, subprocess.SubprocessError) as exc:
            log.warning("could not remove the fast path", extra={"error": str(exc)})
