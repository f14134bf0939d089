"""The probe's wire format: one UDP datagram, padded to the size being proved. Pure.

    magic "WFTP" | kind | plane (index in PLANES) | seq (u32) | zeros, or a body

kind 1 request, 2 answer: auto's per-plane probes. The request names the plane it was sent
on, so the answer goes back on that same plane; the answer is as large as the request, so
both directions carry the full size.
kind 3 request, 4 answer: every backend's peer-health probes (weft.agent.prober), sent on
whatever plane carries the peer's traffic (the plane byte is 0).
kind 5 request, 6 answer: a member asks for this host's health summary; the answer's body
is JSON (`weft doctor --cluster`), read-only.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from weft.backends.auto.options import PLANES

MAGIC: Final = b"WFTP"
REQUEST: Final = 1
ANSWER: Final = 2
HEALTH_REQUEST: Final = 3
HEALTH_ANSWER: Final = 4
SUMMARY_REQUEST: Final = 5
SUMMARY_ANSWER: Final = 6
KINDS: Final = frozenset(range(REQUEST, SUMMARY_ANSWER + 1))
_HEADER: Final = struct.Struct("!4sBBI")
HEADER_SIZE: Final = _HEADER.size


class ProbeFormatError(ValueError):
    """A datagram on the probe port that is not a probe (a remote error: dropped, counted)."""


@dataclass(frozen=True)
class Probe:
    kind: int
    plane: str
    seq: int


def encode(probe: Probe, size: int, body: bytes = b"") -> bytes:
    """The datagram of `size` payload bytes (at least the header and the body)."""
    if size < HEADER_SIZE + len(body):
        raise ValueError(f"probe payload {size} is smaller than its {HEADER_SIZE}-byte header"
                         + (f" and {len(body)}-byte body" if body else ""))
    head = _HEADER.pack(MAGIC, probe.kind, PLANES.index(probe.plane), probe.seq & 0xFFFFFFFF)
    return head + body + bytes(size - HEADER_SIZE - len(body))


def body(data: bytes) -> bytes:
    """A summary answer's body (what follows the header, without the padding)."""
    return data[HEADER_SIZE:].rstrip(b"\0")


def decode(data: bytes) -> Probe:
    if len(data) < HEADER_SIZE:
        raise ProbeFormatError(f"{len(data)} bytes is shorter than a probe header")
    magic, kind, plane, seq = _HEADER.unpack_from(data)
    if magic != MAGIC or kind not in KINDS or plane >= len(PLANES):
        raise ProbeFormatError("not a weft probe")
    return Probe(kind, PLANES[plane], seq)
