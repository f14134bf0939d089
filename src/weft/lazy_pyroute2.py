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

    def __getattr__(name: str) -> Any:  # PEP 562: the module's own attribute hook
        if name.startswith("__"):
            raise AttributeError(name)
        if importlib.util.find_spec(f"{_NAME}.{name}") is not None:
            return importlib.import_module(f"{_NAME}.{name}")  # a submodule: no more
        del module.__dict__["__getattr__"]
        loader.exec_module(module)  # the whole package, as `import pyroute2` gives it
        return getattr(module, name)

    module.__dict__["__getattr__"] = __getattr__
    sys.modules[_NAME] = module


def loaded(module: types.ModuleType) -> bool:
    """Whether the package's own `__init__` has run (for the tests)."""
    return "__getattr__" not in module.__dict__
