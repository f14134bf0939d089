"""The udp wire codec: one table of cases both ways, round trips, every split, every cut."""

from __future__ import annotations

import contextlib
import ipaddress
import struct
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weft.backends.registry import overhead
from weft.backends.udp.codec import (
    HEADER_SIZE,
    MAX_STREAM,
    SINGLE_HEADER,
    SINGLE_PREFIX,
    Chunker,
    ChunkHeader,
    InnerPacket,
    Reassembler,
    VnetHeader,
    decode_header,
    decode_inner,
    decode_single,
    decode_stream,
    decode_vnet_header,
    encode_header,
    encode_vnet_header,
    split_segments,
    stream_bytes,
    write_headers,
)
from weft.backends.udp.plan import Peer, PeerDataError, PeerTable, peer_port
from weft.core.constants import VNET_HEADER
from weft.core.errors import LocalProtocolError, RemoteProtocolError

# --- one table, both ways -----------------------------------------------------------------

HEADER_CASES = [
    (ChunkHeader(packet_id=0, index=0, count=1), bytes.fromhex("11 00 01 00 00000000")),
    (ChunkHeader(packet_id=1, index=2, count=3), bytes.fromhex("11 02 03 00 00000001")),
    (ChunkHeader(packet_id=0xFFFFFFFF, index=254, count=255),
     bytes.fromhex("11 fe ff 00 ffffffff")),
    (ChunkHeader(packet_id=0x01020304, index=44, count=45), bytes.fromhex("11 2c 2d 00 01020304")),
]


@pytest.mark.parametrize(("header", "wire"), HEADER_CASES)
def test_header_encodes_to_table(header: ChunkHeader, wire: bytes) -> None:
    assert encode_header(header) == wire


@pytest.mark.parametrize(("header", "wire"), HEADER_CASES)
def test_header_decodes_from_table(header: ChunkHeader, wire: bytes) -> None:
    assert decode_header(wire + b"x") == header


VNET_CASES = [
    (VnetHeader(), bytes(10)),
    (VnetHeader(flags=1, gso_type=1, hdr_len=66, gso_size=1402, csum_start=34, csum_offset=16),
     bytes.fromhex("01 01 4200 7a05 2200 1000")),
    (VnetHeader(flags=1, gso_type=4, hdr_len=86, gso_size=1382, csum_start=54, csum_offset=16),
     bytes.fromhex("01 04 5600 6605 3600 1000")),
    (VnetHeader(flags=2), bytes.fromhex("02 00 0000 0000 0000 0000")),
]


@pytest.mark.parametrize(("header", "wire"), VNET_CASES)
def test_vnet_header_encodes_to_table(header: VnetHeader, wire: bytes) -> None:
    assert encode_vnet_header(header) == wire


@pytest.mark.parametrize(("header", "wire"), VNET_CASES)
def test_vnet_header_decodes_from_table(header: VnetHeader, wire: bytes) -> None:
    assert decode_vnet_header(wire + bytes(2000)) == header


BAD_HEADERS = [
    (bytes.fromhex("21 00 01 00 00000000 ff"), "bad_version"),
    (bytes.fromhex("12 00 01 00 00000000 ff"), "bad_type"),
    (bytes.fromhex("11 00 01 07 00000000 ff"), "malformed"),
    (bytes.fromhex("11 00 00 00 00000000 ff"), "malformed"),
    (bytes.fromhex("11 03 03 00 00000000 ff"), "malformed"),
    (bytes.fromhex("11 00 01 00 00000000"), "truncated"),
    (b"", "truncated"),
]


