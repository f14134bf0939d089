"""The two data planes an agent runs for host-gw and vxlan: the tc BPF fast path (the
default, where clang, bpftool and tc are there) and the nftables path alone
(`--no-fastpath`). Tests of faults, poisoned stores and trust run on both."""

from __future__ import annotations

import shutil

from weft_lab.testbed import Testbed

# Each data plane's agent arguments, by the name a test id carries.
DATA_PLANES: dict[str, list[str]] = {"fastpath": [], "nftables": ["--no-fastpath"]}
FASTPATH_TOOLS = all(shutil.which(t) for t in ("clang", "bpftool", "tc"))


def check_data_plane(tb: Testbed, plane: str) -> None:
    """The agents run the plane the test asked for: the fast path active on every host
    where it can be (its reason in status otherwise), or off."""
    for host in tb.hosts:
        status = tb.host_status(host)["fastpath"]
        if plane == "nftables":
            assert not status["active"], status
            assert status["reason"] == "off (--no-fastpath)", status
        elif FASTPATH_TOOLS:
            assert status["active"], status
