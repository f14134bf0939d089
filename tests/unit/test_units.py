"""`weft units`: the agent's systemd unit and docker's drop-in, as shipped, written where
systemd reads them, and accepted by `systemd-analyze verify`."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

WEFT = str(Path(sysconfig.get_path("scripts")) / "weft")
DROP_IN = Path("docker.service.d/weft.conf")


def weft(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "weft", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def exec_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith("Exec")]


def test_units_are_written_with_this_installs_paths(tmp_path: Path) -> None:
    proc = weft("units", "--dir", str(tmp_path), "--dockerd", "/usr/sbin/dockerd")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"wrote {tmp_path / 'weft.service'}",
        f"wrote {tmp_path / DROP_IN}",
        "then: systemctl daemon-reload && systemctl enable --now weft && systemctl restart docker",
    ]
    assert exec_lines(tmp_path / "weft.service") == [f"ExecStart={WEFT} agent $WEFT_AGENT_ARGS"]
    assert exec_lines(tmp_path / DROP_IN)[1:] == [
        f"ExecStartPre={WEFT} docker-opts --subnet-file /run/weft/subnet.env "
        "--output /run/weft/docker.env",
        "ExecStart=",
        "ExecStart=/usr/sbin/dockerd -H fd:// --containerd=/run/containerd/containerd.sock "
        "$DOCKER_OPTS",
    ]
    service = (tmp_path / "weft.service").read_text()
    assert "KillMode=process" in service  # the data plane outlives a stop
    assert "After=network-online.target" in service
    for path in (tmp_path / "weft.service", tmp_path / DROP_IN):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    # Written again (an upgrade), the same units replace the old ones.
    assert weft("units", "--dir", str(tmp_path), "--dockerd", "/usr/sbin/dockerd").returncode == 0


def test_no_docker_writes_the_agent_unit_alone(tmp_path: Path) -> None:
    proc = weft("units", "--dir", str(tmp_path), "--no-docker")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weft.service"]
    assert "restart docker" not in proc.stdout


@pytest.mark.parametrize("planted", ["weft.service", "docker.service.d", "docker.service.d/weft.conf"])
def test_a_symlink_is_refused_and_nothing_is_written_through_it(tmp_path: Path,
                                                               planted: str) -> None:
    units, elsewhere = tmp_path / "units", tmp_path / "elsewhere"
    units.mkdir()
    elsewhere.mkdir()
    (units / "docker.service.d").mkdir()
    link = units / planted
    if link.is_dir():
        link.rmdir()
    link.symlink_to(elsewhere / Path(planted).name)
    proc = weft("units", "--dir", str(units))
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1
    assert f"{link} is a symlink" in proc.stderr
    assert list(elsewhere.iterdir()) == []
    assert not (units / "weft.service").is_file()  # nothing half-written


def test_the_unit_directory_must_exist_and_paths_must_be_plain(tmp_path: Path) -> None:
    proc = weft("units", "--dir", str(tmp_path / "nope"))
    assert proc.returncode == 1
    assert "does not exist" in proc.stderr
    proc = weft("units", "--dir", str(tmp_path), "--weft", "/opt/my weft/bin/weft")
    assert proc.returncode == 1
    assert "give an absolute path" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        reason = "needs systemd-analyze (Debian package systemd; scripts/setup.sh installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return tool


def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    tool = systemd_analyze()
    # docker.service is the packaged one when docker is installed, else a stand-in: the
    # drop-in is checked merged into a unit either way. dockerd must exist for verify.
    dockerd = shutil.which("dockerd", path="/usr/sbin:/usr/bin") or "/bin/true"
    assert weft("units", "--dir", str(tmp_path), "--dockerd", dockerd).returncode == 0
    packaged = any(Path(d, "docker.service").exists()
                   for d in ("/etc/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system"))
    if not packaged:
        (tmp_path / "docker.service").write_text("[Service]\nExecStart=/bin/true\n")
    # A trailing ':' keeps systemd's own directories after ours (for docker.service).
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"}
    proc = subprocess.run([tool, "verify", "weft.service", "docker.service"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    # verify only warns (status 0) about unknown keys and the like: none may appear.
    assert proc.stderr == ""
    assert proc.stdout == ""
