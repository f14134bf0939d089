"""The udp forwarder as a process of its own: `python -m weft.backends.udp.daemon ...`.

Why a process: a forwarder inside the agent dies with it, and every agent restart (an
upgrade, a crash, kill -9) dropped the packets of the second or so the next agent takes to
start. The agent starts this process in a session of its own (`weft.backends.udp.supervisor`),
so neither the agent's death nor a signal to its process group nor systemd's
KillMode=process stop it; the next agent adopts it over the control socket
(`weft.backends.udp.control`) and forwarding never pauses. While no agent is connected it
forwards with the last peer table it was given.

The process opens the TUN device (weft.backends.udp.tun) and the socket
(weft.backends.udp.bind; in dual stack a second one on the IPv6 underlay), hands them to
the forwarder's threads, and serves the control socket in its main thread, which sleeps
in accept() between requests. SIGTERM or a "stop" request ends it; the
persistent device stays. SIGHUP makes the control socket again (after someone removed
the state directory), so the agent need not replace a forwarder that is working.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from weft.backends.udp.bind import UdpBind, open_bind
from weft.backends.udp.control import (
    CONTROL_SOCKET,
    ControlError,
    ForwarderSpec,
    decode_table,
    encode_table,
    forwarder_version,
    read_message,
    send_message,
    take_over,
    trusted_peer,
)
from weft.backends.udp.forwarder import Forwarder
from weft.backends.udp.tun import TunDevice, open_device
from weft.core.config import IPAddress
from weft.core.errors import KernelError, KernelFeatureMissing, PermissionProblem, WeftError
from weft.host.files import private_dir, private_umask

log = logging.getLogger("weft.backends.udp")

MODULE = "weft.backends.udp.daemon"
# Exit statuses of a start that failed, so the agent raises the same kind of error.
EXIT_ERROR, EXIT_PERMISSION, EXIT_FEATURE = 70, 71, 72
ERROR_BY_STATUS = {EXIT_PERMISSION: PermissionProblem, EXIT_FEATURE: KernelFeatureMissing}


def open_forwarder(device: str, bind_ip: IPAddress, port: int, underlay_mtu: int,
                   network_version: int, subnet_len: int, offloads: bool = True,
                   bind_ipv6: IPAddress | None = None) -> Forwarder:
    """Create/attach TUN device `device`, bind the socket (and with `bind_ipv6` a second
    one there, on the same port), and hand them to a forwarder (not started yet);
    `offloads=False` asks for none on any."""
    with contextlib.ExitStack() as opened:
        tun = open_device(device, offloads)
        opened.callback(tun.close)
        bind = open_bind(bind_ip, port, offloads)
        opened.callback(bind.close)
        bind6 = None
        if bind_ipv6 is not None:
            # The IPv6 underlay address may still be tentative (duplicate address
            # detection, at boot): bound anyway, so the IPv4 data plane never waits on it.
            bind6 = open_bind(bind_ipv6, bind.port, offloads, freebind=True)
            opened.callback(bind6.close)
        forwarder = Forwarder(tun, bind, underlay_mtu, network_version, subnet_len, bind6)
        opened.pop_all()  # the forwarder owns them now
    for note in forwarder.in_force.notes:
        log.warning("udp offload fallback", extra={"detail": note})
    return forwarder


def open_spec(spec: ForwarderSpec) -> Forwarder:
    return open_forwarder(spec.device, ipaddress.ip_address(spec.bind_ip), spec.port,
                          spec.underlay_mtu, spec.network_version, spec.subnet_len,
                          spec.offloads, _ipv6(spec))


def _ipv6(spec: ForwarderSpec) -> IPAddress | None:
    return None if spec.bind_ipv6 is None else ipaddress.ip_address(spec.bind_ipv6)


def taken_over(spec: ForwarderSpec, path: Path) -> Forwarder:
    """The device, the socket(s) and the peer table of the forwarder answering on `path`
    (of another version, same spec), which exits: an upgrade without a pause."""
    try:
        reply, (tun_fd, *sock_fds) = take_over(path, sockets=spec.sockets)
    except ControlError as exc:
        raise KernelError(f"no hand-over from the running forwarder: {exc}") from None
    offloads = reply.get("offloads") or {}
    notes = [str(n) for n in offloads.get("fallbacks", [])]
    device = TunDevice(spec.device, tun_fd, bool(offloads.get("tun_csum")),
                       bool(offloads.get("tun_tso")), notes)
    gso, gro = bool(offloads.get("udp_gso")), bool(offloads.get("udp_gro"))
    ips = [ipaddress.ip_address(spec.bind_ip)] + [a for a in (_ipv6(spec),) if a is not None]
    binds = [UdpBind(sock, ip, sock.getsockname()[1], gso, gro)
             for sock, ip in zip(map(_socket, sock_fds), ips, strict=True)]
    forwarder = Forwarder(device, binds[0], spec.underlay_mtu, spec.network_version,
                          spec.subnet_len, binds[1] if len(binds) > 1 else None)
    try:
        forwarder.set_peers(decode_table(reply.get("table") or {}))
    except ValueError as exc:
        log.warning("handed-over peer table refused; waiting for the agent's",
                    extra={"error": str(exc)})
    return forwarder


def _socket(fd: int) -> socket.socket:
    return socket.socket(fileno=fd)


class _Stop(Exception):
    """SIGTERM/SIGINT: leave the accept loop."""


class _Relisten(Exception):
    """SIGHUP: the control socket is gone (someone removed the state directory): the agent
    found this process in /proc and asks it to make the socket again."""


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def _relisten(signum: int, frame: FrameType | None) -> None:
    raise _Relisten


def listen(path: Path) -> tuple[socket.socket, int]:
    """The control socket at `path`, root's alone, and its inode; a stale one (a forwarder
    killed with -9) is replaced, anything else there is refused."""
    with contextlib.suppress(FileNotFoundError):
        info = os.lstat(path)
        if not (stat.S_ISSOCK(info.st_mode) or stat.S_ISLNK(info.st_mode)):
            raise PermissionProblem(f"{path} is not a socket; remove it")
        path.unlink()  # a symlink itself goes, never what it points at
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with private_umask():
            sock.bind(str(path))
        os.chmod(path, 0o600)
        inode = os.lstat(path).st_ino
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return sock, inode


class Service:
    """The forwarder and the answers to control requests."""

    def __init__(self, spec: ForwarderSpec, forwarder: Forwarder) -> None:
        self.spec = spec
        self.forwarder = forwarder
        self.version = forwarder_version()
        self.started = time.time()
        self.stopping = False

    def handle(self, message: dict[str, Any]) -> dict[str, Any]:
        op = message.get("op")
        if op == "hello":
            return {"version": self.version, "spec": self.spec.as_dict(), "pid": os.getpid()}
        if op == "set_peers":
            try:
                table = decode_table(message.get("table") or {})
            except ValueError as exc:
                return {"error": str(exc)}
            if (table.version, table.subnet_len) != (self.spec.network_version,
                                                     self.spec.subnet_len):
                return {"error": f"a table of IPv{table.version} /{table.subnet_len} for a "
                                 f"forwarder of IPv{self.spec.network_version} "
                                 f"/{self.spec.subnet_len}"}
            self.forwarder.set_peers(table)
            return {"ok": True}
        if op == "status":
            return {**self.forwarder.status(), "pid": os.getpid(), "version": self.version,
                    "uptime": round(time.time() - self.started, 1)}
        if op == "reopen":
            return self.reopen()
        if op == "stop":
            self.stopping = True
            return {"ok": True}
        return {"error": f"unknown op {op!r}"}

    def reopen(self) -> dict[str, Any]:
        """Someone deleted the device under us: a new device and socket, the same table
        (quicker than a new process)."""
        table = self.forwarder.peers
        self.forwarder.close()
        try:
            self.forwarder = open_spec(self.spec)
        except WeftError as exc:
            self.stopping = True  # nothing left to forward with: the agent starts anew
            return {"error": str(exc)}
        self.forwarder.set_peers(table)
        self.forwarder.start()
        log.info("udp forwarder reopened its device and socket")
        return {"ok": True}

    def serve(self, server: socket.socket) -> None:
        while not self.stopping:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(5.0)  # a stuck client must not stop the next one
                try:
                    peer = trusted_peer(conn)
                    message = read_message(conn)
                    if message.get("op") == "handover":
                        self.hand_over(conn, peer)
                    try:
                        reply = self.handle(message)
                    except Exception as exc:  # a bug must not end the forwarding
                        log.exception("control request failed", extra={"op": message.get("op")})
                        reply = {"error": repr(exc)}
                    send_message(conn, reply)
                except (ControlError, OSError) as exc:
                    log.warning("control request failed", extra={"error": str(exc)})

    def hand_over(self, conn: socket.socket, peer: int) -> None:
        """Give the device and the socket to the forwarder of a new version (`peer`) and
        exit once our threads have passed on what they hold. Both forward for that moment,
        each packet read by one of them; the threads here are never woken or closed:
        closing would shut the socket the new forwarder now shares (shutdown acts on the
        socket, not on this process's fd)."""
        forwarder = self.forwarder
        reply = {"table": encode_table(forwarder.peers),
                 "offloads": forwarder.in_force.as_dict()}
        line = json.dumps(reply, separators=(",", ":")).encode() + b"\n"
        fds = [forwarder.device.fd, forwarder.bind.sock.fileno()]
        if forwarder.bind6 is not None:
            fds.append(forwarder.bind6.sock.fileno())
        log.info("udp forwarder handing over", extra={"to": peer})  # the handler flushes
        # Once the fds are out, no signal may run the clean-up (see above).
        signals = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        try:
            socket.send_fds(conn, [line], fds)
        except BaseException:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
            raise
        # Our threads pass on the packets they hold (else each is lost: measured, 1 ping
        # in ~30 hand-overs with an immediate exit, more on a loaded machine), then end.
        forwarder.release()
        os._exit(0)


class _JsonLines(logging.Formatter):
    """One JSON object per line, as the agent logs when not on a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v for k, v in vars(record).items()
                  if k not in _RECORD_FIELDS and not k.startswith("_")}
        line: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                                "logger": record.name, "event": record.getMessage(), **fields}
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}


def _parse(argv: Sequence[str]) -> tuple[Path, ForwarderSpec, bool]:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--bind-ip", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--underlay-mtu", type=int, required=True)
    parser.add_argument("--network-version", type=int, choices=(4, 6), required=True)
    parser.add_argument("--subnet-len", type=int, required=True)
    parser.add_argument("--no-offloads", action="store_true")
    parser.add_argument("--bind-ipv6", help="dual stack: a second socket on this IPv6 "
                                            "underlay address, the same port")
    parser.add_argument("--take-over", action="store_true",
                        help="take the device and socket of the forwarder running now")
    args = parser.parse_args(argv)
    return args.state_dir, ForwarderSpec(args.device, args.bind_ip, args.port,
                                         args.underlay_mtu, args.network_version,
                                         args.subnet_len, not args.no_offloads,
                                         args.bind_ipv6), args.take_over


def main(argv: Sequence[str] | None = None) -> int:
    state_dir, spec, take = _parse(sys.argv[1:] if argv is None else argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonLines())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGHUP, _relisten)
    try:
        private_dir(state_dir, "state directory")
        forwarder = taken_over(spec, state_dir / CONTROL_SOCKET) if take else open_spec(spec)
    except WeftError as exc:
        log.error("udp forwarder could not start", extra={"error": str(exc)})
        return (EXIT_PERMISSION if isinstance(exc, PermissionProblem)
                else EXIT_FEATURE if isinstance(exc, KernelFeatureMissing) else EXIT_ERROR)
    except _Stop:
        return 0
    path = state_dir / CONTROL_SOCKET
    service = Service(spec, forwarder)
    server: socket.socket | None = None
    inode = -1
    try:
        forwarder.start()
        log.info("udp forwarder running", extra={"pid": os.getpid(), "version": service.version,
                                                 "device": spec.device, "port": spec.port})
        while not service.stopping:
            try:
                if server is None:
                    private_dir(state_dir, "state directory")
                    server, inode = listen(path)
                service.serve(server)
            except _Relisten:
                log.info("making the control socket again", extra={"path": str(path)})
                if server is not None:
                    server.close()
                    server = None
            except (WeftError, OSError) as exc:  # no socket there: forward on, wait
                log.error("no control socket", extra={"error": str(exc)})
                with contextlib.suppress(_Relisten):
                    signal.pause()  # until the agent asks again (SIGHUP) or SIGTERM
    except _Stop:
        pass
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # the clean-up runs to its end
        if server is not None:
            with contextlib.suppress(OSError):
                # Ours only: a newer forwarder may already have put its own there.
                if os.lstat(path).st_ino == inode:
                    path.unlink()
            server.close()
        service.forwarder.close()
    log.info("udp forwarder stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
