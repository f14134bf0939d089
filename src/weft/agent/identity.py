"""This host's stable identity: who it is, not where it is.

Generated once (128 random bits) and kept private in the state directory; carried in the
lease record (`HostID`), so a lease is known by its holder, not by the address it names (the
address is one of its facts and may change). Not `/etc/machine-id`: cloned VMs share it, and
so does every namespace host of a testbed. A running agent keeps its identity in memory and
writes the file back if the state directory is removed, so a later restart is still the same
host.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from weft.core.errors import UsageError
from weft.core.lease import valid_host_id
from weft.host.files import open_private, write_private

HOST_ID_FILE = "host-id"
_WHAT = "host identity file"


def load_host_id(state_dir: Path) -> str:
    """The identity kept in `state_dir`, made (and kept) on first use."""
    path = state_dir / HOST_ID_FILE
    try:
        fd = open_private(path, os.O_RDONLY, _WHAT)
    except FileNotFoundError:
        host_id = secrets.token_hex(16)
        write_private(path, host_id + "\n", _WHAT)
        return host_id
    with os.fdopen(fd) as f:
        host_id = f.read(200).strip()
    if not valid_host_id(host_id):
        raise UsageError(f"{path}: not a weft host identity ({host_id[:40]!r}); if the file "
                         f"was damaged, remove it (rm {path}) and this host gets a new one")
    return host_id


def ensure_host_id(state_dir: Path, host_id: str) -> bool:
    """Write the identity back if its file is gone (the state directory removed under a
    running agent); True if it was written."""
    path = state_dir / HOST_ID_FILE
    if path.exists():
        return False
    write_private(path, host_id + "\n", _WHAT)
    return True
