"""pyroute2 without its package `__init__` until a name from it is asked for.

`import pyroute2.iproute.linux` runs `pyroute2/__init__.py` first, which imports every
part of the library (NDB, IPDB, nftables, nl80211, plan9, ...): most of an agent's start
on a quiet host (measured: a third of the import time of `weft agent`, which only needs
rtnetlink). `install` puts the package in `sys.modules` unexecuted: submodules import as
usual, and the first other name taken from the package (`from pyroute2 import IPRoute`)
runs its `__init__` then, so every user still gets the whole package it expects.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from typing import Any

_NAME = "pyroute2"


def install() -> None:
    if _NAME in sys.modules:
        return
    spec = importlib.util.find_spec(_NAME)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return  # not installed (or not a package): the import will say so itself
    module = importlib.util.module_from_spec(spec)
    loader = spec.loader
    # The hook stays until the __init__ has run whole: a thread asking for a name meanwhile
    # waits here for it, instead of reading a half-run package.
    lock = threading.RLock()
    loading = False

    def __getattr__(name: str) -> Any:  # PEP 562: the module's own attribute hook
        nonlocal loading
        if not name.startswith("__") and importlib.util.find_spec(f"{_NAME}.{name}"):
            return importlib.import_module(f"{_NAME}.{name}")  # a submodule: no more
        with lock:
            if loading:  # the __init__ itself asks for a name it has not bound yet
                raise AttributeError(f"partially initialized module {_NAME!r} has no {name!r}")
            if "__getattr__" in module.__dict__:
                loading = True
                try:
                    loader.exec_module(module)  # the whole package, as `import pyroute2`
                finally:
                    loading = False
                del module.__dict__["__getattr__"]
        return getattr(module, name)  # dunders too: __version__, __all__ are the package's

    module.__dict__["__getattr__"] = __getattr__
    sys.modules[_NAME] = module


def loaded(module: types.ModuleType) -> bool:
    """Whether the package's own `__init__` has run (for the tests)."""
    return "__getattr__" not in module.__dict__