@pytest.mark.parametrize(("wire", "reason"), BAD_HEADERS)
def test_bad_headers_are_remote_errors_with_reason(wire: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_header(wire)
    assert info.value.reason == reason


BAD_VNET = [
    bytes.fromhex("04 00 0000 0000 0000 0000"),  # unknown flag
    bytes.fromhex("00 03 0000 0000 0000 0000"),  # UFO
    bytes.fromhex("00 01 0000 0000 0000 0000"),  # TSO without gso_size
    bytes.fromhex("01 00 0000 0000 f000 1000"),  # checksum past the end
    bytes.fromhex("00 00 ffff 0000 0000 0000"),  # hdr_len past the end
]


@pytest.mark.parametrize("wire", BAD_VNET)
def test_bad_vnet_headers_are_refused(wire: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_vnet_header(wire + bytes(100))
    assert info.value.reason == "bad_vnet_header"


@pytest.mark.parametrize(
    "header",
    [ChunkHeader(-1, 0, 1), ChunkHeader(1 << 32, 0, 1), ChunkHeader(0, 1, 1),
     ChunkHeader(0, 0, 0), ChunkHeader(0, 0, 256)],
)
def test_encoding_nonsense_is_local_misuse(header: ChunkHeader) -> None:
    with pytest.raises(LocalProtocolError):
        encode_header(header)


def test_chunker_misuse_is_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        Chunker(HEADER_SIZE, 64, 65507)
    with pytest.raises(LocalProtocolError):
        Chunker(1472, 0, 65507)
    with pytest.raises(LocalProtocolError):
        Reassembler().feed(b"x", 0)


# --- inner IP packets -----------------------------------------------------------------------


def ipv4_packet(src: str, dst: str, payload: bytes) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 6, 0,
        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed,
    )
    return header + payload


def ipv6_packet(src: str, dst: str, payload: bytes) -> bytes:
    header = struct.pack("!IHBB16s16s", 6 << 28, len(payload), 6, 64,
                         ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed)
    return header + payload


def stream_of(packet: bytes) -> bytes:
    return bytes(VNET_HEADER) + packet


def test_inner_ipv4_addresses() -> None:
    s = stream_of(ipv4_packet("198.19.1.5", "198.19.2.9", b"hello"))
    assert decode_inner(s, len(s)) == InnerPacket(
        4, int(ipaddress.IPv4Address("198.19.1.5")), int(ipaddress.IPv4Address("198.19.2.9"))
    )


def test_inner_ipv6_addresses() -> None:
    s = stream_of(ipv6_packet("fd00::1", "fd00:0:0:1::2", b"x" * 30))
    inner = decode_inner(s, len(s))
    assert inner.version == 6
    assert inner.source == int(ipaddress.IPv6Address("fd00::1"))
    assert inner.destination == int(ipaddress.IPv6Address("fd00:0:0:1::2"))


def test_inner_length_must_match_stream() -> None:
    s = stream_of(ipv4_packet("198.19.1.5", "198.19.2.9", b"hello"))
    with pytest.raises(RemoteProtocolError):
        decode_inner(s, len(s) - 1)
    with pytest.raises(RemoteProtocolError):
        decode_inner(s[:-1], len(s) - 1)


# --- round trips ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """Datagrams for one sendmsg: `buffers` concatenated, cut every `segment_size` bytes."""

    buffers: list[bytes | memoryview]
    segment_size: int
    datagrams: int


def encode_all(chunker: Chunker, stream: bytes, packet_id: int) -> list[Batch]:
    """The oracle for what a stream becomes on the wire, written the plain way (a header
    object and a slice per chunk); the forwarder's scattered layout must send the same."""
    size = len(stream)
    assert 0 < size <= MAX_STREAM
    view = memoryview(stream)
    step = chunker.chunk_size
    count = -(-size // step)
    if count == 1:
        return [Batch([encode_header(ChunkHeader(packet_id & 0xFFFFFFFF, 0, 1)), view],
                      size + HEADER_SIZE, 1)]
    batches: list[Batch] = []
    for first in range(0, count, chunker.per_batch):
        last = min(first + chunker.per_batch, count)
        buffers: list[bytes | memoryview] = []
        for index in range(first, last):
            buffers.append(encode_header(ChunkHeader(packet_id & 0xFFFFFFFF, index, count)))
            buffers.append(view[index * step : index * step + step])
        batches.append(Batch(buffers, chunker.datagram_size, last - first))
    return batches


def datagrams_of(batches: list[Batch]) -> list[bytes]:
    out: list[bytes] = []
    for batch in batches:
        joined = stream_bytes(batch.buffers)
        pieces = [bytes(p) for p in split_segments(joined, batch.segment_size)]
        assert len(pieces) == batch.datagrams
        out.extend(pieces)
    return out


streams = st.binary(min_size=1, max_size=5000)
datagram_sizes = st.integers(min_value=300, max_value=1500)


@settings(max_examples=200, deadline=None)
@given(stream=streams, size=datagram_sizes, pid=st.integers(0, 0xFFFFFFFF),
       per_batch=st.integers(1, 64))
def test_round_trip_through_gso_and_gro(stream: bytes, size: int, pid: int,
                                         per_batch: int) -> None:
    chunker = Chunker(size, per_batch, 65507)
    batches = encode_all(chunker, stream, pid)
    reassembler = Reassembler()
    delivered: list[bytes] = []
    for batch in batches:
        assert batch.segment_size <= size
        joined = stream_bytes(batch.buffers)
        # a GSO send of a whole batch arrives as one GRO buffer of the same segment size
        result = reassembler.feed(joined, batch.segment_size)
        assert result.drops == {}
        delivered.extend(stream_bytes(s) for s in result.streams)
    assert delivered == [stream]
    assert not reassembler.pending


@settings(max_examples=100, deadline=None)
@given(stream=streams, size=datagram_sizes, data=st.data())
def test_every_split_of_the_datagrams_reassembles(stream: bytes, size: int,
                                                   data: st.DataObject) -> None:
    """However GRO groups consecutive datagrams (one by one, all, any runs), the receiver
    gets the stream back exactly once."""
    datagrams = datagrams_of(encode_all(Chunker(size, 64, 65507), stream, 7))
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(datagrams) - 1)))))
    groups = [datagrams[a:b] for a, b in zip([0, *cuts], [*cuts, len(datagrams)], strict=True)]
    reassembler = Reassembler()
    delivered: list[bytes] = []
    for group in groups:
        if not group:
            continue
        # GRO only glues datagrams of one size (the last may be shorter)
        seg = len(group[0])
        if any(len(d) != seg for d in group[:-1]) or len(group[-1]) > seg:
            for d in group:
                delivered.extend(stream_bytes(s) for s in reassembler.feed(d, len(d)).streams)
            continue
        result = reassembler.feed(b"".join(group), seg)
        assert result.drops == {}
        delivered.extend(stream_bytes(s) for s in result.streams)
    assert delivered == [stream]


