"""WireGuard keys: X25519 key pairs (the `cryptography` library; no home-made crypto).
Pure: the host's key file is `weft.backends.wireguard.keyfile`.

The private key file holds the key in base64 with a newline, as `wg genkey` writes it. It
is created once with mode 0600 from the first byte (a temporary file opened O_EXCL, then
hard-linked into place, so a crash never leaves a half-written key and a concurrent start
never overwrites one) and reused on every later start: peers know this host by its public
key, so regenerating it on each start would force every peer to reconfigure.

A `PrivateKey` never shows its bytes in repr/str, so a stray log line cannot leak it.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

KEY_LEN = 32


class KeyFormatError(ValueError):
    """Text that should hold a WireGuard key does not (bad base64 or not 32 bytes)."""


@dataclass(frozen=True)
class PublicKey:
    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_LEN:
            raise KeyFormatError(f"a WireGuard key is {KEY_LEN} bytes, got {len(self.raw)}")

    @classmethod
    def from_base64(cls, text: str) -> PublicKey:
        return cls(decode_key(text))

    def to_base64(self) -> str:
        return base64.b64encode(self.raw).decode("ascii")

    def hex(self) -> str:
        return self.raw.hex()

    def __str__(self) -> str:
        return self.to_base64()


@dataclass(frozen=True)
class PrivateKey:
    raw: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_LEN:
            raise KeyFormatError(f"a WireGuard key is {KEY_LEN} bytes, got {len(self.raw)}")

    @classmethod
    def generate(cls) -> PrivateKey:
        return cls(clamp(X25519PrivateKey.generate().private_bytes_raw()))

    @classmethod
    def from_base64(cls, text: str) -> PrivateKey:
        return cls(decode_key(text))

    def to_base64(self) -> str:
        return base64.b64encode(self.raw).decode("ascii")

    def hex(self) -> str:
        return self.raw.hex()

    def public_key(self) -> PublicKey:
        # X25519 clamps the scalar itself, so clamped and unclamped forms of one key
        # derive the same public key (as WireGuard computes it).
        priv = X25519PrivateKey.from_private_bytes(self.raw)
        return PublicKey(priv.public_key().public_bytes_raw())

    def __str__(self) -> str:
        return "PrivateKey(<secret>)"


def clamp(raw: bytes) -> bytes:
    """Curve25519 scalar clamping, as `wg genkey` applies it to the keys it prints."""
    b = bytearray(raw)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


def decode_key(text: str) -> bytes:
    """A base64 WireGuard key (44 characters) as 32 bytes, or KeyFormatError."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyFormatError("not valid base64") from None
    if len(raw) != KEY_LEN:
        raise KeyFormatError(f"decodes to {len(raw)} bytes, a WireGuard key is {KEY_LEN}")
    return raw
