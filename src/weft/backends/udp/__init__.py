"""The `udp` backend's data plane: wire codec, peer table, forwarder."""
