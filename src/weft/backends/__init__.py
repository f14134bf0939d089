"""Backends: one package per data plane (`vxlan`, `hostgw`, `udp`, `wireguard`), each
holding its options, its pure plan and its kernel edge; `registry` names them by `Type`."""