def test_every_split_exhaustively_for_a_small_stream() -> None:
    stream = bytes(range(256)) * 5
    datagrams = datagrams_of(encode_all(Chunker(300, 64, 65507), stream, 3))
    n = len(datagrams)
    assert n == 5
    for mask in range(1 << (n - 1)):  # every way to cut n datagrams into runs
        cuts = [i + 1 for i in range(n - 1) if mask >> i & 1]
        reassembler = Reassembler()
        out = []
        for a, b in zip([0, *cuts], [*cuts, n], strict=True):
            out.extend(reassembler.feed(b"".join(datagrams[a:b]), 300).streams)
        assert [stream_bytes(s) for s in out] == [stream]


def test_a_64k_super_packet_fits_two_sends() -> None:
    chunker = Chunker(1472, 64, 65507)
    stream = stream_of(ipv4_packet("198.19.1.5", "198.19.2.9", bytes(65535 - 20)))
    batches = encode_all(chunker, stream, 1)
    assert len(batches) == 2
    for batch in batches:
        assert sum(len(b) for b in batch.buffers) <= 65507
        assert batch.datagrams <= 64
    datagrams = datagrams_of(batches)
    assert all(len(d) <= 1472 for d in datagrams)
    assert sum(len(d) - HEADER_SIZE for d in datagrams) == len(stream)


# --- loss, reordering, interleaving, garbage ------------------------------------------------


def test_new_packet_drops_the_incomplete_one() -> None:
    chunker = Chunker(300, 64, 65507)
    first = datagrams_of(encode_all(chunker, bytes(1000), 1))
    second = datagrams_of(encode_all(chunker, b"\x01" * 1000, 2))
    r = Reassembler()
    assert r.feed(first[0], len(first[0])).streams == []
    result = r.feed(b"".join(second), len(second[0]))
    assert result.drops == {"reassembly": 1}
    assert [stream_bytes(s) for s in result.streams] == [b"\x01" * 1000]


