"""The tc BPF fast path (host/bpf/fastpath.c): compiled for one overlay network, attached
with iproute2's `tc`, which loads the object file itself.

Compiled where it runs, with clang (scripts/setup.sh installs clang and libbpf-dev): the
overlay prefix is a compile-time constant, so the program's only per-packet test is two
masked compares. The object is cached per network in the caller's directory, which must
be root's; it is used only while its hash is the one recorded when weft built it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import secrets
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from weft.core.errors import KernelError, KernelFeatureMissing, UsageError
from weft.host.files import open_private, private_dir, write_private

log = logging.getLogger("weft.host.fastpath")

SOURCE = "fastpath.c"
FROM_CONTAINER = "tc/from_container"
FROM_UNDERLAY = "tc/from_underlay"


def compile_args(network: ipaddress.IPv4Network, source: Path, out: Path) -> list[str]:
    """clang's argv for `network` (pure)."""
    return ["clang", "-O2", "-g", "-target", "bpf", "-Wall", "-Werror",
            # the multiarch directory holds asm/types.h on Debian
            "-I/usr/include/x86_64-linux-gnu", "-I/usr/include/aarch64-linux-gnu",
            f"-DOVERLAY_NET={int(network.network_address):#010x}",
            f"-DOVERLAY_MASK={int(network.netmask):#010x}",
            "-c", str(source), "-o", str(out)]


def compile_fastpath(network: ipaddress.IPv4Network | ipaddress.IPv6Network,
                     out_dir: Path) -> Path:
    """The object file for `network`, compiled unless weft built it before. `out_dir` is
    made root's (or refused: weft.host.files); an object found there is used only if it
    is the one weft built: its SHA-256 matches the one recorded beside it at build time
    (its name is derived from the shipped source, so anyone could compute it)."""
    if not isinstance(network, ipaddress.IPv4Network):
        raise UsageError(f"the fast path handles IPv4 overlays; {network} is IPv6")
    if shutil.which("clang") is None:
        raise KernelFeatureMissing("the fast path needs clang to compile its BPF program: "
                                   "install clang and libbpf-dev (scripts/setup.sh does)")
    private_dir(out_dir, "fast path object directory")
    out = object_path(network, out_dir)
    if out.exists() or out.is_symlink():
        try:
            check_built(out)
            return out
        except BuiltObjectMismatch as exc:
            log.warning("not using a fast path object weft did not build; building it again",
                        extra={"path": str(out), "reason": str(exc)})
            out.unlink()
    with resources.as_file(resources.files("weft.host") / "bpf" / SOURCE) as source:
        tmp = out.with_name(f".{out.name}.{secrets.token_hex(8)}.tmp")
        proc = subprocess.run(compile_args(network, source, tmp), capture_output=True,
                              text=True, check=False, timeout=120)
    try:
        if proc.returncode != 0:
            raise KernelError(f"clang could not compile {SOURCE}: "
                              f"{proc.stderr.strip()[-2000:]}")
        write_private(_record_path(out), _object_digest(tmp) + "\n", "fast path object record")
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def object_path(network: ipaddress.IPv4Network, out_dir: Path) -> Path:
    """Where the object for `network` is kept. The source's hash in the name: an upgraded
    weft never loads a stale object."""
    text = (resources.files("weft.host") / "bpf" / SOURCE).read_bytes()
    digest = hashlib.sha256(text).hexdigest()[:12]
    return out_dir / f"fastpath-{network.network_address}-{network.prefixlen}-{digest}.o"


class BuiltObjectMismatch(KernelError):
    """A fast path object that is not the one weft built (no record, or another hash)."""


def _record_path(obj: Path) -> Path:
    return obj.with_name(obj.name + ".sha256")


def _object_digest(obj: Path) -> str:
    fd = open_private(obj, os.O_RDONLY, "fast path object")
    with os.fdopen(fd, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def check_built(obj: Path) -> None:
    """Raise unless `obj` is root's, private, and the object weft built: its SHA-256 is
    the one recorded at build time. Run before every attach (tc loads the file by path).
    PermissionProblem for a file of another user or others can write; BuiltObjectMismatch
    for one without weft's record or with another content."""
    actual = _object_digest(obj)
    record = _record_path(obj)
    try:
        fd = open_private(record, os.O_RDONLY, "fast path object record")
    except FileNotFoundError:
        raise BuiltObjectMismatch(f"fast path object {obj} has no build record "
                                  f"({record}): weft did not build it") from None
    with os.fdopen(fd) as f:
        recorded = f.read(200).strip()
    if recorded != actual:
        raise BuiltObjectMismatch(f"fast path object {obj} is not the one weft built "
                                  f"(SHA-256 {actual[:16]}…, recorded {recorded[:16]}…)")


def attach_argv(device: str, obj: Path, section: str) -> list[list[str]]:
    """The `tc` commands putting `section` of `obj` on `device`'s ingress (pure)."""
    return [["tc", "qdisc", "replace", "dev", device, "clsact"],
            ["tc", "filter", "replace", "dev", device, "ingress", "pref", "49", "handle",
             "1", "bpf", "direct-action", "obj", str(obj), "sec", section]]
