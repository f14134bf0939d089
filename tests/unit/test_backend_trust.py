"""`weft config set` says, in one warning line, when a network's backend does not
authenticate traffic between hosts (the `encrypted` fact the backend declares), and is
silent for one that does; the config is written either way. docs/security.md has the
table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from weft.backends.registry import BACKENDS, backend_facts, parse_config


def config(backend: str) -> str:
    return json.dumps({"Network": "198.19.0.0/16", "Backend": {"Type": backend}})


def encrypted(backend: str) -> bool:
    return backend_facts(parse_config(config(backend)).backend, "eth0").encrypted


def config_set(tmp_path: Path, backend: str) -> subprocess.CompletedProcess[str]:
    cfg = config(backend)
    return subprocess.run([sys.executable, "-m", "weft", "config", "set", "-", "--store",
                           f"sqlite://{tmp_path / 'store.db'}"], input=cfg,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_config_set_warns_once_for_a_backend_without_authentication(
        tmp_path: Path, backend: str) -> None:
    proc = config_set(tmp_path, backend)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("config written:")
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    if encrypted(backend):
        assert warnings == []
    else:
        assert warnings == [
            f"warning: backend {backend} does not authenticate traffic between hosts: any "
            "machine on the underlay segments between them can send packets into "
            "containers as a member; use wireguard on a network you do not control "
            "(docs/security.md)"]


def test_only_wireguard_is_encrypted() -> None:
    """The documented table (docs/security.md): if this changes, so must the docs."""
    assert {name for name in BACKENDS if encrypted(name)} == {"wireguard"}


def test_the_documented_warning_is_the_printed_one(tmp_path: Path) -> None:
    doc = (Path(__file__).parents[2] / "docs" / "security.md").read_text()
    assert "\n## What each backend trusts\n" in doc
    printed = config_set(tmp_path, "vxlan").stderr.strip()
    assert printed in doc
