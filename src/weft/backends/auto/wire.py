"""The probe's wire format: one UDP datagram, padded to the size being proved. Pure.

    magic "WFTP" | kind (1 request, 2 answer) | plane (index in PLANES) | seq (u32) | zeros

The request names the plane it was sent on, so the answer goes back on that same plane;
the answer is as large as the request, so both directions carry the full size.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from weft.backends.auto.options import PLANES

MAGIC: Final = b"WFTP"
REQUEST: Final = 1
ANSWER: Final = 2
_HEADER: Final = struct.Struct("!4sBBI")
HEADER_SIZE: Final = _HEADER.size


class ProbeFormatError(ValueError):
    """A datagram on the probe port that is not a probe (a remote error: dropped, counted)."""


@dataclass(frozen=True)
class Probe:
    kind: int
    plane: str
    seq: int


def encode(probe: Probe, size: int) -> bytes:
    """The datagram of `size` payload bytes (at least the header)."""
    if size < HEADER_SIZE:
        raise ValueError(f"probe payload {size} is smaller than its {HEADER_SIZE}-byte header")
    head = _HEADER.pack(MAGIC, probe.kind, PLANES.index(probe.plane), probe.seq & 0xFFFFFFFF)
    return head + bytes(size - HEADER_SIZE)


def decode(data: bytes) -> Probe:
    if len(data) < HEADER_SIZE:
        raise ProbeFormatError(f"{len(data)} bytes is shorter than a probe header")
    magic, kind, plane, seq = _HEADER.unpack_from(data)
    if magic != MAGIC or kind not in (REQUEST, ANSWER) or plane >= len(PLANES):
        raise ProbeFormatError("not a weft probe")
    return Probe(kind, PLANES[plane], seq)