def test_lost_chunk_costs_only_its_packet() -> None:
    chunker = Chunker(300, 64, 65507)
    first = datagrams_of(encode_all(chunker, bytes(1000), 1))
    second = datagrams_of(encode_all(chunker, b"\x02" * 1000, 2))
    r = Reassembler()
    out: list[bytes] = []
    for d in [first[0], first[2], first[3], *second]:  # first[1] lost
        result = r.feed(d, len(d))
        out.extend(stream_bytes(s) for s in result.streams)
    assert out == [b"\x02" * 1000]


def test_a_bad_datagram_in_a_gro_buffer_spares_the_good_ones() -> None:
    chunker = Chunker(300, 64, 65507)
    datagrams = datagrams_of(encode_all(chunker, bytes(range(200)) * 5, 9))
    # a one-chunk packet whose datagram happens to be 300 bytes long, so GRO glued it
    one = datagrams_of(encode_all(chunker, b"t" * 292, 10))[0]
    garbage = b"\xff" * 300
    result = Reassembler().feed(b"".join([one, garbage, *datagrams]), 300)
    assert result.drops == {"bad_version": 1}
    assert [stream_bytes(s) for s in result.streams] == [b"t" * 292, bytes(range(200)) * 5]


def check_stream(parts: list[memoryview]) -> None:
    """The receiver's checks on a reassembled stream before it is written to TUN."""
    size = sum(len(p) for p in parts)
    decode_vnet_header(parts[0], size)
    decode_inner(parts[0], size)


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=3000), seg=st.integers(1, 1500))
def test_garbage_never_raises(garbage: bytes, seg: int) -> None:
    r = Reassembler()
    result = r.feed(garbage, seg)
    for parts in result.streams:  # whatever got through still faces the stream checks
        with contextlib.suppress(RemoteProtocolError):  # anything else fails the test
            check_stream(parts)
    for fn in (decode_header, decode_vnet_header):
        with contextlib.suppress(RemoteProtocolError):
            fn(garbage)


def test_every_truncation_is_dropped_or_caught() -> None:
    """Cut a GRO buffer of a real packet at every length: feeding it never raises, and
    nothing that comes out passes the stream checks unless it is the whole packet."""
    stream = stream_of(ipv4_packet("198.19.1.5", "198.19.2.9", bytes(range(256)) * 6))
    chunker = Chunker(400, 64, 65507)
    (batch,) = encode_all(chunker, stream, 5)
    wire = stream_bytes(batch.buffers)
    for cut in range(len(wire) + 1):
        for piece in (wire[:cut], wire[cut:]):
            result = Reassembler().feed(piece, batch.segment_size)
            for parts in result.streams:
                s = stream_bytes(parts)
                if s == stream:
                    continue
                with pytest.raises(RemoteProtocolError):
                    check_stream(parts)
        with contextlib.suppress(RemoteProtocolError):
            decode_header(wire[:cut])


def test_oversized_reassembly_is_refused() -> None:
    r = Reassembler()
    chunk = 60000
    total = 0
    drops: dict[str, int] = {}
    for index in range(3):
        d = encode_header(ChunkHeader(1, index, 3)) + bytes(chunk)
        result = r.feed(d, len(d))
        total += len(result.streams)
        for k, v in result.drops.items():
            drops[k] = drops.get(k, 0) + v
    assert total == 0
    assert drops.get("oversize") == 1


# --- the peer table -------------------------------------------------------------------------


def test_peer_table_routes_by_subnet() -> None:
    table = PeerTable.build(4, 24, [
        Peer(ipaddress.ip_network("198.19.1.0/24"), ipaddress.ip_address("198.18.0.11"), 8285),
        Peer(ipaddress.ip_network("198.19.2.0/24"), ipaddress.ip_address("198.18.0.12"), 9000),
    ])
    assert table.route(int(ipaddress.IPv4Address("198.19.2.77"))) == ("198.18.0.12", 9000)
    assert table.route(int(ipaddress.IPv4Address("198.19.3.1"))) is None
    # A member is its (IP, port): another process on that host is not the member.
    assert table.members == frozenset({("198.18.0.11", 8285), ("198.18.0.12", 9000)})
    assert table.owns(("198.18.0.11", 8285), int(ipaddress.IPv4Address("198.19.1.9")))
    assert not table.owns(("198.18.0.11", 40000), int(ipaddress.IPv4Address("198.19.1.9")))
    assert not table.owns(("198.18.0.11", 8285), int(ipaddress.IPv4Address("198.19.2.9")))
    assert table.describe() == {"198.19.1.0/24": "198.18.0.11:8285",
                                "198.19.2.0/24": "198.18.0.12:9000"}


