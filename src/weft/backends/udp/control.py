"""The udp forwarder's control channel: how the agent talks to its forwarder process.

The forwarder runs as a process of its own (`weft.backends.udp.daemon`) so that it keeps
forwarding while the agent restarts; the agent reaches it over a Unix stream socket in the
state directory. One request per connection, one JSON object per line each way:

    {"op": "hello"}                  -> {"version", "spec", "pid"}      (stable across releases)
    {"op": "set_peers", "table": T}  -> {"ok": true}
    {"op": "status"}                 -> the forwarder's status (counters, offloads, peers)
    {"op": "reopen"}                 -> {"ok": true}  a new device and socket, same process
    {"op": "stop"}                   -> {"ok": true}, then the process exits
    {"op": "handover"}               -> {"table", "offloads"} with the TUN fd and the socket
                                        (and the IPv6 underlay socket, if the spec has
                                        one; SCM_RIGHTS), then the process exits at once

Only root (or the forwarder's own user) may connect: the socket is 0600 in the 0700 state
directory, each side checks the other's credentials (SO_PEERCRED), and the client never
connects through a symlink. The encoding of the peer table lives here, pure, so both ends
agree on it; the socket edges are the two small functions at the bottom.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import struct
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from weft.backends.udp.plan import Endpoint, PeerTable

CONTROL_SOCKET: Final = "udp-forwarder.sock"
LOG_FILE: Final = "udp-forwarder.log"
MAX_MESSAGE: Final = 16 << 20  # a table of 100,000 peers fits; nothing grows past it
_UCRED: Final = struct.Struct("3i")  # pid, uid, gid

# The modules whose code the forwarder process runs: a change to any of them (an upgrade)
# makes the running forwarder "another version", which the agent replaces.
_SOURCES: Final = ("forwarder.py", "codec.py", "tun.py", "bind.py", "plan.py", "control.py",
                   "daemon.py")


class ControlError(Exception):
    """The forwarder did not answer, or answered something else than the protocol."""


def forwarder_version() -> str:
    """A digest of the forwarder's code as this installation has it, and the Python that
    runs it: what an upgrade changes."""
    digest = hashlib.sha256()
    here = Path(__file__).parent
    for name in _SOURCES:
        try:
            digest.update((here / name).read_bytes())
        except OSError:
            digest.update(name.encode())
    return f"{digest.hexdigest()[:16]} python{sys.version_info[0]}.{sys.version_info[1]}"


@dataclass(frozen=True)
class ForwarderSpec:
    """Everything the forwarder process is started with; a running forwarder with another
    spec is replaced."""

    device: str
    bind_ip: str
    port: int
    underlay_mtu: int
    network_version: int
    subnet_len: int
    offloads: bool
    # Dual stack: this host's IPv6 underlay address, where a second socket listens on the
    # same port for the IPv6 half's packets (weft.backends.udp.plan); None: one socket.
    bind_ipv6: str | None = None

    def argv(self) -> list[str]:
        return ["--device", self.device, "--bind-ip", self.bind_ip, "--port", str(self.port),
                "--underlay-mtu", str(self.underlay_mtu),
                "--network-version", str(self.network_version),
                "--subnet-len", str(self.subnet_len),
                *([] if self.offloads else ["--no-offloads"]),
                *([] if self.bind_ipv6 is None else ["--bind-ipv6", self.bind_ipv6])]

    @property
    def sockets(self) -> int:
        """How many underlay sockets the forwarder has (and hands over)."""
        return 1 if self.bind_ipv6 is None else 2

    def as_dict(self) -> dict[str, Any]:
        # Without an IPv6 underlay socket, the spec a forwarder of an earlier version
        # says: an upgrade is handed over, not replaced.
        spec = asdict(self)
        if self.bind_ipv6 is None:
            del spec["bind_ipv6"]
        return spec


# --- the peer table on the wire (pure) ------------------------------------------------------

def encode_table(table: PeerTable) -> dict[str, Any]:
    encoded: dict[str, Any] = {
        "version": table.version, "subnet_len": table.subnet_len,
        "routes": [[subnet, ip, port] for subnet, (ip, port) in table.routes.items()]}
    if table.six is not None:  # dual stack: the IPv6 half's routes (the same members)
        encoded["six"] = encode_table(table.six)
    return encoded


def decode_table(data: Mapping[str, Any]) -> PeerTable:
    """The table `encode_table` wrote; ValueError on anything else."""
    if not isinstance(data, Mapping):
        raise ValueError("a peer table is a JSON object")
    table = _decode_one(data)
    if "six" not in data:
        return table
    six = _decode_one(data["six"])
    if six.version != 6 or table.version != 4 or "six" in data["six"]:
        raise ValueError("a dual-stack peer table is an IPv4 one with an IPv6 one in six")
    return PeerTable(table.version, table.subnet_len, table.routes,
                     table.members | six.members,
                     six=PeerTable(6, six.subnet_len, six.routes, table.members | six.members))


def _decode_one(data: Mapping[str, Any]) -> PeerTable:
    if not isinstance(data, Mapping):
        raise ValueError("a peer table is a JSON object")
    version, subnet_len, rows = data.get("version"), data.get("subnet_len"), data.get("routes")
    if version not in (4, 6) or not isinstance(subnet_len, int) or not isinstance(rows, list):
        raise ValueError("a peer table needs version (4 or 6), subnet_len and routes")
    bits = 32 if version == 4 else 128
    if not 0 < subnet_len <= bits:
        raise ValueError(f"a peer table of IPv{version} cannot have subnet_len {subnet_len}")
    routes: dict[int, Endpoint] = {}
    for row in rows:
        if (not isinstance(row, list) or len(row) != 3 or not isinstance(row[0], int)
                or not isinstance(row[1], str) or isinstance(row[2], bool)
                or not isinstance(row[2], int) or not 0 <= row[0] < 1 << bits
                or not 0 < row[2] < 65536):
            raise ValueError(f"a peer table row must be [subnet, ip, port], not {row!r}")
        routes[row[0]] = (row[1], row[2])
    return PeerTable(version, subnet_len, routes, frozenset(routes.values()))


# --- the socket edges -------------------------------------------------------------------------

def trusted_peer(sock: socket.socket) -> int:
    """The pid at the other end of `sock`, if it runs as root or as this user; else
    ControlError."""
    pid: int
    uid: int
    pid, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                _UCRED.size))
    if uid not in (0, os.geteuid()):
        raise ControlError(f"refused a control connection from uid {uid} (pid {pid})")
    return pid


def read_message(sock: socket.socket, first: bytes = b"") -> dict[str, Any]:
    """One JSON object ending in a newline (or at the end of the stream); `first`: its
    beginning, already received."""
    chunks: list[bytes] = [first] if first else []
    size = len(first)
    while not first.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if chunk.endswith(b"\n"):
            break
        if size > MAX_MESSAGE:
            raise ControlError("control message too long")
    try:
        message = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise ControlError(f"not a control message: {exc}") from None
    if not isinstance(message, dict):
        raise ControlError("a control message is a JSON object")
    return message


def send_message(sock: socket.socket, message: Mapping[str, Any]) -> None:
    sock.sendall(json.dumps(message, separators=(",", ":")).encode() + b"\n")


def request(path: Path, message: Mapping[str, Any], timeout: float = 5.0
            ) -> tuple[dict[str, Any], int]:
    """Send one request to the forwarder listening on `path`: its reply and its pid.
    ControlError if nothing (or something else than root's socket) answers."""
    reply, pid, _ = _exchange(path, message, timeout, fds=0)
    return reply, pid


def take_over(path: Path, timeout: float = 5.0, sockets: int = 1
              ) -> tuple[dict[str, Any], list[int]]:
    """Ask the forwarder on `path` to hand over: its table and offloads, and its TUN fd
    and its `sockets` socket fds, now this process's (the other exits)."""
    wanted = 1 + sockets
    reply, _, fds = _exchange(path, {"op": "handover"}, timeout, fds=wanted)
    if len(fds) != wanted:
        for fd in fds:
            os.close(fd)
        raise ControlError(f"the forwarder handed over {len(fds)} descriptors, not {wanted}")
    return reply, fds


def _exchange(path: Path, message: Mapping[str, Any], timeout: float, fds: int
              ) -> tuple[dict[str, Any], int, list[int]]:
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise ControlError(f"no forwarder control socket at {path} ({exc.strerror})") from None
    # Never through a symlink, never another user's socket (the directory is root's 0700,
    # so what is checked here is what connect() reaches).
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid not in (0, os.geteuid()):
        raise ControlError(f"{path} is not root's forwarder control socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        received: list[int] = []
        try:
            sock.connect(str(path))
            pid = trusted_peer(sock)
            send_message(sock, message)
            first = b""
            if fds:
                first, received, _, _ = socket.recv_fds(sock, 65536, fds)
            reply = read_message(sock, first)
        except (OSError, ControlError) as exc:
            for fd in received:
                os.close(fd)
            raise ControlError(f"forwarder control socket {path}: {exc}") from None
    if "error" in reply:
        for fd in received:
            os.close(fd)
        raise ControlError(f"the forwarder refused {message.get('op')!r}: {reply['error']}")
    return reply, pid, received
