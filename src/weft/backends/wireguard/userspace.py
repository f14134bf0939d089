"""wireguard-go as a process weft starts, finds again after a restart, and stops.

The process is started in the foreground mode (`WG_PROCESS_FOREGROUND=1`) in a session
of its own, so the agent knows its pid directly and the agent's exit (SIGTERM, or a
signal to the agent's process group) does not take the tunnel down with it. Its pid is
kept in the state directory; a restarted agent adopts the running process when the pid
file, /proc and the UAPI socket all agree, and never kills a process it cannot identify.

wireguard-go puts its UAPI socket in /var/run/wireguard (compiled in). Hosts simulated
as network namespaces on one machine share that directory, so a device name would
collide; `private_socket_dir_argv` runs a command (the agent) with its own view of it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from weft.backends.wireguard.uapi import SOCKET_DIR, UapiDevice
from weft.core.errors import KernelError, KernelFeatureMissing
from weft.host.files import open_private, private_dir, write_private
from weft.host.processes import in_our_netns, is_running


def wireguard_go_binary() -> str | None:
    return shutil.which("wireguard-go")


def private_socket_dir_argv(directory: Path, argv: Sequence[str]) -> list[str]:
    """`argv` run in a private mount namespace where `directory` is bind-mounted on
    /run/wireguard: the wireguard-go processes it starts put their UAPI sockets there, and
    a later command wrapped with the same directory finds them again."""
    script = (
        'mkdir -p "$1" /run/wireguard && mount --bind "$1" /run/wireguard '
        '&& shift && exec "$@"'
    )
    return ["unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", script, "sh", str(directory), *argv]


class WireguardGo:
    """The wireguard-go process serving device `ifname` in this network namespace."""

    def __init__(self, ifname: str, state_dir: Path, socket_dir: Path = SOCKET_DIR,
                 files: str = "wireguard-go") -> None:
        self.ifname = ifname
        self.state_dir = state_dir
        # Its pid and log files in the state directory: `<files>.pid`, `<files>.log` (one
        # pair per device: dual stack's second device has its own process).
        self.files = files
        self.device = UapiDevice(ifname, socket_dir)
        self._child: subprocess.Popen[bytes] | None = None

    @property
    def pid_file(self) -> Path:
        return self.state_dir / f"{self.files}.pid"

    @property
    def log_file(self) -> Path:
        return self.state_dir / f"{self.files}.log"

    def pid(self) -> int | None:
        """The pid of our wireguard-go, if the pid file names a live process that is
        wireguard-go for this device in this network namespace (pids get reused)."""
        try:
            fd = open_private(self.pid_file, os.O_RDONLY, "wireguard-go pid file")
            with os.fdopen(fd) as f:
                pid = int(f.read(64).strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        if (not cmdline or not cmdline[0].endswith(b"wireguard-go")
                or self.ifname.encode() not in cmdline[1:]):
            return None
        if not in_our_netns(pid) or not is_running(pid):
            return None
        return pid

    def start(self, timeout: float = 10.0) -> int:
        binary = wireguard_go_binary()
        if binary is None:
            raise KernelFeatureMissing(
                "the kernel has no WireGuard module and wireguard-go is not installed; "
                "install the wireguard-go package or load the wireguard module"
            )
        private_dir(self.state_dir, "state directory")
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "WG_PROCESS_FOREGROUND": "1",
            # Errors only: wireguard-go's verbose log names peers; it never holds secrets,
            # but a quiet log is one less place to look after an incident.
            "LOG_LEVEL": "error",
        }
        # Never through a symlink, never a file of another user (weft.host.files).
        log_fd = open_private(self.log_file,
                              os.O_WRONLY | os.O_CREAT | os.O_APPEND, "wireguard-go log")
        with os.fdopen(log_fd, "ab") as log:
            child = subprocess.Popen(
                [binary, self.ifname], env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
            )
        self._child = child
        deadline = time.monotonic() + timeout
        while not self.device.alive():
            if child.poll() is not None:
                raise KernelError(
                    f"wireguard-go for {self.ifname} exited with status {child.returncode}: "
                    f"{self._log_tail()}"
                )
            if time.monotonic() > deadline:
                self._kill(child.pid)
                raise KernelError(f"wireguard-go for {self.ifname} did not open its UAPI "
                                  f"socket {self.device.path} within {timeout:.0f} s")
            time.sleep(0.02)
        write_private(self.pid_file, f"{child.pid}\n", "wireguard-go pid file")
        return child.pid

    def _log_tail(self) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-3:]) or "(empty log)"

    def _kill(self, pid: int, timeout: float = 5.0) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._child is not None and self._child.pid == pid:
                if self._child.poll() is not None:
                    return
            elif not is_running(pid):
                return
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if self._child is not None and self._child.pid == pid:
            self._child.wait()

    def stop(self) -> None:
        """Stop our wireguard-go (it removes its device and socket as it exits)."""
        pid = self.pid()
        if pid is not None:
            self._kill(pid)
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
