"""The host's WireGuard private key file: created once, 0600 from the first byte, reused.

It is created with mode 0600 from the first byte (a temporary file opened O_EXCL, then
hard-linked into place, so a crash never leaves a half-written key and a concurrent start
never overwrites one) and reused on every later start: peers know this host by its public
key, so regenerating it on each start would force every peer to reconfigure.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from weft.backends.wireguard.keys import KeyFormatError, PrivateKey
from weft.core.errors import ConfigError, PermissionProblem
from weft.host.files import private_dir

KEY_FILE_NAME = "wireguard.key"
KEY_FILE_MODE = 0o600


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
        if info.st_uid not in (os.geteuid(), 0):
            raise ConfigError(f"WireGuard key file {path} belongs to uid {info.st_uid}, not "
                              f"to this user: someone else made it; delete it ({path})")
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
    private_dir(path.parent, "state directory")
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
