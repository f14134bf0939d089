"""One WireGuard device of this host, whichever implementation serves it: found, adopted
or created (the kernel's where the module exists, else a wireguard-go process), given
its identity (private key, listen port), and brought back when it is gone.

The backend keeps one (`weft.wg0`), or two in dual stack over an IPv6 underlay address
(`weft.wg0v6` beside it); each is the same kind of thing with its own name and port.
"""

from __future__ import annotations

import logging

from weft.backends.wireguard.kernel import KernelDevice
from weft.backends.wireguard.keys import PrivateKey
from weft.backends.wireguard.plan import DeviceChange, DeviceState, device_change
from weft.backends.wireguard.uapi import UapiDevice
from weft.backends.wireguard.userspace import WireguardGo
from weft.core.errors import KernelError, KernelFeatureMissing
from weft.core.host import HostContext
from weft.host.netlink import LinkInfo, Netlink

log = logging.getLogger(__name__)

KERNEL = "kernel"
USERSPACE = "wireguard-go"


class Tunnel:
    """The WireGuard device `ifname`, listening on `port`."""

    def __init__(self, ifname: str, port: int, wanted: str, host: HostContext,
                 files: str = "wireguard-go") -> None:
        self.ifname = ifname
        self.port = port
        self.wanted = wanted  # Backend.Implementation: auto, kernel or wireguard-go
        self.process = WireguardGo(ifname, host.state_dir, files=files)
        self.implementation: str | None = None
        self._device: KernelDevice | UapiDevice | None = None

    def _use(self, implementation: str) -> None:
        self.implementation = implementation
        self._device = (KernelDevice(self.ifname) if implementation == KERNEL
                        else self.process.device)

    def _start_userspace(self, nl: Netlink) -> None:
        nl.delete_link(self.ifname)  # a TUN left by a wireguard-go that died
        self.process.start()
        self._use(USERSPACE)

    def ensure(self, nl: Netlink) -> None:
        """The device exists and is served: adopted as a previous run left it, else made."""
        wanted = self.wanted
        link = nl.link(self.ifname)
        if link is not None and link.kind == "wireguard" and wanted != USERSPACE:
            self._use(KERNEL)
            return
        if (link is not None and link.kind == "tun" and wanted != KERNEL
                and self.process.device.alive()):
            self._use(USERSPACE)  # adopt the wireguard-go a previous run left serving
            return
        if link is not None:
            # Ours by name, but of the wrong kind or without a live wireguard-go.
            self.process.stop()
            nl.delete_link(self.ifname)
        elif wanted != KERNEL:
            self.process.stop()  # a wireguard-go whose TUN was deleted under it
        if wanted != USERSPACE:
            try:
                nl.create_link(self.ifname, "wireguard")
                self._use(KERNEL)
                return
            except KernelFeatureMissing:
                if wanted == KERNEL:
                    raise KernelFeatureMissing(
                        "Backend.Implementation is \"kernel\" but the kernel has no WireGuard "
                        "module; load it (modprobe wireguard) or use \"auto\"/\"wireguard-go\""
                    ) from None
        self._start_userspace(nl)

    def configure_identity(self, key: PrivateKey) -> None:
        device = self.device()
        device.apply(device_change(device.read(), key, self.port))

    def device(self) -> KernelDevice | UapiDevice:
        if self._device is None:
            raise KernelError("the wireguard backend was used before prepare()")
        return self._device

    def needs_revival(self, nl: Netlink) -> bool:
        """The device was deleted, or its wireguard-go does not answer (crash, OOM kill):
        the caller makes it again (`ensure`) and restores its identity and address."""
        if nl.link(self.ifname) is None:
            return True
        device = self.device()
        return isinstance(device, UapiDevice) and not device.alive()

    def revive(self, key: PrivateKey) -> None:
        log.warning("WireGuard device gone or not answering; making it again",
                    extra={"device": self.ifname, "implementation": self.implementation})
        with Netlink() as nl:
            self.ensure(nl)
        self.configure_identity(key)

    def link(self, nl: Netlink) -> LinkInfo:
        link = nl.link(self.ifname)
        if link is None:
            raise KernelError(f"WireGuard device {self.ifname} vanished")
        return link

    def read(self) -> DeviceState:
        return self.device().read()

    def apply(self, change: DeviceChange) -> None:
        self.device().apply(change)

    def pid(self) -> int | None:
        return self.process.pid() if self.implementation == USERSPACE else None

    def teardown(self, nl: Netlink) -> None:
        # Its routes and address go with the device; wireguard-go exits with its TUN.
        self.process.stop()
        nl.delete_link(self.ifname)
