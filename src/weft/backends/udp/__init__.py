"""The `udp` backend's data plane: wire codec, peer table, TUN device, socket, forwarder."""