def test_peer_table_ipv6() -> None:
    table = PeerTable.build(6, 64, [
        Peer(ipaddress.ip_network("fd00:0:0:5::/64"), ipaddress.ip_address("fd18::2"), 8285),
    ])
    assert table.route(int(ipaddress.IPv6Address("fd00:0:0:5::99"))) == ("fd18::2", 8285)
    assert table.route(int(ipaddress.IPv6Address("fd00:0:0:6::99"))) is None


def test_peer_table_refuses_foreign_subnets() -> None:
    with pytest.raises(PeerDataError):
        PeerTable.build(4, 24, [Peer(ipaddress.ip_network("198.19.0.0/16"),
                                     ipaddress.ip_address("198.18.0.11"), 1)])


@pytest.mark.parametrize("port", ["8285", 0, 70000, True, None, 1.5])
def test_peer_port_must_be_a_port(port: object) -> None:
    with pytest.raises(PeerDataError):
        peer_port({"Port": port}, 8285)


def test_peer_port_default() -> None:
    assert peer_port({}, 8285) == 8285


# --- one place for the overhead, and the sans-IO boundary ----------------------------------


def test_overlay_mtu_packets_fit_one_datagram() -> None:
    underlay = 1500
    mtu = underlay - overhead("udp")
    chunker = Chunker(underlay - 28, 64, 65507)
    assert chunker.chunk_count(VNET_HEADER + mtu) == 1
    assert chunker.chunk_count(VNET_HEADER + mtu + 1) == 2


# --- the one-datagram fast path agrees with the general path -------------------------------


def _general(datagram: bytes) -> tuple[object, ...]:
    """What the general receive path makes of one datagram: ("ok", version, source),
    ("drop", reason) or ("held",) (a chunk the reassembler keeps or drops later)."""
    result = Reassembler().feed(datagram, len(datagram)) if datagram else None
    if result is None:
        return ("drop", "truncated")
    if result.drops:
        return ("drop", *result.drops)
    if not result.streams:
        return ("held",)
    parts = result.streams[0]
    size = sum(len(p) for p in parts)
    assert result.sizes == [size]
    try:
        decode_vnet_header(parts[0], size)
        inner = decode_inner(parts[0], size)
    except RemoteProtocolError as exc:
        outcome: tuple[object, ...] = ("drop", exc.reason)
    else:
        outcome = ("ok", inner.version, inner.source)
    try:  # the forwarder's one call per stream decides alike
        one_call: tuple[object, ...] = ("ok", *decode_stream(parts[0], size))
    except RemoteProtocolError as exc:
        one_call = ("drop", exc.reason)
    assert one_call == outcome
    return outcome


def _fast(datagram: bytes) -> tuple[object, ...]:
    buf = bytearray(datagram) + bytes(64)  # a reused receive buffer has stale bytes after
    try:
        single = decode_single(buf, len(datagram))
    except RemoteProtocolError as exc:
        return ("drop", exc.reason)
    return ("held",) if single is None else ("ok", *single)


def _single(stream: bytes, packet_id: int = 7) -> bytes:
    buf = bytearray(HEADER_SIZE) + stream
    SINGLE_HEADER.pack_into(buf, 0, SINGLE_PREFIX, packet_id)  # as the forwarder writes it
    return bytes(buf)


V4 = stream_of(ipv4_packet("198.19.1.5", "198.19.2.9", b"hello"))
V6 = stream_of(ipv6_packet("2001:db8::1", "2001:db8:0:1::2", b"x" * 30))
CSUM = bytes.fromhex("01 00 0000 0000 1400 1000")  # NEEDS_CSUM at 20+16 (TCP)


