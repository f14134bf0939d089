"""WireGuard support: keys, the device plan, and the two device edges (kernel, wireguard-go)."""
