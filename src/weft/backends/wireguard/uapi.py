"""The UAPI edge: talk to a userspace WireGuard (wireguard-go) over its unix socket.

wireguard-go listens on `/var/run/wireguard/<ifname>.sock` (the directory is compiled
in). One request per connection; the codec lives in `weft.backends.wireguard.protocol`.
Socket and protocol failures become weft errors here.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from weft.backends.wireguard.plan import DeviceChange, DeviceState
from weft.backends.wireguard.protocol import (
    GET_REQUEST,
    UapiProtocolError,
    encode_set,
    parse_get_answer,
    parse_set_answer,
)
from weft.core.errors import KernelError

SOCKET_DIR = Path("/var/run/wireguard")
_MAX_ANSWER = 16 << 20  # a get with thousands of peers is a few MB; more is a broken peer


def socket_path(ifname: str, directory: Path = SOCKET_DIR) -> Path:
    return directory / f"{ifname}.sock"


class UapiDevice:
    """A wireguard-go device, configured through its UAPI socket."""

    def __init__(self, ifname: str, directory: Path = SOCKET_DIR, timeout: float = 2.0) -> None:
        self.ifname = ifname
        self.path = socket_path(ifname, directory)
        self.timeout = timeout

    def _exchange(self, request: bytes) -> str:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(str(self.path))
                sock.sendall(request)
                data = bytearray()
                # Every answer ends with "errno=N" and an empty line; wireguard-go keeps
                # the connection open for further requests, so read until that terminator.
                while not _complete(data):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                    if len(data) > _MAX_ANSWER:
                        raise KernelError(f"wireguard-go {self.ifname}: answer too large")
        except (FileNotFoundError, ConnectionRefusedError):
            raise KernelError(
                f"wireguard-go for {self.ifname} is not running (no UAPI socket at {self.path})"
            ) from None
        except PermissionError:
            raise KernelError(f"cannot open {self.path}: permission denied; run as root") from None
        except OSError as exc:
            raise KernelError(f"UAPI socket {self.path}: {exc.strerror or exc}") from None
        try:
            return data.decode("ascii")
        except UnicodeDecodeError:
            raise KernelError(f"wireguard-go {self.ifname}: non-ASCII answer") from None

    def alive(self) -> bool:
        try:
            self.read()
        except KernelError:
            return False
        return True

    def read(self) -> DeviceState:
        try:
            err, state = parse_get_answer(self._exchange(GET_REQUEST))
        except UapiProtocolError as exc:
            raise KernelError(f"wireguard-go {self.ifname}: malformed answer: {exc}") from None
        if state is None:
            raise KernelError(f"wireguard-go {self.ifname}: get failed: {_describe(err)}")
        return state

    def apply(self, change: DeviceChange) -> None:
        if change.empty:
            return
        try:
            err = parse_set_answer(self._exchange(encode_set(change)))
        except UapiProtocolError as exc:
            raise KernelError(f"wireguard-go {self.ifname}: malformed answer: {exc}") from None
        if err:
            raise KernelError(
                f"wireguard-go {self.ifname} refused the configuration: {_describe(err)}"
            )


def _complete(data: bytearray) -> bool:
    return data.endswith(b"\n\n") and data[:-2].rsplit(b"\n", 1)[-1].startswith(b"errno=")


def _describe(err: int) -> str:
    code = abs(err)
    if code == errno.EADDRINUSE:
        return ("the listen port is in use (set Backend.ListenPort, or ListenPortV6 for the "
                "IPv6 underlay device, to a free port)")
    name = errno.errorcode.get(code, "")
    return f"errno {err} {name} ({os.strerror(code)})"