@pytest.mark.parametrize("datagram", [
    _single(V4), _single(V6), _single(CSUM + V4[VNET_HEADER:] + bytes(30)),
    _single(V4)[:-1], _single(V4)[:HEADER_SIZE], _single(V4)[:HEADER_SIZE + 12], b"\x11",
    encode_header(ChunkHeader(1, 0, 2)) + V4, encode_header(ChunkHeader(1, 1, 2)) + V4,
    bytes.fromhex("11 01 01 00 00000001") + V4, bytes.fromhex("21 00 01 00 00000001") + V4,
    bytes.fromhex("12 00 01 00 00000001") + V4, bytes.fromhex("11 00 01 07 00000001") + V4,
    bytes.fromhex("11 00 00 00 00000001") + V4,
    _single(bytes.fromhex("04 00 0000 0000 0000 0000") + V4[VNET_HEADER:]),
    _single(bytes.fromhex("00 03 0000 0000 0000 0000") + V4[VNET_HEADER:]),
    _single(bytes.fromhex("01 00 0000 0000 1400 ff00") + V4[VNET_HEADER:]),
    _single(bytes(VNET_HEADER) + b"\x55" + V4[VNET_HEADER + 1 :]),
])
def test_fast_path_decides_as_the_general_path(datagram: bytes) -> None:
    _agree(datagram)


def _agree(datagram: bytes) -> None:
    fast, general = _fast(datagram), _general(datagram)
    if fast == ("held",):  # a chunk of a longer stream: the reassembler's business
        assert general[0] != "ok"
    else:
        assert fast == general


@settings(max_examples=400, deadline=None)
@given(base=st.sampled_from([_single(V4), _single(V6)]),
       flips=st.lists(st.tuples(st.integers(0, 80), st.integers(0, 255)), max_size=3),
       cut=st.integers(0, 100))
def test_fast_path_agrees_on_mutated_datagrams(base: bytes, flips: list[tuple[int, int]],
                                                 cut: int) -> None:
    data = bytearray(base)
    for at, value in flips:
        if at < len(data):
            data[at] = value
    _agree(bytes(data[: len(data) - cut % 8 if cut >= 50 else len(data)]))


# --- the forwarder's send layout: scattered by readv, headers written in place -------------


def laid_out_batches(chunker: Chunker, stream: bytes, packet_id: int) -> list[bytes]:
    """What the forwarder sends for `stream`: readv into `slots`, `write_headers`, then one
    buffer per `spans` entry."""
    buf = bytearray(chunker.chunk_count(MAX_STREAM + 1) * chunker.datagram_size)
    offset = 0
    for slot in chunker.slots(memoryview(buf)):  # what readv does with the list
        take = min(len(slot), len(stream) - offset)
        slot[:take] = stream[offset : offset + take]
        offset += take
    total = chunker.laid_out(len(stream))
    count = write_headers(buf, total, chunker.datagram_size, packet_id)
    assert count == chunker.chunk_count(len(stream))
    return [bytes(buf[start:end]) for start, end, _ in chunker.spans(total)]


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, MAX_STREAM), datagram=datagram_sizes,
       pid=st.integers(0, 0xFFFFFFFF), per_batch=st.integers(1, 64))
def test_the_scattered_layout_sends_exactly_what_the_chunker_encodes(
    size: int, datagram: int, pid: int, per_batch: int
) -> None:
    if -(-MAX_STREAM // (datagram - HEADER_SIZE)) > 255:
        datagram = 1472  # too many chunks for one stream: the Chunker refuses that size
    chunker = Chunker(datagram, per_batch, 65507)
    stream = bytes((i * 7 + size) & 0xFF for i in range(size))
    expected = encode_all(chunker, stream, pid)
    sent = laid_out_batches(chunker, stream, pid)
    assert sent == [stream_bytes(b.buffers) for b in expected]
    spans = chunker.spans(chunker.laid_out(size))
    assert [d for _, _, d in spans] == [b.datagrams for b in expected]


def test_write_headers_refuses_a_layout_that_is_not_one_stream() -> None:
    with pytest.raises(LocalProtocolError):
        write_headers(bytearray(3000), 1472 + HEADER_SIZE, 1472, 1)  # last chunk empty
    with pytest.raises(LocalProtocolError):
        write_headers(bytearray(10), 0, 1472, 1)
    with pytest.raises(LocalProtocolError):
        Chunker(1472, 64, 65507).slots(memoryview(bytearray(1000)))
