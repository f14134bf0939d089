"""Where weft looks for the CNI reference plugins: one answer, both homes searched."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from weft.integrations.cni.plugin import REFERENCE_PLUGIN_DIRS, find_plugin
from weft.integrations.cni.runtime import default_cni_path
from weft.integrations.cni.spec import CniError, ErrorCode


def test_the_default_path_is_weft_cnis_directory_then_both_plugin_homes() -> None:
    assert REFERENCE_PLUGIN_DIRS == ("/opt/cni/bin", "/usr/lib/cni")
    assert default_cni_path().split(os.pathsep) == [
        str(Path(sys.executable).parent), "/opt/cni/bin", "/usr/lib/cni"]


def test_a_plugin_is_found_in_whichever_directory_holds_it(tmp_path: Path) -> None:
    first, second = tmp_path / "opt-cni-bin", tmp_path / "usr-lib-cni"
    first.mkdir()
    second.mkdir()
    bridge = second / "bridge"
    bridge.write_text("#!/bin/sh\n")
    bridge.chmod(0o755)
    assert find_plugin("bridge", f"{first}{os.pathsep}{second}") == bridge


def test_a_missing_plugin_names_both_homes(tmp_path: Path) -> None:
    with pytest.raises(CniError) as caught:
        find_plugin("bridge", str(tmp_path))
    assert caught.value.code == ErrorCode.INVALID_ENVIRONMENT
    assert "/opt/cni/bin" in caught.value.details
    assert "/usr/lib/cni" in caught.value.details
