"""Who can reach the store and the secrets on a host: the store is root's alone while
agents keep renewing, and an etcd password never shows in any process's command line."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
from data_planes import DATA_PLANES, check_data_plane

from weft_lab.testbed import Testbed

pytestmark = pytest.mark.netns

NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
# As user nobody: read the store (config, PSK), or take a read lock on it.
TRY_STORE = """
import sqlite3, sys
for name in sys.argv[1:]:
    try:
        open(name, "rb").read(1)
        print("read", name)
    except OSError as exc:
        print("refused", name, exc.errno)
try:
    db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True, timeout=1)
    db.execute("BEGIN"); db.execute("SELECT * FROM meta").fetchall()
    print("locked")
except sqlite3.Error as exc:
    print("refused lock", exc)
"""


def renewals(tb: Testbed) -> int:
    return sum(tb.agent_log(h).count("lease renewed") for h in tb.hosts)


@pytest.mark.parametrize("plane", list(DATA_PLANES))
def test_an_unprivileged_user_cannot_read_or_lock_the_store_while_agents_renew(
        plane: str) -> None:
    with Testbed(hosts=2, containers_per_host=0, lease_ttl=4,
                 agent_args=DATA_PLANES[plane]) as tb:
        tb.start()
        check_data_plane(tb, plane)
        db = Path(tb.store_url.removeprefix("sqlite://"))
        files = [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]
        for f in files:  # private from creation, whatever the directory allows
            assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f
        assert stat.S_IMODE(os.stat(db.parent).st_mode) == 0o700
        before = renewals(tb)
        proc = tb.run(tb.underlay, [*NOBODY, "/usr/bin/python3", "-c", TRY_STORE,
                                    *map(str, files)])
        assert "read " not in proc.stdout, proc.stdout
        assert "locked" not in proc.stdout, proc.stdout
        assert proc.stdout.count("refused /") == 3
        assert "refused lock" in proc.stdout
        deadline = time.monotonic() + 15  # renewing every 2 s (TTL 4 s)
        while renewals(tb) < before + 4:
            assert time.monotonic() < deadline, tb.agent_log(tb.hosts[0])[-2000:]
            time.sleep(0.2)
        tb.wait_converged(10)


def test_the_etcd_password_never_appears_in_a_command_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    password = "weft-test-" + os.urandom(6).hex()
    secret = tmp_path / "etcd-password"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    # The documented way: the file's path in the environment, the user on the command line.
    monkeypatch.setenv("WEFT_ETCD_PASSWORD_FILE", str(secret))
    with Testbed(hosts=1, containers_per_host=0) as tb:
        host = tb.hosts[0]
        # No etcd answers there: the agent keeps retrying, password in hand.
        tb.start_agent(host, ["--store", "etcds://198.18.0.1:9", "--etcd-username", "weft"])
        deadline = time.monotonic() + 20
        while "store unavailable" not in tb.agent_log(host):
            assert host.agent is not None
            assert host.agent.poll() is None, tb.agent_log(host)
            assert time.monotonic() < deadline, tb.agent_log(host)
            time.sleep(0.2)
        seen = 0
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    cmdline = (proc / "cmdline").read_bytes()
                except OSError:
                    continue
                seen += 1
                assert password.encode() not in cmdline, proc
        assert seen > 1
        assert password not in tb.agent_log(host)
