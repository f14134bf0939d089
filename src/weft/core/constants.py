"""One place for each fact shared across modules: names, numbers, overheads, key layout."""

from __future__ import annotations

from typing import Final

# --- device and chain names -------------------------------------------------------------
VXLAN_DEVICE_PREFIX: Final = "weft.vx"  # + VNI, e.g. "weft.vx1" (flannel: "flannel.1")
UDP_DEVICE: Final = "weft.udp0"
WIREGUARD_DEVICE: Final = "weft.wg0"
NFT_TABLE: Final = "weft"
CNI_BRIDGE: Final = "weft0"

# Routes weft installs carry this rtnetlink protocol number, so reconciliation owns
# exactly the routes it made and never touches anyone else's (see /etc/iproute2/rt_protos).
ROUTE_PROTOCOL: Final = 87  # "W"

# --- header sizes --------------------------------------------------------------------
# Each backend's overhead (`weft.backends.registry.overhead`) is built from these; nothing
# else hard-codes them.
IP_HEADER: Final = {4: 20, 6: 40}
UDP_HEADER: Final = 8
VXLAN_HEADER: Final = 8 + 14  # VXLAN header + inner Ethernet header
WIREGUARD_HEADER: Final = 32  # type/reserved/index/counter (16) + Poly1305 tag (16)
# weft's own UDP encapsulation: fixed header plus the virtio-net header it carries.
UDP_ENCAP_HEADER: Final = 8
VNET_HEADER: Final = 10


# --- store key layout (flannel-compatible) ----------------------------------------------
DEFAULT_ETCD_PREFIX: Final = "/weft/network"
CONFIG_KEY: Final = "config"
SUBNETS_DIR: Final = "subnets"

# --- bounded input from the store ---------------------------------------------------------
# A lease record is ~200 bytes; anything far larger is hostile or corrupt and is dropped
# before it is parsed. A watch batch is split at this many events (nothing is lost: the
# rest comes in the next batch), so one burst cannot hold unbounded memory.
MAX_RECORD_BYTES: Final = 16 * 1024
MAX_WATCH_BATCH: Final = 1000

# --- lease timing -----------------------------------------------------------------------
DEFAULT_LEASE_TTL: Final = 24 * 3600.0
# Renew when this fraction of the TTL is left (flannel renews 1 h before a 24 h expiry;
# renewing at half leaves room for a long store outage).
RENEW_FRACTION: Final = 0.5

# --- defaults for integrations ----------------------------------------------------------
DEFAULT_SUBNET_FILE: Final = "/run/weft/subnet.env"
DEFAULT_STATE_DIR: Final = "/var/lib/weft"
DEFAULT_SQLITE_PATH: Final = "/var/lib/weft/store.db"
