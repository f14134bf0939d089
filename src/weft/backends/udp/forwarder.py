"""The `udp` backend's loops: two threads moving batches between a TUN device and a socket.

    TUN --readv 1 stream into chunk slots--> write_headers --1 sendmsg, UDP_SEGMENT--> peer
    TUN <--1 writev (vnet hdr + payload views)-- Reassembler <--1 recvmsg, UDP_GRO-- peer

In dual stack over an IPv4 underlay on a host with an IPv6 underlay address too, a
second socket (`bind6`, the same port on that address) carries the IPv6 half's packets to
peers that listen on one as well, and a third thread receives on it; the send thread picks
the socket by the family of the peer's endpoint, a test only IPv6 packets take. Its
counters are its own (`tx6`, `rx6`: each written by one thread), summed into the totals.

The device and the socket are handed in (wireguard-go's `NewDevice(tun.Device,
conn.Bind, ...)`): `weft.backends.udp.apply` opens them (weft.backends.udp.tun,
weft.backends.udp.bind) and the forwarder owns them from then on; a test hands it a
socketpair for the device.  The loops see the device as an fd (one stream per read, one
per write) and the bind as a socket object, so nothing stands between them and the
system calls.

Each direction has a dedicated thread blocked in its read system call, not an event
loop: a packet costs one wake-up and one system call to fetch it (a poll/EAGAIN pattern
cost ~10 µs more per round trip, measured), and the Python work of one direction runs
while the other direction's system calls have dropped the GIL.  To stop, `close()` wakes
both: the bind's receive side is shut, the device sends itself one packet.

All per-packet parsing lives in the pure `weft.backends.udp.codec`; this module holds
threads, counters and the fallback for a GSO send the kernel refuses.  Nothing from the
wire may raise out of a thread: every datagram is delivered or dropped and counted.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from weft.backends.udp.bind import (
    IP_UDP_HEADERS,
    MAX_GSO_SEGMENTS,
    MAX_UDP_PAYLOAD,
    SOL_UDP,
    UDP_GRO,
    UDP_SEGMENT,
)
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
from weft.backends.udp.plan import Endpoint, PeerTable, over_ipv6
from weft.core.config import IPAddress
from weft.core.constants import VNET_HEADER
from weft.core.errors import RemoteProtocolError

log = logging.getLogger("weft.backends.udp")

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


class Device(Protocol):
    """What the loops need of a TUN device (`weft.backends.udp.tun.TunDevice`): one read
    of `fd` returns one stream (virtio-net header + IP packet), one write or writev takes
    one; the offloads it has; `wake` makes a read blocked on `fd` return."""

    @property
    def name(self) -> str: ...
    @property
    def fd(self) -> int: ...
    @property
    def csum(self) -> bool: ...
    @property
    def tso(self) -> bool: ...
    @property
    def notes(self) -> list[str]: ...
    def wake(self) -> None: ...
    def close(self) -> None: ...


class Bind(Protocol):
    """What the loops need of the underlay socket (`weft.backends.udp.bind.UdpBind`): the
    bound socket, its address, the UDP offloads it has; `wake` makes a recvmsg blocked on
    it return."""

    @property
    def sock(self) -> socket.socket: ...
    @property
    def ip(self) -> IPAddress: ...
    @property
    def port(self) -> int: ...
    @property
    def gso(self) -> bool: ...
    @property
    def gro(self) -> bool: ...
    @property
    def notes(self) -> list[str]: ...
    def wake(self) -> None: ...
    def close(self) -> None: ...


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

    def __add__(self, other: Counters) -> Counters:
        # Status sums the live counters while their threads count: a copy of each dict
        # (one C call, whole under the GIL) never changes size while it is walked.
        drops = dict(self.drops)
        for reason, count in dict(other.drops).items():
            drops[reason] = drops.get(reason, 0) + count
        return Counters(self.packets + other.packets, self.bytes + other.bytes,
                        self.datagrams + other.datagrams, self.batches + other.batches,
                        drops, self.singles + other.singles,
                        self.single_bytes + other.single_bytes)


class Forwarder:
    """Moves packets between a TUN device and peers; `peers` is swapped atomically.

    `device`, `bind` and `bind6` (dual stack's IPv6 underlay socket, if any) are handed in
    open and belong to the forwarder from then on: `close()` closes them."""

    def __init__(
        self,
        device: Device,
        bind: Bind,
        underlay_mtu: int,
        network_version: int,
        subnet_len: int,
        bind6: Bind | None = None,
    ) -> None:
        self.device = device
        self.bind = bind
        self.bind6 = bind6
        binds = [bind] if bind6 is None else [bind, bind6]
        # The offloads this forwarder uses: what the device and the sockets were granted,
        # until a refused GSO send turns udp_gso off here for good.
        self.in_force = Offloads(device.csum, device.tso, all(b.gso for b in binds),
                                 all(b.gro for b in binds),
                                 [*device.notes, *(n for b in binds for n in b.notes)])
        self.tx = Counters()
        self.rx = Counters()
        # The IPv6 underlay socket's (dual stack): written by the send thread and by that
        # socket's receive thread, so never by two threads at once.
        self.tx6 = Counters()
        self.rx6 = Counters()
        self._underlay_mtu = underlay_mtu
        self._peers = PeerTable(network_version, subnet_len)
        # Keyed by (ip, port): chunks of one member never splice with another sender's.
        self._reassemblers: dict[Endpoint, Reassembler] = {}
        # Senders whose reassembler holds an incomplete stream: almost always empty, so
        # the receive fast path tests it with one truth test, not a lookup.
        self._pending: set[Endpoint] = set()
        self._tun = device.fd
        self._sock: socket.socket | None = bind.sock
        self._sock6: socket.socket | None = bind6.sock if bind6 is not None else None
        self._stopping = False
        # A hand-over (`release`): the device and the sockets are another forwarder's too;
        # each thread finishes the packet it holds and reads no more.
        self._released = False
        self._holding: list[bool] = []  # per thread: a packet read and not yet passed on
        self._threads: list[threading.Thread] = []
        self._chunker = self._make_chunker()
        self._segment_cmsg: dict[int, list[tuple[int, int, bytes]]] = {}

    # --- lifecycle ----------------------------------------------------------------------

    def _make_chunker(self) -> Chunker:
        # The TUN read lays a stream out in datagram-sized slots before its destination is
        # known: with a second socket, slots fit the larger headers of the two underlays
        # (IPv6's) and a batch the smaller payload limit (IPv4's).
        versions = [self.bind.ip.version] + ([6] if self.bind6 is not None else [])
        return Chunker(
            datagram_size=self._underlay_mtu - max(IP_UDP_HEADERS[v] for v in versions),
            max_segments=MAX_GSO_SEGMENTS if self.in_force.udp_gso else 1,
            max_batch_bytes=min(MAX_UDP_PAYLOAD[v] for v in versions),
        )

    def start(self) -> None:
        if self._sock is None:
            raise RuntimeError("Forwarder.start() after close()")
        self._stopping = False
        # One thread per direction, each blocked in the kernel until its fd is readable:
        # measured against one thread for both ways (no better) and against busy-polling
        # after each packet (2-4x worse latency on 2 cores: it starves the applications).
        self._threads = [
            threading.Thread(target=self._guard, args=(self._tun_to_udp, 0),
                             name="weft-udp-tx", daemon=True),
            threading.Thread(target=self._guard, args=(self._udp_to_tun, 1, self.bind, self.rx),
                             name="weft-udp-rx", daemon=True),
        ]
        if self.bind6 is not None:
            self._threads.append(threading.Thread(
                target=self._guard, args=(self._udp_to_tun, 2, self.bind6, self.rx6),
                name="weft-udp-rx6", daemon=True))
        self._holding = [False] * len(self._threads)
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """Stop both threads and close the device's fd and the socket; a persistent TUN
        device stays."""
        self._stopping = True
        if self._sock is not None:
            self.bind.wake()  # the RX thread's blocked recvmsg returns at once
            if self.bind6 is not None:
                self.bind6.wake()
        if self._threads:
            self.device.wake()  # the TX thread's blocked read returns, sees `_stopping`
        for thread in self._threads:
            thread.join(timeout=2)
            if thread.is_alive():  # only if the device is down: it ends with the process
                log.warning("udp forwarder thread did not stop", extra={"worker": thread.name})
        self._threads = []
        if self._sock is not None:
            self.device.close()
            self._tun = -1
            self.bind.close()
            if self.bind6 is not None:
                self.bind6.close()
            self._sock = self._sock6 = None

    def release(self, grace: float = 0.5) -> None:
        """The device and the sockets now belong to another forwarder as well (the
        hand-over of an upgrade): each thread passes on the packet it holds and reads no
        more; returns once none holds one (at most `grace` seconds). Nothing is closed or
        woken: shutting the socket would shut it for the new owner too. A thread still
        blocked in its read holds nothing; the caller's process ends with it."""
        self._released = True
        deadline = time.monotonic() + grace
        # Twice in a row with none holding, the GIL given up in between: a thread whose
        # read has just returned is waiting for it, and marks itself once it has it.
        quiet = 0
        while quiet < 2 and time.monotonic() < deadline:
            time.sleep(0.002)
            quiet = 0 if any(self._holding) else quiet + 1

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
        status: dict[str, Any] = {
            "device": self.device.name,
            "port": self.bind.port,
            "running": self.running,
            "offloads": self.in_force.as_dict(),
            "tx": (self.tx + self.tx6).as_dict(),
            "rx": (self.rx + self.rx6).as_dict(),
            "peers": self._peers.describe(),
            "counters": self.flat_counters(),
        }
        if self.bind6 is not None:  # what of the totals crossed the IPv6 underlay
            status["ipv6_underlay"] = {"address": str(self.bind6.ip), "port": self.bind6.port,
                                       "tx": self.tx6.as_dict(), "rx": self.rx6.as_dict()}
        return status

    def flat_counters(self) -> dict[str, int]:
        """Every counter under one flat name (`tx_packets`, `rx_drops_unknown_peer`...),
        the form the agent exports to Prometheus: the totals, and with an IPv6 underlay
        socket its share beside them (`ipv6_underlay_tx_packets`...)."""
        flat: dict[str, int] = {}
        shares = [("", self.tx + self.tx6, self.rx + self.rx6)]
        if self.bind6 is not None:
            shares.append(("ipv6_underlay_", self.tx6, self.rx6))
        for prefix, tx, rx in shares:
            for direction, counters in (("tx", tx), ("rx", rx)):
                for name, value in counters.as_dict().items():
                    if isinstance(value, dict):
                        flat.update({f"{prefix}{direction}_drops_{k}": v
                                     for k, v in value.items()})
                    else:
                        flat[f"{prefix}{direction}_{name}"] = value
        return flat

    # --- the two data paths -------------------------------------------------------------

    def _guard(self, loop: Any, *args: Any) -> None:
        # A bug must not silently kill a direction: log it loudly and keep going.
        while not (self._stopping or self._released):
            try:
                loop(*args)
            except Exception:
                log.exception("udp forwarder thread failed; restarting it",
                              extra={"worker": threading.current_thread().name})
                time.sleep(0.1)  # a persistent bug must not turn into a busy loop

    def _tun_to_udp(self, slot: int) -> None:
        tun = self._tun
        chunker = self._chunker
        sock = self._sock
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
        # forwarder's whole per-packet cost on the latency path (docs/backends/udp.md).
        readv, sendto, send_chunks = os.readv, sock.sendto, self._send_chunks
        stamp, prefix = SINGLE_HEADER.pack_into, SINGLE_PREFIX
        v4_destination = _V4_DESTINATION.unpack_from
        tx, tx6 = self.tx, self.tx6
        # Dual stack's IPv6 underlay socket: only an IPv6 packet to an IPv6 endpoint takes it.
        sock6 = self._sock6
        sendto6 = sock6.sendto if sock6 is not None else sendto
        single_max = chunker.chunk_size
        packet_id = 0  # the last one sent
        holding = self._holding
        while True:
            holding[slot] = False
            if self._released:
                return
            try:
                size = readv(tun, into)
                holding[slot] = True
            except OSError as exc:
                if self._stopping:
                    return
                if not tx.drops.get("tun_read"):  # once, not every 0.1 s
                    log.warning("TUN read failed", extra={"error": str(exc)})
                tx.drop("tun_read")
                time.sleep(0.1)  # e.g. the device was deleted under us: do not spin
                continue
            if self._stopping:
                return
            if not MIN_STREAM <= size <= MAX_STREAM:
                tx.drop("malformed")
                continue
            table = self._peers
            version_ihl, destination = v4_destination(buf, _IP)
            if version_ihl >> 4 != table.version:
                # Dual stack: the IPv6 half's table (a branch only IPv6 packets take).
                other = table.for_version(version_ihl >> 4)
                if other is None:
                    tx.drop("no_route")
                    continue
                table = other
            send, counters = sendto, tx
            if table.version == 6:
                if size < VNET_HEADER + 40:
                    tx.drop("malformed")
                    continue
                destination = int.from_bytes(view[_IP + 24 : _IP + 40], "big")
                endpoint = table.routes.get(destination & table.mask)
                if sock6 is not None and endpoint is not None and over_ipv6(endpoint):
                    send, counters = sendto6, tx6
            else:
                endpoint = table.routes.get(destination & table.mask)
            if endpoint is None:
                tx.drop("no_route")
                continue
            packet_id = (packet_id + 1) & 0xFFFFFFFF
            if size > single_max:
                send_chunks(buf, view, size, endpoint, packet_id, counters is tx6)
                continue
            # The fast path: one datagram, its header written in place.
            stamp(buf, 0, prefix, packet_id)
            try:
                send(view[: HEADER_SIZE + size], endpoint)
            except OSError:
                counters.drop("send_error")
                continue
            counters.singles += 1
            counters.single_bytes += size - VNET_HEADER

    def _send_chunks(self, buf: bytearray, view: memoryview, size: int, endpoint: Endpoint,
                     packet_id: int, six: bool = False) -> None:
        """Send one stream of more than one datagram: `size` bytes of `buf` laid out as
        `Chunker.slots` places it, routed to `endpoint` (`six`: on the IPv6 underlay
        socket)."""
        counters = self.tx6 if six else self.tx
        chunker = self._chunker
        sock = self._sock6 if six else self._sock
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
                if not self._send_failed(exc, piece, datagram, endpoint, sock, counters):
                    return
            counters.batches += 1
            counters.datagrams += datagrams
        counters.packets += 1
        counters.bytes += size - VNET_HEADER

    def _send_failed(
        self, exc: OSError, piece: memoryview, segment_size: int, endpoint: tuple[str, int],
        sock: socket.socket, counters: Counters,
    ) -> bool:
        """Handle a failed sendmsg of `piece` (datagrams back to back, every
        `segment_size` bytes) on `sock`; True if they went out after all."""
        if exc.errno == errno.EIO and self.in_force.udp_gso:
            # The route's device cannot checksum-offload UDP GSO: switch GSO off for good
            # and resend these datagrams one by one.
            self.in_force.udp_gso = False
            self.in_force.notes.append(f"UDP GSO send failed ({exc.strerror}); GSO off")
            log.warning("udp offload fallback", extra={"detail": self.in_force.notes[-1]})
            self._chunker = self._make_chunker()
            return self._send_each(piece, segment_size, endpoint, sock, counters)
        counters.drop("send_error")
        return False

    @staticmethod
    def _send_each(piece: memoryview, segment_size: int, endpoint: tuple[str, int],
                   sock: socket.socket, counters: Counters) -> bool:
        try:
            for start in range(0, len(piece), segment_size):
                sock.sendto(piece[start : start + segment_size], endpoint)
        except OSError:
            counters.drop("send_error")
            return False
        return True

    def _udp_to_tun(self, slot: int, bind: Bind, counters: Counters) -> None:
        """Receive on `bind` (the underlay socket, or dual stack's IPv6 one: a thread
        each), counting in `counters` (that socket's own)."""
        sock = bind.sock
        # As on the send side, a 1-byte packet's whole path is this loop: locals, three C
        # calls (recvmsg_into, decode_single's two unpacks, write) and one dict lookup.
        recvmsg_into, receive, refuse = sock.recvmsg_into, self._receive, self._refuse
        write, tun, decode = os.write, self._tun, decode_single
        pending = self._pending
        ipv4 = bind.ip.version == 4
        buf = bytearray(RECV_SIZE)
        bufs = [buf]
        view = memoryview(buf)
        holding = self._holding
        while True:
            holding[slot] = False
            if self._released:
                return
            try:
                size, ancillary, flags, addr = recvmsg_into(bufs, _CMSG_SPACE)
                holding[slot] = True
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
                    refuse(sender, table, size, exc.reason, counters)
                    continue
                if single is not None:
                    version, source = single
                    if version != table.version and table.six is not None \
                            and version == table.six.version:
                        table = table.six  # dual stack's IPv6 half: the same members
                    # Only the member holding the source's subnet may send it (no
                    # spoofing via us); one lookup, as the holder is a member too.
                    if table.routes.get(source & table.mask) != sender or (
                        version != table.version
                    ):
                        refuse(sender, table, size,
                               "malformed" if version != table.version else "spoofed_source",
                               counters)
                        continue
                    try:
                        write(tun, view[HEADER_SIZE:size])
                    except OSError as exc:
                        refuse(sender, table, size, "tun_write", counters)
                        log.debug("TUN write failed", extra={"error": str(exc)})
                        continue
                    counters.singles += 1
                    counters.single_bytes += size - _IP
                    continue
            if receive(buf, size, ancillary, flags, sender, counters):
                # A stream left incomplete keeps views into this buffer: take a new one.
                buf = bytearray(RECV_SIZE)
                bufs = [buf]
                view = memoryview(buf)

    @staticmethod
    def _refuse(sender: Endpoint, table: PeerTable, size: int, reason: str,
                counters: Counters) -> None:
        """Count a datagram the fast path refused, as the general path would have: a
        stranger's as `unknown_peer` whatever it holds, an empty one as `malformed`."""
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
                 flags: int, sender: Endpoint, counters: Counters) -> bool:
        """Handle one received buffer the fast path did not take (many datagrams glued by
        UDP GRO, a chunk of a longer stream, a flagged one, or one while a stream of its
        sender is pending) of `size` bytes; True if an incomplete stream now holds views
        into `buf`."""
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
            self._deliver(parts, stream_len, sender, table, os.writev, self._tun, counters)
        if reassembler.pending:
            self._pending.add(sender)
            return True
        self._pending.discard(sender)
        return False

    @staticmethod
    def _deliver(parts: list[memoryview], size: int, sender: Endpoint, table: PeerTable,
                 writev: Any, tun: int, counters: Counters) -> None:
        try:
            version, source = decode_stream(parts[0], size)
        except RemoteProtocolError as exc:
            counters.drop(exc.reason)
            return
        if version != table.version:
            other = table.for_version(version)
            if other is None:
                counters.drop("malformed")
                return
            table = other
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
