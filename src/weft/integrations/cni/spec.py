"""Facts of the CNI specification that weft-cni speaks (pure; no I/O).

https://github.com/containernetworking/cni/blob/spec-v1.0.0/SPEC.md
"""

from __future__ import annotations

import re
from enum import IntEnum
from typing import Any, Final

from weft.core.errors import WeftError

SPEC_VERSION: Final = "1.0.0"
# CHECK exists since 0.4.0; older configs may ADD/DEL/VERSION only.
SUPPORTED_VERSIONS: Final = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
CHECK_SINCE: Final = (0, 4, 0)

COMMANDS: Final = ("ADD", "DEL", "CHECK", "VERSION")
# Which CNI_* variables each command requires (libcni's skel table: DEL may run after the
# namespace is gone, so CNI_NETNS is optional there).
REQUIRED_ENV: Final[dict[str, tuple[str, ...]]] = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "VERSION": (),
}


class ErrorCode(IntEnum):
    """The spec's well-known error codes (0-99 reserved) and weft-cni's own (100+)."""

    INCOMPATIBLE_VERSION = 1
    UNSUPPORTED_FIELD = 2
    UNKNOWN_CONTAINER = 3
    INVALID_ENVIRONMENT = 4
    IO_FAILURE = 5
    DECODE_FAILURE = 6
    INVALID_NETWORK_CONFIG = 7
    TRY_AGAIN_LATER = 11
    # weft-cni specific
    DELEGATE_FAILED = 100  # the delegate plugin failed without printing a spec error
    SUBNET_CHANGED = 101  # the container's subnet is no longer this host's subnet
    INTERNAL = 199  # a bug in weft-cni


class CniError(WeftError):
    """A CNI error result: what a plugin prints as JSON on stdout with a non-zero exit.

    Raised by the plugin's handler (and turned into output there) and by
    `weft.integrations.cni.runtime` when a plugin it ran reported one."""

    def __init__(self, code: int, msg: str, details: str = "",
                 cni_version: str = SPEC_VERSION) -> None:
        super().__init__(f"CNI error {code}: {msg}" + (f" ({details})" if details else ""))
        self.code = code
        self.msg = msg
        self.details = details
        self.cni_version = cni_version

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": self.cni_version, "code": self.code,
                               "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> CniError:
        code = obj.get("code")
        return cls(code if isinstance(code, int) else ErrorCode.DELEGATE_FAILED,
                   str(obj.get("msg", "")), str(obj.get("details", "") or ""),
                   str(obj.get("cniVersion", SPEC_VERSION)))


def version_tuple(version: str) -> tuple[int, int, int] | None:
    """"1.0.0" -> (1, 0, 0); None when it is not a semantic version."""
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", version)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


# libcni's validation rules (pkg/utils): the container ID and interface name end up in file
# names and netlink requests, so anything else is refused before it is used.
_CONTAINER_ID = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")
_NETWORK_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")
_PLUGIN_TYPE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")
IFNAME_MAX: Final = 15  # IFNAMSIZ - 1


def valid_container_id(value: str) -> bool:
    return _CONTAINER_ID.fullmatch(value) is not None


def valid_network_name(value: str) -> bool:
    return _NETWORK_NAME.fullmatch(value) is not None


def valid_plugin_type(value: str) -> bool:
    return _PLUGIN_TYPE.fullmatch(value) is not None


def valid_ifname(value: str) -> bool:
    return (0 < len(value) <= IFNAME_MAX and value not in (".", "..")
            and not any(c in value for c in "/:") and not any(c.isspace() for c in value))
