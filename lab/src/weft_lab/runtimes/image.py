"""The testbed's container image, made locally: there is no registry to pull from.

A root filesystem tarball of Debian's static busybox (a shell, ping, ip, sleep) plus the
binaries a test needs (qperf) with every library `ldd` lists for them. `docker import`
and `podman import` turn it into an image.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterable
from pathlib import Path

from weft.core.errors import UsageError

BUSYBOX = Path("/bin/busybox")
# The busybox applets the tests and the demo use inside a container.
APPLETS = ("sh", "ping", "ip", "sleep", "cat", "ls", "ifconfig", "hostname", "true")
EXTRA_BINARIES = ("qperf",)
_LDD_PATH = re.compile(r"(/\S+)")


def _libraries(binary: Path) -> list[Path]:
    """The shared libraries `ldd` resolves for `binary` (the loader included)."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True,
                         check=False).stdout
    libs = []
    for line in out.splitlines():
        m = _LDD_PATH.search(line.split("=>")[-1])
        if m:
            libs.append(Path(m.group(1)))
    return libs


def _add_file(tar: tarfile.TarFile, src: Path, dst: str, seen: set[str]) -> None:
    if dst in seen:
        return
    seen.add(dst)
    info = tar.gettarinfo(str(src.resolve()), arcname=dst)
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    with src.resolve().open("rb") as f:
        tar.addfile(info, f)


def _add_dir(tar: tarfile.TarFile, name: str, seen: set[str]) -> None:
    parts = name.strip("/").split("/")
    for i in range(1, len(parts) + 1):
        d = "/".join(parts[:i])
        if d in seen:
            continue
        seen.add(d)
        info = tarfile.TarInfo(d)
        info.type = tarfile.DIRTYPE
        info.mode = 0o1777 if d == "tmp" else 0o755
        tar.addfile(info)


def _add_symlink(tar: tarfile.TarFile, name: str, target: str, seen: set[str]) -> None:
    seen.add(name)
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    tar.addfile(info)


def build_rootfs(out: Path, binaries: Iterable[str] = EXTRA_BINARIES) -> Path:
    """Write the rootfs tarball to `out`; raise UsageError naming what is missing."""
    if not BUSYBOX.exists():
        raise UsageError(f"{BUSYBOX} is missing: apt-get install busybox-static")
    seen: set[str] = set()
    with tarfile.open(out, "w") as tar:
        for d in ("bin", "tmp", "etc", "proc", "sys", "dev", "usr/bin", "lib64"):
            _add_dir(tar, d, seen)
        _add_file(tar, BUSYBOX, "bin/busybox", seen)
        for applet in APPLETS:
            _add_symlink(tar, f"bin/{applet}", "busybox", seen)
        for name in binaries:
            found = shutil.which(name)
            if found is None:
                raise UsageError(f"{name} is not installed; the container image needs it")
            path = Path(found)
            _add_dir(tar, "usr/bin", seen)
            _add_file(tar, path, f"usr/bin/{path.name}", seen)
            for lib in _libraries(path):
                _add_dir(tar, str(lib.parent), seen)
                _add_file(tar, lib, str(lib).lstrip("/"), seen)
        passwd = b"root:x:0:0:root:/:/bin/sh\n"
        info = tarfile.TarInfo("etc/passwd")
        info.size = len(passwd)
        tar.addfile(info, io.BytesIO(passwd))
    return out


def run_rootfs(run_dir: Path) -> Path:
    """The run's image tarball, built once per run and shared by every host's runtime;
    written under another name first, so a failed build is never taken for a finished one."""
    out = run_dir / "rootfs.tar"
    if not out.exists():
        partial = build_rootfs(run_dir / "rootfs.tar.part")
        partial.rename(out)
    return out
