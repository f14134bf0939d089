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


def _run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=False, timeout=60)


RACE = """
import threading
import weft
import pyroute2
errors = []
barrier = threading.Barrier(4)
def take():
    barrier.wait()
    try:
        getattr(pyroute2, "WireGuard")
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=take) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(errors)
"""


def test_threads_asking_for_a_name_at_once_all_get_it() -> None:
    """Found in review: the first thread deletes the hook, then runs the package __init__ (0.15 s)
    unlocked: a second thread gets KeyError('__getattr__') or an AttributeError for a
    name the half-run __init__ has not bound yet (the agent imports in to_thread)."""
    out = _run(RACE)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_package_dunders_are_those_of_the_whole_package() -> None:
    """Found in review: `pyroute2.__version__` (and `__all__`, so `from pyroute2 import *`) raise
    AttributeError or come out empty: names starting with "__" never run the __init__."""
    out = _run("import weft, pyroute2; print(pyroute2.__version__, len(pyroute2.__all__))")
    assert out.returncode == 0, out.stderr
    version, names = out.stdout.split()
    assert version != "unknown"
    assert int(names) > 10
