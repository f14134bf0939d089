"""The agent's systemd service and docker's drop-in: rendered from the templates shipped
beside this module, written by `weft units`.

Rendering is pure but for reading the package's own templates: only the paths of the
`weft` and `dockerd` executables change from host to host. Writing never follows a
symlink: a unit directory or file that is one is refused, since a root process writing
through it would write where whoever planted it chose.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Final

from weft.core.errors import UsageError
from weft.host.files import write_atomic

AGENT_UNIT: Final = "weft.service"
DOCKER_DROP_IN: Final = "docker.service.d/weft.conf"
DEFAULT_UNIT_DIR: Final = "/etc/systemd/system"
# Unit files are read by systemctl as any user; they hold no secret (those go in
# /etc/default/weft, which weft never writes), and only their owner, root, may change them.
UNIT_MODE: Final = 0o644
# A path systemd takes as one word of ExecStart= without quoting or specifier expansion.
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9_./+-]*")


def _executable(path: str, what: str, option: str) -> str:
    if _PLAIN_PATH.fullmatch(path) is None:
        raise UsageError(f"{what} path {path!r}: give an absolute path of letters, digits and "
                         f"_./+- only ({option})")
    return path


def render_units(weft: str, dockerd: str, *, docker: bool = True) -> dict[str, str]:
    """The units' text by path relative to the unit directory."""
    weft = _executable(weft, "weft", "--weft")
    dockerd = _executable(dockerd, "dockerd", "--dockerd")
    templates = resources.files(__package__ or __name__)
    names = [AGENT_UNIT, DOCKER_DROP_IN] if docker else [AGENT_UNIT]
    return {
        name: templates.joinpath(f"{name}.in").read_text(encoding="utf-8")
        .replace("@WEFT@", weft).replace("@DOCKERD@", dockerd)
        for name in names
    }


def _refuse_symlink(path: Path) -> bool:
    """True if `path` exists (as anything but a symlink); a symlink is refused."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(info.st_mode):
        raise UsageError(f"{path} is a symlink; weft does not write units through one: "
                         "remove it, or give another --dir")
    return True


def write_units(directory: Path, units: Mapping[str, str]) -> list[Path]:
    """Write each unit atomically (mode 0644) under `directory`, which must exist; its
    subdirectories (docker.service.d) are made 0755. Every path is checked before the
    first is written, so a refusal leaves nothing half-written. Returns the paths."""
    if not _refuse_symlink(directory) or not directory.is_dir():
        raise UsageError(f"unit directory {directory} does not exist (systemd's is "
                         f"{DEFAULT_UNIT_DIR})")
    missing: list[Path] = []
    for name in units:
        for parent in reversed(Path(name).parents[:-1]):
            sub = directory / parent
            if not _refuse_symlink(sub):
                missing.append(sub)
            elif not sub.is_dir():
                raise UsageError(f"{sub} is not a directory")
        _refuse_symlink(directory / name)
    for sub in missing:
        sub.mkdir(mode=0o755)
    written = []
    for name, text in units.items():
        write_atomic(directory / name, text.encode(), mode=UNIT_MODE)
        written.append(directory / name)
    return written
