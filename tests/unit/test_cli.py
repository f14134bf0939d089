"""The command line: clear one-line errors, config round trip, status. As any user, with
no capability (what needs root is in tests/netns/test_cli_agent.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import weft


def test_config_set_and_show_round_trip(tmp_path: Path) -> None:
    store = f"sqlite://{tmp_path / 'store.db'}"
    cfg = '{"Network": "198.19.0.0/16", "Backend": {"Type": "host-gw"}}'
    assert weft("config", "set", "-", "--store", store, input=cfg).returncode == 0
    shown = weft("config", "show", "--store", store)
    assert shown.returncode == 0
    assert json.loads(shown.stdout) == {"Network": "198.19.0.0/16", "SubnetLen": 24,
                                        "Backend": {"Type": "host-gw"}}


def test_config_set_echoes_its_json_on_one_line_when_not_on_a_terminal(tmp_path: Path) -> None:
    cfg = {"Network": "198.19.0.0/16", "SubnetLen": 24, "SubnetMin": "198.19.10.0",
           "SubnetMax": "198.19.250.0",
           "Backend": {"Type": "vxlan", "VNI": 4242, "Port": 4789,
                       "DirectRouting": True}}
    proc = weft("config", "set", "-", "--store", f"sqlite://{tmp_path / 'store.db'}",
                input=json.dumps(cfg))
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    assert len(line) > 80  # longer than the width rich assumes off a terminal
    prefix, echoed = line.split(": ", 1)
    assert prefix == "config written"
    assert json.loads(echoed)["Backend"]["VNI"] == 4242


def test_bad_config_is_one_clear_line_and_nothing_is_written(tmp_path: Path) -> None:
    store = f"sqlite://{tmp_path / 'store.db'}"
    proc = weft("config", "set", "-", "--store", store, input='{"Network": "10.0.0.0/8", "SubnetLen": 4}')
    assert proc.returncode == 1
    assert "SubnetLen 4 must be longer than the Network prefix /8" in proc.stderr
    assert "Traceback" not in proc.stderr
    # Nothing written: not even the store (config show, which only reads, finds none).
    assert not (tmp_path / "store.db").exists()
    assert "no store there" in weft("config", "show", "--store", store).stderr


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
    # No agent answers: the leases are shown, one line says why, and the exit status is 3.
    assert proc.returncode == 3
    assert "198.19.7.0/24" in proc.stdout
    assert "198.18.0.7" in proc.stdout
    assert proc.stderr.splitlines() == [
        f"error: this host: no agent answers at {tmp_path / 'state' / 'agent.sock'}: "
        "is `weft agent` running?"]
    as_json = weft("status", "--json", "--store", store, "--state-dir", str(tmp_path))
    assert as_json.returncode == 3
    assert len(as_json.stderr.splitlines()) == 1
    data = json.loads(as_json.stdout)
    assert "is `weft agent` running?" in data["host"]["error"]
    (lease,) = data["leases"]
    assert lease["subnet"] == "198.19.7.0/24"
    assert 590 <= lease["expires_in"] <= 600


def test_bad_log_level_is_a_usage_error(tmp_path: Path) -> None:
    proc = weft("agent", "--store", f"sqlite://{tmp_path}/s.db", "--log-level", "loud")
    assert proc.returncode == 1
    assert "--log-level 'loud' is not a level" in proc.stderr


def test_doctor_without_an_agent_fails_its_checks_and_says_what_to_do(tmp_path: Path) -> None:
    """No agent and no subnet.env: those checks fail with their advice, the store (valid,
    empty) passes, what needs root to see is left out, and the exit status is 1."""
    store = f"sqlite://{tmp_path / 'store.db'}"
    cfg = '{"Network": "198.19.0.0/16", "Backend": {"Type": "vxlan"}}'
    assert weft("config", "set", "-", "--store", store, input=cfg).returncode == 0
    proc = weft("doctor", "--json", "--store", store, "--state-dir", str(tmp_path / "state"),
                "--subnet-file", str(tmp_path / "subnet.env"))
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"] is False
    assert checks["agent"]["result"] == "fail"
    assert "start it (`systemctl start weft`)" in checks["agent"]["message"]
    assert checks["subnet.env"]["result"] == "fail"
    assert checks["store"] == {"name": "store", "result": "pass",
                               "message": "reachable, config valid, 0 leases"}
    assert {c["result"] for c in report["checks"]} <= {"pass", "warn", "fail"}
    # A store path with nothing there: the store check fails, and no store is made.
    missing = tmp_path / "no" / "store.db"
    proc = weft("doctor", "--json", "--store", f"sqlite://{missing}", "--state-dir",
                str(tmp_path / "state"), "--subnet-file", str(tmp_path / "subnet.env"))
    store_check = next(c for c in json.loads(proc.stdout)["checks"] if c["name"] == "store")
    assert store_check["result"] == "fail"
    assert "no store there" in store_check["message"]
    assert not (tmp_path / "no").exists()


def test_reading_commands_do_not_create_a_store_where_none_is(tmp_path: Path) -> None:
    """`weft status` and `weft config show` only read: a mistyped store path is an error,
    not a new empty store (and directories) made where none was."""
    missing = tmp_path / "no" / "such" / "store.db"
    for argv in (["status", "--state-dir", str(tmp_path)], ["config", "show"]):
        proc = weft(*argv, "--store", f"sqlite://{missing}")
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.splitlines() == [
            f"error: --store sqlite://{missing}: no store there (nothing to read); give the "
            "store the agents use, or run `weft config set` first"]
    assert not (tmp_path / "no").exists()
