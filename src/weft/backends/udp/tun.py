"""The `udp` backend's TUN device: open, offloads, and the small device the forwarder uses.

The device is opened with IFF_VNET_HDR: one read of its fd returns one *stream* (a
virtio-net header + one IP packet, a TSO super-packet of up to 64 KiB when offloads are
on), one write or writev puts one back.  That framing is what the forwarder's loops read
and write and what travels on the wire (weft.backends.udp.codec), so it stays on even when
the offloads are off.  The forwarder receives a `TunDevice` from its caller and never
opens one itself; a test hands it any fd with the same framing instead.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Final

from weft.core.constants import VNET_HEADER
from weft.core.errors import KernelError, KernelFeatureMissing, PermissionProblem

log = logging.getLogger("weft.backends.udp")

# --- linux/if_tun.h -----------------------------------------------------------------------
TUNSETIFF: Final = 0x400454CA
TUNSETPERSIST: Final = 0x400454CB
TUNSETOFFLOAD: Final = 0x400454D0
TUNSETVNETHDRSZ: Final = 0x400454D8
IFF_TUN: Final = 0x0001
IFF_NO_PI: Final = 0x1000
IFF_VNET_HDR: Final = 0x4000
TUN_F_CSUM: Final = 0x01
TUN_F_TSO4: Final = 0x02
TUN_F_TSO6: Final = 0x04
_INT: Final = struct.Struct("=i")


@dataclass
class TunDevice:
    """An open TUN device as the forwarder uses it: `fd` (one stream per read, one per
    write or writev), which offloads it has, and `notes` on any that are off (why)."""

    name: str
    fd: int
    csum: bool = False
    tso: bool = False
    notes: list[str] = field(default_factory=list)

    def wake(self) -> None:
        """Send one empty broadcast out of this device: a read blocked on `fd` returns it.
        Works without any route or address."""
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.name.encode())
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                sock.sendto(b"", ("255.255.255.255", 9))
        except OSError as exc:  # ENETDOWN: never activated; nothing will wake the reader
            log.debug("could not wake the TUN reader", extra={"error": str(exc)})

    def close(self) -> None:
        """Close the fd; the persistent device stays (see `delete_tun`)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_device(name: str, offloads: bool) -> TunDevice:
    """Create (or re-attach to) persistent TUN device `name` and set its offloads
    (`offloads=False`: none, the operator's switch)."""
    device = TunDevice(name, open_tun(name))
    try:
        set_tun_offloads(device, offloads)
    except BaseException:
        device.close()
        raise
    return device


def _ifreq(name: str, flags: int) -> bytes:
    return struct.pack("16sH22x", name.encode(), flags)


def _os_error(exc: OSError, what: str) -> Exception:
    if exc.errno in (errno.EPERM, errno.EACCES):
        return PermissionProblem(f"{what}: permission denied; run as root (CAP_NET_ADMIN)")
    if exc.errno in (errno.ENOENT, errno.ENODEV, errno.ENOTTY):
        return KernelFeatureMissing(f"{what}: the kernel lacks TUN support ({exc})")
    return KernelError(f"{what}: {exc}")


def open_tun(name: str) -> int:
    """Create (or re-attach to) persistent TUN device `name` with a virtio-net header.

    Persistent: the device and its routes outlive this process, so restarting the agent
    does not tear down routes (traffic pauses until the new process attaches)."""
    if len(name.encode()) > 15:
        raise KernelError(f"device name {name!r} is longer than 15 bytes")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise _os_error(exc, "open /dev/net/tun") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, IFF_TUN | IFF_NO_PI | IFF_VNET_HDR))
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, _INT.pack(VNET_HEADER))
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.EBUSY:
            raise KernelError(
                f"TUN device {name} is held by another process; is another weft agent "
                "running on this host? Stop it first"
            ) from None
        if exc.errno == errno.EINVAL:
            raise KernelError(
                f"TUN device {name}: exists with other flags ({exc}); delete it "
                f"(ip link del {name}) and retry"
            ) from None
        raise _os_error(exc, f"set up TUN device {name}") from None
    return fd


def delete_tun(name: str) -> None:
    """Remove persistent TUN device `name` if it exists (attach, unset persist, close)."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise _os_error(exc, "open /dev/net/tun") from None
    try:
        # Attach (or, if it is gone, create) and drop persistence: close() then removes it.
        fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, IFF_TUN | IFF_NO_PI | IFF_VNET_HDR))
        fcntl.ioctl(fd, TUNSETPERSIST, 0)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise _os_error(exc, f"delete TUN device {name}") from None
    finally:
        os.close(fd)


def set_tun_offloads(device: TunDevice, offloads: bool) -> None:
    """Ask for checksum + TSO super-packets; fall back step by step to none."""
    if not offloads:
        fcntl.ioctl(device.fd, TUNSETOFFLOAD, 0)
        device.notes.append("offloads disabled by the Offloads option")
        return
    for flags, csum, tso in (
        (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6, True, True),
        (TUN_F_CSUM, True, False),
        (0, False, False),
    ):
        try:
            fcntl.ioctl(device.fd, TUNSETOFFLOAD, flags)
        except OSError as exc:
            device.notes.append(f"TUNSETOFFLOAD {flags:#x} refused: {exc.strerror}")
            continue
        device.csum, device.tso = csum, tso
        return
