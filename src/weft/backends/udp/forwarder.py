"""The `udp` backend's I/O edge: a TUN device, a UDP socket and two threads moving batches.

    TUN --readv 1 stream into chunk slots--> write_headers --1 sendmsg, UDP_SEGMENT--> peer
    TUN <--1 writev (vnet hdr + payload views)-- Reassembler <--1 recvmsg, UDP_GRO-- peer

Each direction has a dedicated thread blocked in its read system call, not an event
loop: a packet costs one wake-up and one system call to fetch it (a poll/EAGAIN pattern
cost ~10 µs more per round trip, measured), and the Python work of one direction runs
while the other direction's system calls have dropped the GIL.  To stop, `close()` shuts
the socket's receive side and sends one broadcast out of the TUN device: that wakes both.

All per-packet parsing lives in the pure `weft.backends.udp.codec`; this module holds fds,
threads, counters and the fallbacks for offloads the kernel refuses.  Nothing from the
wire may raise out of a thread: every datagram is delivered or dropped and counted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Final

from weft.backends.udp.codec import (
    HEADER_SIZE,
    MAX_STREAM,
    MIN_STREAM,
    SINGLE_HEADER,
    SINGLE_PREFIX,
    Chunker,
    Reassembler,
    decode_single,
    decode_stream,
    write_headers,
)
from weft.backends.udp.plan import Endpoint, PeerTable
from weft.core.config import IPAddress
from weft.core.constants import VNET_HEADER
from weft.core.errors import (
    KernelError,
    KernelFeatureMissing,
    PermissionProblem,
    RemoteProtocolError,
)

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
# --- linux/udp.h ----------------------------------------------------------------------------
SOL_UDP: Final = 17
UDP_SEGMENT: Final = 103
UDP_GRO: Final = 104
# --- socket options the socket module does not name on every build ----------------------
SO_SNDBUFFORCE: Final = 32
SO_RCVBUFFORCE: Final = 33
IP_MTU_DISCOVER: Final = 10
IPV6_MTU_DISCOVER: Final = 23
IP_PMTUDISC_DO: Final = 2  # set DF, follow the learned path MTU
IP_PMTUDISC_PROBE: Final = 3  # set DF, ignore learned path MTU: never fragment, never shrink


def set_path_mtu_discovery(sock: socket.socket, family: int, mode: int) -> None:
    """IP_MTU_DISCOVER (or its IPv6 twin) on `sock`: how the kernel treats DF."""
    if family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, mode)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, mode)
# The kernel's limit on segments per GSO send (UDP_MAX_SEGMENTS; 64 on older kernels).
MAX_GSO_SEGMENTS: Final = 64
# Largest UDP payload of one send: 64 KiB minus the UDP and (for IPv4) IP headers.  A
# 64 KiB super-packet plus its chunk headers exceeds it and takes two sends.  Capping the
# TUN's gso_max_size instead would avoid that, but then the kernel segments forwarded
# container traffic in software before the TUN: measured 10x slower.
MAX_UDP_PAYLOAD: Final = {4: 0xFFFF - 8 - 20, 6: 0xFFFF - 8}
IP_UDP_HEADERS: Final = {4: 20 + 8, 6: 40 + 8}
SOCKET_BUFFER: Final = 8 << 20
RECV_SIZE: Final = 0x10000
_CMSG_SPACE: Final = socket.CMSG_SPACE(4)
_U16: Final = struct.Struct("=H")
_INT: Final = struct.Struct("=i")
# A plain int: `socket.MSG_TRUNC` is an IntFlag, and `int & IntFlag` runs enum code
# (measured 1.3 µs per packet on this VM, as much as all of the codec's checks).
_MSG_TRUNC: Final = int(socket.MSG_TRUNC)
# Where the inner IP header starts in the TX buffer, and its version/IHL byte and IPv4
# destination read in one C call (an IPv6 header reads its destination separately).
_IP: Final = HEADER_SIZE + VNET_HEADER
_V4_DESTINATION: Final = struct.Struct("!B15xI")


@dataclass
class Offloads:
    """Which offloads are in force; `notes` says why any is off (for logs and status)."""

    tun_csum: bool = False
    tun_tso: bool = False
    udp_gso: bool = False
    udp_gro: bool = False
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tun_csum": self.tun_csum,
            "tun_tso": self.tun_tso,
            "udp_gso": self.udp_gso,
            "udp_gro": self.udp_gro,
            "fallbacks": list(self.notes),
        }


@dataclass
class Counters:
    """One direction's counters; written only by that direction's thread.

    The one-datagram fast path counts each packet with two updates, not four: `singles`
    (one stream, one datagram, one system call) and `single_bytes` (their inner bytes);
    `as_dict` folds them into the totals."""

    packets: int = 0  # streams (inner packets, GSO super-packets count once)
    bytes: int = 0  # inner bytes, vnet header excluded
    datagrams: int = 0  # UDP datagrams on the underlay
    batches: int = 0  # system calls on the UDP side (sendmsg / recvmsg)
    drops: dict[str, int] = field(default_factory=dict)
    singles: int = 0
    single_bytes: int = 0

    def drop(self, reason: str, count: int = 1) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + count

    def as_dict(self) -> dict[str, Any]:
        singles = self.singles
        return {
            "packets": self.packets + singles,
            "bytes": self.bytes + self.single_bytes,
            "datagrams": self.datagrams + singles,
            "batches": self.batches + singles,
            "drops": dict(self.drops),
        }


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


def set_tun_offloads(fd: int, offloads: bool, in_force: Offloads) -> None:
    """Ask for checksum + TSO super-packets; fall back step by step to none."""
    if not offloads:
        fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
        in_force.notes.append("offloads disabled by the Offloads option")
        return
    for flags, csum, tso in (
        (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6, True, True),
        (TUN_F_CSUM, True, False),
        (0, False, False),
    ):
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
        except OSError as exc:
            in_force.notes.append(f"TUNSETOFFLOAD {flags:#x} refused: {exc.strerror}")
            continue
        in_force.tun_csum, in_force.tun_tso = csum, tso
        return


def open_udp_socket(
    bind_ip: IPAddress, port: int, offloads: bool, in_force: Offloads
) -> socket.socket:
    family = socket.AF_INET if bind_ip.version == 4 else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        for force, plain in (
            (SO_RCVBUFFORCE, socket.SO_RCVBUF),
            (SO_SNDBUFFORCE, socket.SO_SNDBUF),
        ):
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
        # Never let the kernel IP-fragment a datagram: a too-big send fails loudly instead.
        set_path_mtu_discovery(sock, family, IP_PMTUDISC_PROBE)
        sock.bind((str(bind_ip), port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise KernelError(
                f"UDP port {port} on {bind_ip} is in use; stop the other user or set Backend.Port"
            ) from None
        raise KernelError(f"open UDP socket {bind_ip}:{port}: {exc}") from None
    if offloads:
        try:
            sock.setsockopt(SOL_UDP, UDP_SEGMENT, 0)  # probe only: segment size is per send
            in_force.udp_gso = True
        except OSError as exc:
            in_force.notes.append(f"UDP_SEGMENT refused: {exc.strerror}")
        try:
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)
            in_force.udp_gro = True
        except OSError as exc:
            in_force.notes.append(f"UDP_GRO refused: {exc.strerror}")
    return sock


class Forwarder:
    """Moves packets between the TUN device and peers; `peers` is swapped atomically."""

    def __init__(
        self,
        device: str,
        bind_ip: IPAddress,
        port: int,
        underlay_mtu: int,
        network_version: int,
        subnet_len: int,
        offloads: bool = True,
    ) -> None:
        self.device = device
        self.bind_ip = bind_ip
        self.port = port
        self.in_force = Offloads()
        self.tx = Counters()
        self.rx = Counters()
        self._offloads = offloads
        self._underlay_mtu = underlay_mtu
        self._peers = PeerTable(network_version, subnet_len)
        # Keyed by (ip, port): chunks of one member never splice with another sender's.
        self._reassemblers: dict[Endpoint, Reassembler] = {}
        # Senders whose reassembler holds an incomplete stream: almost always empty, so
        # the receive fast path tests it with one truth test, not a lookup.
        self._pending: set[Endpoint] = set()
        self._tun = -1
        self._sock: socket.socket | None = None
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._chunker: Chunker | None = None
        self._segment_cmsg: dict[int, list[tuple[int, int, bytes]]] = {}

    # --- lifecycle ----------------------------------------------------------------------

    def open(self) -> None:
        """Create/attach the TUN device and bind the socket; nothing runs yet."""
        self._tun = open_tun(self.device)
        try:
            set_tun_offloads(self._tun, self._offloads, self.in_force)
            self._sock = open_udp_socket(
                self.bind_ip, self.port, self._offloads, self.in_force
            )
        except BaseException:
            os.close(self._tun)
            self._tun = -1
            raise
        self._chunker = self._make_chunker()
        for note in self.in_force.notes:
            log.warning("udp offload fallback", extra={"detail": note})

    def _make_chunker(self) -> Chunker:
        version = self.bind_ip.version
        return Chunker(
            datagram_size=self._underlay_mtu - IP_UDP_HEADERS[version],
            max_segments=MAX_GSO_SEGMENTS if self.in_force.udp_gso else 1,
            max_batch_bytes=MAX_UDP_PAYLOAD[version],
        )

    def start(self) -> None:
        if self._sock is None:
            raise RuntimeError("Forwarder.start() before open()")
        self._stopping = False
        # One thread per direction, each blocked in the kernel until its fd is readable:
        # measured against one thread for both ways (no better) and against busy-polling
        # after each packet (2-4x worse latency on 2 cores: it starves the applications).
        self._threads = [
            threading.Thread(target=self._guard, args=(self._tun_to_udp,),
                             name="weft-udp-tx", daemon=True),
            threading.Thread(target=self._guard, args=(self._udp_to_tun,),
                             name="weft-udp-rx", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """Stop both threads and close the fds; the persistent TUN device stays."""
        self._stopping = True
        if self._sock is not None:
            # Shutting the receive side wakes a blocked recvmsg (it returns empty at once);
            # the kernel reports ENOTCONN for an unconnected socket but does it anyway.
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RD)
        if self._threads:
            self._wake_tun_reader()
        for thread in self._threads:
            thread.join(timeout=2)
            if thread.is_alive():  # only if the device is down: it ends with the process
                log.warning("udp forwarder thread did not stop", extra={"thread": thread.name})
        self._threads = []
        if self._tun >= 0:
            os.close(self._tun)
            self._tun = -1
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _wake_tun_reader(self) -> None:
        """Send one empty broadcast out of our TUN device: the TX thread's blocked read
        returns it, sees `_stopping`, and ends.  Works without any route or address."""
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.device.encode())
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                sock.sendto(b"", ("255.255.255.255", 9))
        except OSError as exc:  # ENETDOWN: never activated; nothing will wake the reader
            log.debug("could not wake the TUN reader", extra={"error": str(exc)})

    def set_peers(self, table: PeerTable) -> None:
        self._peers = table  # one reference swap: threads see old or new, never half
        # list(dict) copies in one C call under the GIL; iterating the dict itself here
        # would race the receive thread inserting a new sender (RuntimeError).
        for sender in list(self._reassemblers):
            if sender not in table.members:
                self._reassemblers.pop(sender, None)
                self._pending.discard(sender)

    @property
    def peers(self) -> PeerTable:
        return self._peers

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def status(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "port": self.port,
            "running": self.running,
            "offloads": self.in_force.as_dict(),
            "tx": self.tx.as_dict(),
            "rx": self.rx.as_dict(),
            "peers": self._peers.describe(),
            "counters": self.flat_counters(),
        }

    def flat_counters(self) -> dict[str, int]:
        """Every counter under one flat name (`tx_packets`, `rx_drops_unknown_peer`...),
        the form the agent exports to Prometheus."""
        flat: dict[str, int] = {}
        for direction, counters in (("tx", self.tx), ("rx", self.rx)):
            for name, value in counters.as_dict().items():
                if isinstance(value, dict):
                    flat.update({f"{direction}_drops_{k}": v for k, v in value.items()})
                else:
                    flat[f"{direction}_{name}"] = value
        return flat

    # --- the two data paths -------------------------------------------------------------

    def _guard(self, loop: Any) -> None:
        # A bug must not silently kill a direction: log it loudly and keep going.
        while not self._stopping:
            try:
                loop()
            except Exception:
                log.exception("udp forwarder thread failed; restarting it",
                              extra={"thread": threading.current_thread().name})
                time.sleep(0.1)  # a persistent bug must not turn into a busy loop

    def _tun_to_udp(self) -> None:
        tun = self._tun
        chunker = self._chunker
        sock = self._sock
        assert chunker is not None
        assert sock is not None
        # The readv scatters each stream straight into its chunks' places, HEADER_SIZE
        # bytes of room before each: a stream that fits one datagram gets its header
        # written in place and leaves in one buffer; a super-packet gets all its headers
        # by strided writes and leaves in one or two contiguous buffers (UDP_SEGMENT), no
        # per-chunk Python objects (measured: 11 % less CPU per GB than chunk views).
        # The layout depends only on the datagram size, which no fallback changes.
        buf = bytearray(chunker.chunk_count(MAX_STREAM + 1) * chunker.datagram_size)
        view = memoryview(buf)
        into = chunker.slots(view)
        # Everything a 1-byte packet touches is a local or one C call: this loop is the
        # forwarder's whole per-packet cost on the latency path (see README, udp).
        readv, sendto, send_chunks = os.readv, sock.sendto, self._send_chunks
        stamp, prefix = SINGLE_HEADER.pack_into, SINGLE_PREFIX
        v4_destination = _V4_DESTINATION.unpack_from
        counters = self.tx
        single_max = chunker.chunk_size
        packet_id = 0  # the last one sent
        while True:
            try:
                size = readv(tun, into)
            except OSError as exc:
                if self._stopping:
                    return
                if not counters.drops.get("tun_read"):  # once, not every 0.1 s
                    log.warning("TUN read failed", extra={"error": str(exc)})
                counters.drop("tun_read")
                time.sleep(0.1)  # e.g. the device was deleted under us: do not spin
                continue
            if self._stopping:
                return
            if not MIN_STREAM <= size <= MAX_STREAM:
                counters.drop("malformed")
                continue
            table = self._peers
            version_ihl, destination = v4_destination(buf, _IP)
            if version_ihl >> 4 != table.version:
                counters.drop("no_route")
                continue
            if table.version == 6:
                if size < VNET_HEADER + 40:
                    counters.drop("malformed")
                    continue
                destination = int.from_bytes(view[_IP + 24 : _IP + 40], "big")
            endpoint = table.routes.get(destination & table.mask)
            if endpoint is None:
                counters.drop("no_route")
                continue
            packet_id = (packet_id + 1) & 0xFFFFFFFF
            if size > single_max:
                send_chunks(buf, view, size, endpoint, packet_id)
                continue
            # The fast path: one datagram, its header written in place.
            stamp(buf, 0, prefix, packet_id)
            try:
                sendto(view[: HEADER_SIZE + size], endpoint)
            except OSError:
                counters.drop("send_error")
                continue
            counters.singles += 1
            counters.single_bytes += size - VNET_HEADER

    def _send_chunks(self, buf: bytearray, view: memoryview, size: int, endpoint: Endpoint,
                     packet_id: int) -> None:
        """Send one stream of more than one datagram: `size` bytes of `buf` laid out as
        `Chunker.slots` places it, routed to `endpoint`."""
        counters = self.tx
        chunker = self._chunker
        sock = self._sock
        assert chunker is not None
        assert sock is not None
        total = chunker.laid_out(size)
        datagram = chunker.datagram_size
        write_headers(buf, total, datagram, packet_id)
        sendmsg, segment_cmsg = sock.sendmsg, self._segment_cmsg
        for start, end, datagrams in chunker.spans(total):
            piece = view[start:end]
            if datagrams > 1:
                cmsg = segment_cmsg.get(datagram)
                if cmsg is None:
                    cmsg = [(SOL_UDP, UDP_SEGMENT, _U16.pack(datagram))]
                    segment_cmsg[datagram] = cmsg
            else:
                cmsg = []
            try:
                sendmsg([piece], cmsg, 0, endpoint)
            except OSError as exc:
                if not self._send_failed(exc, piece, datagram, endpoint):
                    return
            counters.batches += 1
            counters.datagrams += datagrams
        counters.packets += 1
        counters.bytes += size - VNET_HEADER

    def _send_failed(
        self, exc: OSError, piece: memoryview, segment_size: int, endpoint: tuple[str, int]
    ) -> bool:
        """Handle a failed sendmsg of `piece` (datagrams back to back, every
        `segment_size` bytes); True if they went out after all."""
        if exc.errno == errno.EIO and self.in_force.udp_gso:
            # The route's device cannot checksum-offload UDP GSO: switch GSO off for good
            # and resend these datagrams one by one.
            self.in_force.udp_gso = False
            self.in_force.notes.append(f"UDP GSO send failed ({exc.strerror}); GSO off")
            log.warning("udp offload fallback", extra={"detail": self.in_force.notes[-1]})
            self._chunker = self._make_chunker()
            return self._send_each(piece, segment_size, endpoint)
        self.tx.drop("send_error")
        return False

    def _send_each(self, piece: memoryview, segment_size: int, endpoint: tuple[str, int]) -> bool:
        assert self._sock is not None
        try:
            for start in range(0, len(piece), segment_size):
                self._sock.sendto(piece[start : start + segment_size], endpoint)
        except OSError:
            self.tx.drop("send_error")
            return False
        return True

    def _udp_to_tun(self) -> None:
        sock = self._sock
        assert sock is not None
        # As on the send side, a 1-byte packet's whole path is this loop: locals, three C
        # calls (recvmsg_into, decode_single's two unpacks, write) and one dict lookup.
        recvmsg_into, receive, refuse = sock.recvmsg_into, self._receive, self._refuse
        write, tun, decode = os.write, self._tun, decode_single
        counters = self.rx
        pending = self._pending
        ipv4 = self.bind_ip.version == 4
        buf = bytearray(RECV_SIZE)
        bufs = [buf]
        view = memoryview(buf)
        while True:
            try:
                size, ancillary, flags, addr = recvmsg_into(bufs, _CMSG_SPACE)
            except OSError as exc:
                if self._stopping:
                    return
                counters.drop("recv_error")
                log.debug("UDP receive failed", extra={"error": str(exc)})
                continue
            if self._stopping:
                return
            sender: Endpoint = addr if ipv4 else addr[:2]  # IPv6 adds flowinfo, scope id
            # The fast path: one datagram (GRO only adds its cmsg to a glued batch), no
            # flag (MSG_TRUNC), while no stream of this sender is pending (else the
            # reassembler must see it, to drop the pending one).
            if not ancillary and not flags and not (pending and sender in pending):
                table = self._peers
                try:
                    single = decode(buf, size)
                except RemoteProtocolError as exc:
                    refuse(sender, table, size, exc.reason)
                    continue
                if single is not None:
                    version, source = single
                    # Only the member holding the source's subnet may send it (no
                    # spoofing via us); one lookup, as the holder is a member too.
                    if table.routes.get(source & table.mask) != sender or (
                        version != table.version
                    ):
                        refuse(sender, table, size,
                               "malformed" if version != table.version else "spoofed_source")
                        continue
                    try:
                        write(tun, view[HEADER_SIZE:size])
                    except OSError as exc:
                        refuse(sender, table, size, "tun_write")
                        log.debug("TUN write failed", extra={"error": str(exc)})
                        continue
                    counters.singles += 1
                    counters.single_bytes += size - _IP
                    continue
            if receive(buf, size, ancillary, flags, sender):
                # A stream left incomplete keeps views into this buffer: take a new one.
                buf = bytearray(RECV_SIZE)
                bufs = [buf]
                view = memoryview(buf)

    def _refuse(self, sender: Endpoint, table: PeerTable, size: int, reason: str) -> None:
        """Count a datagram the fast path refused, as the general path would have: a
        stranger's as `unknown_peer` whatever it holds, an empty one as `malformed`."""
        counters = self.rx
        counters.batches += 1
        if sender not in table.members:
            counters.drop("unknown_peer")
            return
        if size == 0:
            counters.drop("malformed")
            return
        counters.datagrams += 1
        counters.drop(reason)

    def _receive(self, buf: bytearray, size: int, ancillary: list[tuple[int, int, bytes]],
                 flags: int, sender: Endpoint) -> bool:
        """Handle one received buffer the fast path did not take (many datagrams glued by
        UDP GRO, a chunk of a longer stream, a flagged one, or one while a stream of its
        sender is pending) of `size` bytes; True if an incomplete stream now holds views
        into `buf`."""
        counters = self.rx
        counters.batches += 1
        table = self._peers
        if sender not in table.members:
            counters.drop("unknown_peer")
            return False
        if flags & _MSG_TRUNC:
            counters.drop("truncated")
            return False
        if size == 0:
            counters.drop("malformed")
            return False
        segment = size
        for level, kind, value in ancillary:
            if level == SOL_UDP and kind == UDP_GRO and len(value) >= 4:
                segment = _INT.unpack_from(value)[0]
        if segment <= 0:
            counters.drop("malformed")
            return False
        counters.datagrams += -(-size // segment)
        reassembler = self._reassemblers.get(sender)
        if reassembler is None:
            reassembler = self._reassemblers[sender] = Reassembler()
        result = reassembler.feed(memoryview(buf)[:size], segment)
        for reason, count in result.drops.items():
            counters.drop(reason, count)
        for parts, stream_len in zip(result.streams, result.sizes, strict=True):
            self._deliver(parts, stream_len, sender, table, os.writev, self._tun)
        if reassembler.pending:
            self._pending.add(sender)
            return True
        self._pending.discard(sender)
        return False

    def _deliver(self, parts: list[memoryview], size: int, sender: Endpoint, table: PeerTable,
                 writev: Any, tun: int) -> None:
        counters = self.rx
        try:
            version, source = decode_stream(parts[0], size)
        except RemoteProtocolError as exc:
            counters.drop(exc.reason)
            return
        if version != table.version:
            counters.drop("malformed")
            return
        # Only the member holding the source's subnet may send it: no spoofing via us.
        if table.routes.get(source & table.mask) != sender:
            counters.drop("spoofed_source")
            return
        try:
            writev(tun, parts)
        except OSError as exc:
            # EINVAL: the kernel refused the vnet header; EAGAIN/ENOBUFS: device busy.
            counters.drop("tun_write")
            log.debug("TUN write failed", extra={"error": str(exc)})
            return
        counters.packets += 1
        counters.bytes += size - VNET_HEADER
