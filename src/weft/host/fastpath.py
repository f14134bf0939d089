"""The tc BPF fast path (host/bpf/fastpath.c), attached with iproute2's `tc`, which loads
the object file itself. One object serves every network: the leased subnets are in its maps.

How the object reaches a host (the first that applies):

1. **Kept**: the copy in the state directory (root's) that this weft put there, used only
   while its SHA-256 is the one recorded beside it then.
2. **Built with the package**: `setup.py` compiles fastpath.c into the wheel when clang is
   on the build machine (`weft/host/bpf/fastpath.o` beside `fastpath.o.json`, the SHA-256
   of the source it came from and of the object; an editable install builds it in the
   source tree). A host then needs no compiler. It is copied into the state directory if
   it was built from this very source and is intact.
3. **Compiled here** at the agent's first start, with clang and libbpf-dev, when the
   package holds none (or one of another source).

With none of them the agent runs the nftables path and says why in `weft status`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from weft.core.errors import KernelError, KernelFeatureMissing
from weft.host.files import open_private, private_dir, write_private

log = logging.getLogger("weft.host.fastpath")

SOURCE = "fastpath.c"
PACKAGED_OBJECT = "fastpath.o"
PACKAGED_RECORD = "fastpath.o.json"
FROM_CONTAINER = "tc/from_container"
FROM_UNDERLAY = "tc/from_underlay"


def compile_args(source: Path, out: Path) -> list[str]:
    """clang's argv (pure)."""
    return ["clang", "-O2", "-g", "-target", "bpf", "-Wall", "-Werror",
            # the multiarch directory holds asm/types.h on Debian
            "-I/usr/include/x86_64-linux-gnu", "-I/usr/include/aarch64-linux-gnu",
            "-c", str(source), "-o", str(out)]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _source_text() -> bytes:
    return (resources.files("weft.host") / "bpf" / SOURCE).read_bytes()


def build_record(source: bytes, obj: bytes) -> str:
    """The packaged object's record (pure): what it was built from, and its own hash."""
    return json.dumps({"source_sha256": _sha256(source), "object_sha256": _sha256(obj)},
                      indent=1) + "\n"


def build_packaged(source: Path, out_dir: Path) -> Path:
    """Compile `source` into `out_dir` as the package ships it (object and record); run by
    setup.py at package build. Raises CalledProcessError if clang fails."""
    out = out_dir / PACKAGED_OBJECT
    subprocess.run(compile_args(source, out), check=True, timeout=300)
    (out_dir / PACKAGED_RECORD).write_text(build_record(source.read_bytes(), out.read_bytes()))
    return out


def packaged_object() -> bytes | None:
    """The package's prebuilt object, if it was built from this very source and is intact;
    else None (and why, in the log, when there is one at all)."""
    where = resources.files("weft.host") / "bpf"
    try:
        record = json.loads((where / PACKAGED_RECORD).read_text())
        data = (where / PACKAGED_OBJECT).read_bytes()
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("the package's fast path object is unreadable", extra={"error": str(exc)})
        return None
    if not isinstance(record, dict) or record.get("source_sha256") != _sha256(_source_text()):
        log.warning("the package's fast path object was built from another source; not used")
        return None
    if record.get("object_sha256") != _sha256(data):
        log.warning("the package's fast path object does not match its record; not used")
        return None
    return data


def object_path(out_dir: Path) -> Path:
    """Where the object is kept. The source's hash in the name: an upgraded weft never
    loads a stale object."""
    return out_dir / f"fastpath-{_sha256(_source_text())[:12]}.o"


def fastpath_object(out_dir: Path) -> tuple[Path, str]:
    """The object to attach and where it came from ("kept", "from the package", "compiled
    here"). `out_dir` is made root's (or refused: weft.host.files); an object found there
    is used only if it is the one weft put there: its SHA-256 matches the one recorded
    beside it then (its name is derived from the shipped source, so anyone could compute
    it)."""
    private_dir(out_dir, "fast path object directory")
    out = object_path(out_dir)
    if out.exists() or out.is_symlink():
        try:
            check_built(out)
            return out, "kept"
        except BuiltObjectMismatch as exc:
            log.warning("not using a fast path object weft did not build; building it again",
                        extra={"path": str(out), "reason": str(exc)})
            out.unlink()
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(8)}.tmp")
    try:
        data = packaged_object()
        if data is not None:
            origin = "from the package"
            _write_private_bytes(tmp, data)
        else:
            origin = "compiled here"
            _compile(tmp)
        _record(out, _object_digest(tmp))
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out, origin


def _compile(tmp: Path) -> None:
    if shutil.which("clang") is None:
        raise KernelFeatureMissing(
            "no fast path object: this package holds none built from its source (clang was "
            "not on the build machine) and there is no clang here to compile one: install "
            "clang and libbpf-dev, or a weft package built with them")
    with resources.as_file(resources.files("weft.host") / "bpf" / SOURCE) as source:
        proc = subprocess.run(compile_args(source, tmp), capture_output=True, text=True,
                              check=False, timeout=120)
    if proc.returncode != 0:
        raise KernelError(f"clang could not compile {SOURCE}: {proc.stderr.strip()[-2000:]}")


def _write_private_bytes(path: Path, data: bytes) -> None:
    fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, "fast path object")
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _record(obj: Path, digest: str) -> None:
    write_private(_record_path(obj), digest + "\n", "fast path object record")


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
