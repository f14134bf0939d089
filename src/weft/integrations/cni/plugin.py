"""`weft-cni`, the executable a container runtime runs: a thin shell around the handler.

It reads the CNI environment and stdin, hands them to `weft.integrations.cni.handler.handle`
with the real edges (subprocess for the delegate plugin, files under dataDir for saved
delegate configs, subnet.env from disk), writes the result to stdout and exits with its code.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from weft.host.files import write_atomic
from weft.integrations.cni.handler import handle
from weft.integrations.cni.spec import SPEC_VERSION, CniError, ErrorCode
from weft.integrations.subnet_env import read_subnet_env

# Where the reference plugins (bridge, ptp, host-local) are found: the CNI convention
# (the upstream release; containerd's and CRI-O's default bin_dir) and Debian's
# containernetworking-plugins package. A default search path holds both, in this order.
REFERENCE_PLUGIN_DIRS: Final = ("/opt/cni/bin", "/usr/lib/cni")


def find_plugin(name: str, cni_path: str) -> Path:
    """The first executable `name` in the ':'-separated CNI_PATH (as libcni looks it up)."""
    for directory in cni_path.split(os.pathsep):
        if not directory:
            continue
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise CniError(ErrorCode.INVALID_ENVIRONMENT, f"plugin {name!r} not found in CNI_PATH",
                   f"CNI_PATH={cni_path!r}; the reference plugins are in /opt/cni/bin (the "
                   "CNI release) or /usr/lib/cni (Debian's containernetworking-plugins)")


def run_delegate(name: str, env: Mapping[str, str], stdin: bytes) -> tuple[int, bytes]:
    path = find_plugin(name, env.get("CNI_PATH", ""))
    try:
        # stderr is inherited: the delegate's diagnostics reach the runtime's log as ours do.
        proc = subprocess.run([str(path)], input=stdin, stdout=subprocess.PIPE,
                              env=dict(env), check=False)
    except OSError as exc:
        raise CniError(ErrorCode.IO_FAILURE, f"cannot run plugin {path}", str(exc)) from None
    return proc.returncode, proc.stdout


class FileDelegateStore:
    """Saved delegate configs as files `<dataDir>/<containerID>:<ifname>`."""

    def load(self, data_dir: str, key: str) -> bytes | None:
        try:
            return (Path(data_dir) / key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CniError(ErrorCode.IO_FAILURE, f"cannot read {data_dir}/{key}",
                           str(exc)) from None

    def save(self, data_dir: str, key: str, data: bytes) -> None:
        directory = Path(data_dir)
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            # whole or not at all: a concurrent DEL never reads half a config
            write_atomic(directory / key, data, mode=0o600)
        except OSError as exc:
            raise CniError(ErrorCode.IO_FAILURE, f"cannot write {data_dir}/{key}",
                           str(exc)) from None

    def delete(self, data_dir: str, key: str) -> None:
        try:
            (Path(data_dir) / key).unlink(missing_ok=True)
        except OSError as exc:
            raise CniError(ErrorCode.IO_FAILURE, f"cannot remove {data_dir}/{key}",
                           str(exc)) from None


def netns_usable(path: str) -> bool:
    """A network namespace file (a bind mount of nsfs, as `ip netns` and runtimes make, or
    /proc/PID/ns/net): on the same device as this process's own namespace file."""
    try:
        return os.stat(path).st_dev == os.stat("/proc/self/ns/net").st_dev
    except OSError:
        return False


def _error_output(code: int, msg: str, details: str) -> bytes:
    return json.dumps(CniError(code, msg, details, SPEC_VERSION).to_json()).encode() + b"\n"


def main() -> None:
    try:
        # read even for VERSION: a runtime writing the config must not hit a closed pipe
        stdin = sys.stdin.buffer.read()
    except OSError as exc:
        rc, out = 1, _error_output(ErrorCode.IO_FAILURE, "cannot read stdin", str(exc))
    else:
        try:
            rc, out = handle(os.environ, stdin, exec_plugin=run_delegate,
                             state=FileDelegateStore(), read_subnet_env=read_subnet_env,
                             netns_usable=netns_usable)
        except Exception as exc:  # a bug: still answer in the spec's format, no traceback
            rc, out = 1, _error_output(ErrorCode.INTERNAL, "internal error in weft-cni",
                                       f"{type(exc).__name__}: {exc}")
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.buffer.write(out)
        sys.stdout.buffer.flush()
    sys.exit(rc)
