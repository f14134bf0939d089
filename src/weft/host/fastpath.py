"""The tc BPF fast path (host/bpf/fastpath.c): compiled for one overlay network, attached
with iproute2's `tc`, which loads the object file itself.

Compiled where it runs, with clang (scripts/setup.sh installs clang and libbpf-dev): the
overlay prefix is a compile-time constant, so the program's only per-packet test is two
masked compares. The object is cached per network in the caller's directory.
"""

from __future__ import annotations

import hashlib
import ipaddress
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from weft.core.errors import KernelError, KernelFeatureMissing, UsageError

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
    """The object file for `network`, compiled unless already there."""
    if not isinstance(network, ipaddress.IPv4Network):
        raise UsageError(f"the fast path handles IPv4 overlays; {network} is IPv6")
    if shutil.which("clang") is None:
        raise KernelFeatureMissing("the fast path needs clang to compile its BPF program: "
                                   "install clang and libbpf-dev (scripts/setup.sh does)")
    text = (resources.files("weft.host") / "bpf" / SOURCE).read_bytes()
    # The source's hash in the name: an upgraded weft never loads a stale object.
    digest = hashlib.sha256(text).hexdigest()[:12]
    out = out_dir / f"fastpath-{network.network_address}-{network.prefixlen}-{digest}.o"
    if out.exists():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    with resources.as_file(resources.files("weft.host") / "bpf" / SOURCE) as source:
        tmp = out.with_suffix(".tmp")
        proc = subprocess.run(compile_args(network, source, tmp), capture_output=True,
                              text=True, check=False, timeout=120)
    if proc.returncode != 0:
        raise KernelError(f"clang could not compile {SOURCE}: {proc.stderr.strip()[-2000:]}")
    tmp.rename(out)
    return out


def attach_argv(device: str, obj: Path, section: str) -> list[list[str]]:
    """The `tc` commands putting `section` of `obj` on `device`'s ingress (pure)."""
    return [["tc", "qdisc", "replace", "dev", device, "clsact"],
            ["tc", "filter", "replace", "dev", device, "ingress", "pref", "49", "handle",
             "1", "bpf", "direct-action", "obj", str(obj), "sec", section]]
