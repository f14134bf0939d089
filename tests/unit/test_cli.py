"""The command line: clear one-line errors, config round trip, status."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import weft


def test_config_set_and_show_round_trip(tmp_path: Path) -> None:
    store = f"sqlite://{tmp_path / 'store.db'}"
    cfg = '{"Network": "198.19.0.0/16", "Backend": {"Type": "host-gw"}}'
    assert weft("config", "set", "-", "--store", store, input=cfg).returncode == 0
    shown = weft("config", "show", "--store", store)
    assert shown.returncode == 0
    assert json.loads(shown.stdout) == {"Network": "198.19.0.0/16", "SubnetLen": 24,
                                        "Backend": {"Type": "host-gw"}}


def test_bad_config_is_one_clear_line_and_nothing_is_written(tmp_path: Path) -> None:
    store = f"sqlite://{tmp_path / 'store.db'}"
    proc = weft("config", "set", "-", "--store", store, input='{"Network": "10.0.0.0/8", "SubnetLen": 4}')
    assert proc.returncode == 1
    assert "SubnetLen 4 must be longer than the Network prefix /8" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "no network config" in weft("config", "show", "--store", store).stderr


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    proc = weft("config", "set", str(tmp_path / "nope.json"), "--store", f"sqlite://{tmp_path}/s.db")
    assert proc.returncode == 1
    assert "cannot read" in proc.stderr


def test_status_lists_leases_and_says_when_no_agent_runs(tmp_path: Path) -> None:
    store = f"sqlite://{tmp_path / 'store.db'}"
    weft("config", "set", "-", "--store", store, input='{"Network": "198.19.0.0/16"}')
    code = (
        "import asyncio, ipaddress; from weft.store import open_store; from weft.core.lease import Lease\n"
        "async def m():\n"
        f"    s = open_store({store!r})\n"
        "    await s.create_lease(Lease(ipaddress.ip_network('198.19.7.0/24'), ipaddress.ip_address('198.18.0.7'), 'vxlan'), 600)\n"
        "    await s.close()\n"
        "asyncio.run(m())")
    subprocess.run([sys.executable, "-c", code], check=True)
    proc = weft("status", "--store", store, "--state-dir", str(tmp_path / "state"))
    assert proc.returncode == 0
    assert "198.19.7.0/24" in proc.stdout
    assert "198.18.0.7" in proc.stdout
    assert "is `weft agent` running?" in proc.stdout
    data = json.loads(weft("status", "--json", "--store", store, "--state-dir", str(tmp_path)).stdout)
    (lease,) = data["leases"]
    assert lease["subnet"] == "198.19.7.0/24"
    assert 590 <= lease["expires_in"] <= 600


def test_agent_without_root_says_so(tmp_path: Path) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to drop root")
    store = tmp_path / "store.db"
    weft("config", "set", "-", "--store", f"sqlite://{store}", input='{"Network": "198.19.0.0/16"}')
    tmp_path.chmod(0o777)
    store.chmod(0o666)
    proc = weft("agent", "--store", f"sqlite://{store}", "--state-dir", str(tmp_path / "s"),
                prefix=("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"))
    assert proc.returncode == 1
    assert "needs root" in proc.stderr


def test_bad_log_level_is_a_usage_error(tmp_path: Path) -> None:
    proc = weft("agent", "--store", f"sqlite://{tmp_path}/s.db", "--log-level", "loud")
    assert proc.returncode == 1
    assert "--log-level 'loud' is not a level" in proc.stderr


def _isolated() -> tuple[str, ...]:
    """As root, run the agent in a namespace of its own: a value that slipped through
    validation must not reach this machine's kernel."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    return ("unshare", "--net", "--mount")


@pytest.mark.parametrize(("flags", "message"), [
    (["--store", "http://198.18.0.9:2379"], "--store 'http://198.18.0.9:2379': use sqlite:///"),
    (["--store", "etcd:/198.18.0.9"], "--store 'etcd:/198.18.0.9': use sqlite:///"),
    (["--store", "store.db"], "--store 'store.db': use sqlite:///"),
    (["--store", "sqlite://relative.db"], "needs an absolute path"),
    (["--metrics-addr", "nowhere"], "--metrics-addr 'nowhere': expected HOST:PORT"),
    (["--metrics-addr", "127.0.0.1:99999"], "expected HOST:PORT"),
    (["--metrics-addr", "example.org:9000"], "is not an IP address"),
    (["--lease-ttl", "0.5"], "--lease-ttl 0.5: choose between"),
    (["--lease-ttl", "1e12"], "--lease-ttl 1e+12: choose between"),
    (["--resync-interval", "0"], "--resync-interval 0: choose between"),
    (["--public-ip", "not-an-ip"], "--public-ip 'not-an-ip' is not an IP address"),
    (["--subnet-file", "{tmp}"], "is a directory"),
    (["--state-dir", "{tmp}/file/state"], "is not a directory"),
])
def test_every_bad_agent_value_is_one_line_and_changes_nothing(
        tmp_path: Path, flags: list[str], message: str) -> None:
    (tmp_path / "file").write_text("")
    store = tmp_path / "store.db"
    argv = [f.format(tmp=tmp_path) for f in flags]
    if "--store" not in argv:
        argv += ["--store", f"sqlite://{store}"]
    if "--state-dir" not in argv:
        argv += ["--state-dir", str(tmp_path / "state")]
    if "--subnet-file" not in argv:
        argv += ["--subnet-file", str(tmp_path / "run" / "subnet.env")]
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = weft("agent", *argv, prefix=_isolated())
    assert proc.returncode == 1, proc.stderr
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no store, state or file
    assert not list(Path.cwd().glob("store.db*"))
    assert not list(Path.cwd().glob("http:*"))


def test_a_read_only_state_dir_stops_the_agent_before_it_leases(tmp_path: Path) -> None:
    store = tmp_path / "store.db"
    weft("config", "set", "-", "--store", f"sqlite://{store}", input='{"Network": "198.19.0.0/16"}')
    ro = tmp_path / "ro"
    ro.mkdir()
    script = (f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && "
              f"{sys.executable} -m weft agent --store sqlite://{store} --state-dir {ro}/state "
              f"--subnet-file {tmp_path}/subnet.env")
    proc = subprocess.run([*_isolated(), "sh", "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 1, proc.stderr
    assert f"--state-dir {ro}/state: {ro} is not writable" in proc.stderr
    lease_count = weft("status", "--json", "--store", f"sqlite://{store}",
                       "--state-dir", str(tmp_path))
    assert json.loads(lease_count.stdout)["leases"] == []
