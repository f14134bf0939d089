"""Reference rows: listed beside their backends, and the fast path's compile line."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from weft.host.fastpath import attach_argv, compile_args
from weft_lab.bench.references import REFERENCES
from weft_lab.bench.runner import available_backends


def test_each_default_reference_sits_just_before_its_backend() -> None:
    names = available_backends()
    for ref in REFERENCES.values():
        if ref.default:
            assert names.index(ref.name) + 1 == names.index(ref.beside), names
        else:  # experimental rows are measured only when named
            assert ref.name not in names
    assert names[:4] == ["kernel-vxlan", "vxlan", "kernel-routes", "host-gw"]


def test_fastpath_is_compiled_for_the_overlay_prefix() -> None:
    argv = compile_args(ipaddress.IPv4Network("198.19.0.0/16"), Path("f.c"), Path("f.o"))
    assert "-DOVERLAY_NET=0xc6130000" in argv
    assert "-DOVERLAY_MASK=0xffff0000" in argv
    assert argv[argv.index("-target"):argv.index("-target") + 2] == ["-target", "bpf"]
    assert attach_argv("eth0", Path("f.o"), "tc/from_underlay")[1][-4:] == [
        "obj", "f.o", "sec", "tc/from_underlay"]
