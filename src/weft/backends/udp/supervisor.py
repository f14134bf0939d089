"""The agent's side of the udp forwarder process: start, adopt, hand over, replace, stop.

As the wireguard backend does with wireguard-go (weft.backends.wireguard.userspace): the
forwarder (`weft.backends.udp.daemon`) is started in a session of its own, so the agent's
death leaves it forwarding. A restarted agent adopts the running one when its version and
spec are the agent's own; one of another version (an upgrade) hands its device, socket and
peer table to the agent's own and exits; one of another spec (another port) is replaced.
The agent finds it by its control socket; one that does not answer is found in /proc (its
command line names the module and the device, its network namespace is ours), asked to
make its socket again, and killed if it does not, never a process that is not it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from weft.backends.udp.control import (
    CONTROL_SOCKET,
    LOG_FILE,
    ControlError,
    ForwarderSpec,
    encode_table,
    forwarder_version,
    request,
)
from weft.backends.udp.daemon import ERROR_BY_STATUS, MODULE
from weft.backends.udp.plan import PeerTable
from weft.core.errors import KernelError, WeftError
from weft.host.files import open_private, private_dir
from weft.host.processes import in_our_netns, is_running

log = logging.getLogger("weft.backends.udp")


class ForwarderProcess:
    """The forwarder process serving `spec.device` in this network namespace."""

    def __init__(self, spec: ForwarderSpec, state_dir: Path) -> None:
        self.spec = spec
        self.state_dir = state_dir
        self.version = forwarder_version()
        self.pid: int | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self._table = PeerTable(spec.network_version, spec.subnet_len)

    @property
    def socket_path(self) -> Path:
        return self.state_dir / CONTROL_SOCKET

    def _request(self, op: str, **fields: Any) -> dict[str, Any]:
        reply, pid = request(self.socket_path, {"op": op, **fields})
        self.pid = pid
        return reply

    def hello(self) -> dict[str, Any] | None:
        """The running forwarder's version and spec, or None when none answers."""
        try:
            return self._request("hello")
        except ControlError:
            return None

    def alive(self) -> bool:
        self._reap()
        return self.hello() is not None

    # --- start, adopt, replace ------------------------------------------------------------

    def ensure(self) -> str:
        """A forwarder of this version and spec running: the one there ("adopted"), a new
        one that took over the device and socket of one of another version ("handed
        over"), or a new one ("started")."""
        hello = self.hello() or self._recall()
        if hello is not None:
            old = self.pid
            same_spec = hello.get("spec") == self.spec.as_dict()
            if hello.get("version") == self.version and same_spec:
                log.info("udp forwarder adopted", extra={"pid": old})
                return "adopted"
            if same_spec and old is not None:
                # An upgrade: the new forwarder takes the device and the socket over, so
                # no packet waits for a process to start.
                log.info("handing the udp forwarder over to this version", extra={
                    "pid": old, "running": hello.get("version"), "ours": self.version})
                try:
                    self.start(take_over=True)
                except WeftError as exc:
                    log.warning("udp forwarder hand-over failed; replacing it",
                                extra={"error": str(exc)})
                else:
                    self._wait_gone(old)
                    return "handed over"
            else:
                log.info("replacing the udp forwarder (another spec)", extra={
                    "pid": old, "running": hello.get("spec"), "ours": self.spec.as_dict()})
        self.stop()
        self.start()
        return "started"

    def _wait_gone(self, pid: int, timeout: float = 5.0) -> None:
        """The forwarder that handed over exits by itself; if it does not, SIGKILL (never
        SIGTERM: its clean-up would shut the socket it handed over)."""
        deadline = time.monotonic() + timeout
        while is_running(pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.02)

    def _recall(self, timeout: float = 2.0) -> dict[str, Any] | None:
        """A forwarder running here without its control socket (someone removed the state
        directory): asked to make it again (SIGHUP), it answers and is adopted, not
        replaced. Its hello, or None."""
        pids = self.running_pids()
        if len(pids) != 1:
            return None
        (pid,) = pids
        private_dir(self.state_dir, "state directory")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hello = self.hello()
            if hello is not None and self.pid == pid:
                log.info("udp forwarder answers again", extra={"pid": pid})
                return hello
            time.sleep(0.02)
        return None

    def start(self, timeout: float = 15.0, take_over: bool = False) -> int:
        """A new forwarder process, answering when this returns; `take_over`: it takes the
        running one's device, socket and table (which then exits)."""
        private_dir(self.state_dir, "state directory")
        argv = [sys.executable, "-m", MODULE, "--state-dir", str(self.state_dir),
                *self.spec.argv(), *(["--take-over"] if take_over else [])]
        # Never through a symlink, never a file of another user (weft.host.files).
        log_fd = open_private(self.state_dir / LOG_FILE,
                              os.O_WRONLY | os.O_CREAT | os.O_APPEND, "udp forwarder log")
        with os.fdopen(log_fd, "ab") as log_file:
            # A session of its own: a signal to the agent's process group (a terminal's
            # Ctrl-C, a supervisor killing the group) does not reach it.
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     close_fds=True)
        self._child = child
        deadline = time.monotonic() + timeout
        while self.hello() is None or self.pid != child.pid:
            status = child.poll()
            if status is not None:
                self._child = None
                error = ERROR_BY_STATUS.get(status, KernelError)
                raise error(f"the udp forwarder exited with status {status}: {self._log_tail()}")
            if time.monotonic() > deadline:
                self._kill(child.pid)
                raise KernelError(f"the udp forwarder did not answer on {self.socket_path} "
                                  f"within {timeout:.0f} s: {self._log_tail()}")
            time.sleep(0.02)
        log.info("udp forwarder started", extra={"pid": child.pid})
        return child.pid

    def _log_tail(self) -> str:
        """The last error the forwarder logged (its start-up error), else its last lines."""
        try:
            with (self.state_dir / LOG_FILE).open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))  # the end is enough
                lines = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        for line in reversed(lines[-20:]):
            if '"error"' in line:
                with contextlib.suppress(ValueError, AttributeError):
                    return str(json.loads(line).get("error", line))
        return " | ".join(lines[-3:]) or "(empty log)"

    # --- stop -----------------------------------------------------------------------------

    def running_pids(self) -> set[int]:
        """Forwarder processes for our device in our network namespace (normally one)."""
        device = self.spec.device.encode()
        found: set[int] = set()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                args = Path(entry.path, "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (MODULE.encode() in args and device in args
                    and in_our_netns(entry.name) and is_running(int(entry.name))):
                found.add(int(entry.name))
        return found

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every forwarder of our device here: asked first, then SIGTERM, then
        SIGKILL. The persistent TUN device stays."""
        pids = self.running_pids()
        asked: int | None = None
        with contextlib.suppress(ControlError):
            self._request("stop")
            asked = self.pid  # the one answering, seen across namespaces too
        for pid in pids | ({asked} if asked is not None else set()):
            self._wait_or_kill(pid, timeout, asked=pid == asked)
        self._reap()
        with contextlib.suppress(FileNotFoundError):
            if not self.socket_path.is_symlink():
                self.socket_path.unlink()

    def _wait_or_kill(self, pid: int, timeout: float, asked: bool) -> None:
        """Wait for `pid` to exit (it was asked to), else SIGTERM it, then SIGKILL it."""
        signals = (0, signal.SIGTERM, signal.SIGKILL) if asked else (signal.SIGTERM,
                                                                        signal.SIGKILL)
        for sig in signals:
            if sig:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                self._reap()
                if not is_running(pid):
                    return
                time.sleep(0.02)

    def _kill(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self._reap()

    def _reap(self) -> None:
        """Collect our child if it exited (else /proc shows it as a zombie)."""
        if self._child is not None and self._child.poll() is not None:
            self._child = None

    def detach(self) -> None:
        """The agent is exiting: the forwarder runs on, adopted by the next agent."""
        self._child = None

    # --- what the backend asks of it ------------------------------------------------------

    def reopen(self) -> None:
        """A new device and socket in the running process (the device was deleted)."""
        try:
            self._request("reopen")
        except ControlError as exc:
            raise KernelError(f"udp forwarder: {exc}") from None

    def set_peers(self, table: PeerTable) -> None:
        try:
            self._request("set_peers", table=encode_table(table))
        except ControlError as exc:
            raise KernelError(f"udp forwarder: {exc}") from None
        self._table = table

    @property
    def peers(self) -> PeerTable:
        """The table last handed to the forwarder by this agent."""
        return self._table

    def status(self) -> dict[str, Any]:
        try:
            return self._request("status")
        except ControlError as exc:
            return {"running": False, "forwarder_error": str(exc)}

    def flat_counters(self) -> dict[str, int]:
        counters = self.status().get("counters", {})
        return dict(counters) if isinstance(counters, dict) else {}


def stop_forwarder(state_dir: Path, timeout: float = 5.0) -> int | None:
    """Ask the forwarder answering on `state_dir`'s control socket to stop, and wait for it
    (SIGKILL after `timeout`); works from any network namespace. Its pid, or None when
    none answered."""
    try:
        _, pid = request(state_dir / CONTROL_SOCKET, {"op": "stop"})
    except ControlError:
        return None
    deadline = time.monotonic() + timeout
    while is_running(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
        time.sleep(0.02)
    return pid

