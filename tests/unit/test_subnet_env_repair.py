"""subnet.env across an agent's run: the first write and an update of its own file are
info; putting back a file someone removed or changed is a repair, a warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from weft.agent.host_state import Written, converge_subnet_env

FIRST = b"FLANNEL_NETWORK=198.19.0.0/16\nFLANNEL_SUBNET=198.19.3.1/24\n"
MOVED = b"FLANNEL_NETWORK=198.19.0.0/16\nFLANNEL_SUBNET=198.19.4.1/24\n"


def levels(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    seen = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "weft.agent"]
    caplog.clear()
    return seen


def test_first_write_and_own_updates_are_info_repairs_are_warnings(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="weft.agent")
    path, written = tmp_path / "subnet.env", Written()

    converge_subnet_env(path, FIRST, written)  # a normal first start: nothing there yet
    assert levels(caplog) == [("INFO", "subnet.env written")]
    assert path.read_bytes() == FIRST

    converge_subnet_env(path, FIRST, written)  # in place: nothing written, nothing said
    assert levels(caplog) == []

    converge_subnet_env(path, MOVED, written)  # the agent's own file, a new lease
    assert levels(caplog) == [("INFO", "subnet.env updated")]

    path.unlink()  # someone removed it
    converge_subnet_env(path, MOVED, written)
    assert levels(caplog) == [("WARNING", "host state repaired")]
    assert path.read_bytes() == MOVED

    path.write_bytes(b"FLANNEL_SUBNET=10.0.0.1/24\n")  # someone changed it
    converge_subnet_env(path, MOVED, written)
    assert levels(caplog) == [("WARNING", "host state repaired")]
    assert path.read_bytes() == MOVED


def test_a_restart_that_finds_its_file_right_then_loses_it_warns(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="weft.agent")
    path, written = tmp_path / "subnet.env", Written()
    path.write_bytes(FIRST)  # left by the previous run, same lease
    converge_subnet_env(path, FIRST, written)
    assert levels(caplog) == []
    path.unlink()
    converge_subnet_env(path, FIRST, written)
    assert levels(caplog) == [("WARNING", "host state repaired")]


def test_a_restart_with_a_previous_runs_different_file_is_info(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="weft.agent")
    path = tmp_path / "subnet.env"
    path.write_bytes(FIRST)
    converge_subnet_env(path, MOVED, Written())
    assert levels(caplog) == [("INFO", "subnet.env written")]
    assert path.read_bytes() == MOVED
