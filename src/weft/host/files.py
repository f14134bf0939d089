"""Files weft writes as root: private from their creation, never through a symlink weft did
not make, refused (with the fix) when someone else could write them.

Why: a root process that follows a symlink, or opens a file a local user prepared, writes
where that user chooses; a store or key others can read leaks the network's secrets.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from weft.core.errors import PermissionProblem

log = logging.getLogger("weft.host.files")

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """Files created inside (by us or a library, e.g. SQLite's -wal/-shm) are 0600."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def _owner_ok(info: os.stat_result) -> bool:
    return info.st_uid in (os.geteuid(), 0)


def check_private(path: Path, what: str, info: os.stat_result | None = None) -> None:
    """Refuse a symlink, a file of another user, or one others can write; warn if others
    can read it. A missing file is fine (it will be created private)."""
    if info is None:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return
    if stat.S_ISLNK(info.st_mode):
        raise PermissionProblem(f"{what} {path} is a symlink; weft will not follow it: "
                                f"remove it (rm {path})")
    if not _owner_ok(info):
        raise PermissionProblem(f"{what} {path} belongs to uid {info.st_uid}, not to this "
                                f"user: check who made it, then chown root {path}")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022:
        fix = "chmod 700" if stat.S_ISDIR(info.st_mode) else "chmod 600"
        raise PermissionProblem(f"{what} {path} has mode {mode:04o}: others can write it; "
                                f"fix it with `{fix} {path}`")
    if mode & 0o044 and not stat.S_ISDIR(info.st_mode):
        log.warning("file readable by other users", extra={
            "path": str(path), "mode": f"{mode:04o}", "fix": f"chmod 600 {path}"})


def _check_above(path: Path, what: str) -> None:
    """Every directory above `path` that exists must be root's (or this user's) and not
    writable by others unless sticky (/tmp): else another user could swap what weft
    checks for something else after the check. A symlink on the way is followed only if
    root made it (/var/run -> /run); its target is then checked the same way."""
    current = Path(path.anchor or "/")
    for part in path.parts[1:-1]:
        current = current / part
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            return  # from here on weft creates them
        if stat.S_ISLNK(info.st_mode):
            if info.st_uid != 0:
                raise PermissionProblem(
                    f"{what} {path}: {current} is a symlink made by uid {info.st_uid}; weft "
                    "will not follow it: give a path without it")
            target = Path(os.path.realpath(current))
            _check_above(target / "x", what)
            info = os.stat(target)
        if not stat.S_ISDIR(info.st_mode):
            raise PermissionProblem(f"{what} {path}: {current} is not a directory")
        if not _owner_ok(info):
            raise PermissionProblem(
                f"{what} {path}: {current} belongs to uid {info.st_uid}, who could replace "
                "what is in it: use a directory of root's")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o022 and not mode & stat.S_ISVTX:
            raise PermissionProblem(
                f"{what} {path}: {current} has mode {mode:04o}: others could replace what "
                f"is in it; fix it with `chmod go-w {current}` or use another directory")


def private_dir(path: Path, what: str = "directory", mode: int = PRIVATE_DIR) -> Path:
    """Create `path` (`mode`, 0700 unless asked; missing parents 0755) or check the one
    that is there: root's (or this user's), not writable by others, not a symlink, and
    no other user able to swap it or anything above it (`_check_above`). Refused with
    one line naming the path and why; an existing one of ours is narrowed to `mode`."""
    path = Path(os.path.abspath(path))
    _check_above(path, what)
    old = os.umask(0o022)
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.mkdir(path, mode & ~0o022)
    except FileExistsError:
        pass
    finally:
        os.umask(old)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise PermissionProblem(f"{what} {path} is a symlink; weft will not follow it: "
                                "give the directory itself")
    if not stat.S_ISDIR(info.st_mode):
        raise PermissionProblem(f"{what} {path} is not a directory: remove it")
    check_private(path, what, info)
    if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) & ~mode:
        os.chmod(path, mode)  # ours, but made by an older release: close it
    return path


def open_private(path: Path, flags: int, what: str) -> int:
    """os.open that never follows a symlink and creates 0600; the opened file's owner and
    mode are checked on the descriptor (no race with a rename)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # the last component is a symlink
            raise PermissionProblem(f"{what} {path} is a symlink; weft will not follow it: "
                                    f"remove it (rm {path})") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PermissionProblem(f"{what} {path} is not a regular file: remove it")
        check_private(path, what, info)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_private(path: Path, text: str, what: str) -> None:
    """Replace `path` with `text` atomically: a fresh 0600 file renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, what)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)  # rename replaces a symlink itself, never its target
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` by temp file + rename: a reader never sees half a file, and a
    symlink planted at `path` is replaced rather than followed. The directory is created
    (0755) if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
