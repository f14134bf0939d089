"""etcd store URLs and key prefixes: pure parsing, every mistake a UsageError."""

from __future__ import annotations

from dataclasses import dataclass

from weft.core.constants import DEFAULT_ETCD_PREFIX
from weft.core.errors import UsageError

DEFAULT_PORT = 2379


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_etcd_url(url: str) -> tuple[list[Endpoint], bool]:
    """`etcd://h1:2379,h2:2379` or `etcds://...` -> (endpoints, tls). Raises UsageError."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("etcd", "etcds"):
        raise UsageError(f"store URL {url!r}: expected etcd://host:port[,host:port...] or etcds://")
    if "/" in rest or "?" in rest or "#" in rest:
        raise UsageError(
            f"store URL {url!r}: no path or query allowed after the endpoints; "
            "give the key prefix with --etcd-prefix"
        )
    if "@" in rest:
        raise UsageError(
            f"store URL {url!r}: do not put credentials in the URL; "
            "use --etcd-username and --etcd-password"
        )
    endpoints = [_parse_endpoint(url, item) for item in rest.split(",") if item.strip()]
    if not endpoints:
        raise UsageError(f"store URL {url!r} names no etcd endpoint, e.g. etcd://127.0.0.1:2379")
    return endpoints, scheme == "etcds"


def _parse_endpoint(url: str, item: str) -> Endpoint:
    item = item.strip()
    if item.startswith("["):  # [IPv6]:port
        host, close, port_text = item[1:].partition("]")
        if not close or (port_text and not port_text.startswith(":")):
            raise UsageError(f"store URL {url!r}: endpoint {item!r} is not [address]:port")
        port_text = port_text[1:]
    else:
        host, _, port_text = item.partition(":")
    if not host:
        raise UsageError(f"store URL {url!r}: endpoint {item!r} has no host")
    if not port_text:
        return Endpoint(host, DEFAULT_PORT)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f"store URL {url!r}: endpoint {item!r} has no valid port (1-65535)")
    return Endpoint(host, int(port_text))


def normalize_prefix(prefix: str) -> str:
    """`/coreos.com/network/` -> `/coreos.com/network`. Raises UsageError."""
    cleaned = prefix.strip().rstrip("/")
    if not cleaned or any(ch.isspace() for ch in cleaned):
        raise UsageError(
            f"etcd prefix {prefix!r} is not a key path like {DEFAULT_ETCD_PREFIX} "
            "(flannel uses /coreos.com/network)"
        )
    return cleaned
