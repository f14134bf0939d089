"""WireGuard keys: X25519 key pairs (the `cryptography` library; no home-made crypto) and
the host's private key file.

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
import contextlib
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from weft.errors import ConfigError, PermissionProblem

KEY_LEN = 32
KEY_FILE_NAME = "wireguard.key"
KEY_FILE_MODE = 0o600


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


def key_file_path(state_dir: Path) -> Path:
    return state_dir / KEY_FILE_NAME


def load_or_create_private_key(path: Path) -> PrivateKey:
    """The key stored at `path`; generated and stored (mode 0600) if there is none."""
    key = _read_key_file(path)
    if key is not None:
        return key
    candidate = PrivateKey.generate()
    if _publish_key_file(path, candidate):
        return candidate
    # Another process created it between our read and our link: use theirs.
    key = _read_key_file(path)
    if key is None:
        raise ConfigError(f"WireGuard key file {path} vanished while it was being created")
    return key


def _read_key_file(path: Path) -> PrivateKey | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except PermissionError:
        raise PermissionProblem(f"cannot read WireGuard key file {path}; run as root") from None
    except OSError as exc:
        raise ConfigError(
            f"cannot open WireGuard key file {path}: {exc.strerror}; it must be a regular "
            "file (not a symlink)"
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"WireGuard key file {path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            # Refuse rather than fix: a key others could read may already be copied.
            raise ConfigError(
                f"WireGuard key file {path} has mode {mode:04o}; it must be readable by its "
                f"owner only: chmod 600 {path} (or delete it to generate a new key)"
            )
        text = os.read(fd, 4096).decode("ascii", errors="replace")
    finally:
        os.close(fd)
    try:
        return PrivateKey.from_base64(text)
    except KeyFormatError as exc:
        raise ConfigError(
            f"WireGuard key file {path} does not hold a key ({exc}); it must contain one "
            f"base64 key as `wg genkey` prints; delete it to generate a new key"
        ) from None


def _publish_key_file(path: Path, key: PrivateKey) -> bool:
    """Write `key` to `path` atomically with mode 0600; False if `path` appeared meanwhile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A random name: concurrent starters (processes or threads) never share a temp file.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 KEY_FILE_MODE)
    try:
        try:
            os.fchmod(fd, KEY_FILE_MODE)  # exact mode whatever the umask
            os.write(fd, (key.to_base64() + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # atomic, and never replaces an existing key
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
