"""One agent per state directory: a lock the kernel drops when the process ends."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from weft.core.errors import UsageError
from weft.host.files import open_private

LOCK_FILE = "agent.lock"


class StateDirLock:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or say who holds it. flock, not a pid file: a crashed agent
        leaves nothing to clean up and a reused pid can't lock anyone out."""
        # Not a symlink, root's, 0600 (weft.host.files): the state dir's files are root's.
        fd = open_private(self.path, os.O_RDWR | os.O_CREAT, "agent lock file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UsageError(
                f"another weft agent (pid {holder}) is running with state dir "
                f"{self.path.parent}; stop it first, or give this one another --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def reassert(self) -> bool:
        """The state dir (or just the lock file) was removed under a running agent: the
        lock now sits on a file nobody can see, and a second agent would start. Lock a
        new file in its place. True if it had to (and could); raises UsageError if
        another agent took the new file first."""
        if self._fd is None:
            return False
        try:
            if os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(self._fd).st_ino:
                return False
        except FileNotFoundError:
            pass
        old, self._fd = self._fd, None
        try:
            self.acquire()
        except BaseException:
            self._fd = old  # still ours: keep holding what we had
            raise
        with contextlib.suppress(OSError):
            os.close(old)
        return True

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
