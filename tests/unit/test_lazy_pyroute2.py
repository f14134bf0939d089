"""pyroute2's package `__init__` (every part of the library) runs only when a name from it
is asked for: the agent's rtnetlink imports skip it; any other user gets the whole package."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
import weft.agent.daemon
import pyroute2
from weft import lazy_pyroute2
assert not lazy_pyroute2.loaded(pyroute2), "the package __init__ ran"
assert "pyroute2.ndb.main" not in sys.modules and "pyroute2.ipdb" not in sys.modules
from pyroute2 import config  # a submodule: still no __init__
assert not lazy_pyroute2.loaded(pyroute2)
from pyroute2 import NDB, IPRoute, WireGuard  # names of the package: now it runs
from pyroute2.iproute.linux import IPRoute as Same
assert lazy_pyroute2.loaded(pyroute2) and IPRoute is Same and "pyroute2.ndb.main" in sys.modules
print("ok")
"""


def test_the_package_init_runs_only_when_a_name_of_it_is_asked_for() -> None:
    # A fresh interpreter: this one may have imported pyroute2 whole already.
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         check=False, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
