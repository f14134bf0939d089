"""The rooms' one direction of dependency, checked on every import of every module:

    core <- store, host <- backends <- integrations <- agent <- lab, cli

core imports nothing of weft above it; store imports core; host imports core (store and
host never import each other); backends import core and host; integrations import core,
store, host and backends; agent imports those and integrations; lab and cli import
anything. Imports inside functions and `TYPE_CHECKING` blocks count: an arrow never points
up, not even where it is only taken late.

And the facts rule: outside `weft.backends` nothing asks which backend a host runs — no
backend options class is named and no backend type name is used as a value (each backend
declares its facts in its package, `weft.backends.base.BackendFacts`).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from weft.backends.registry import BACKENDS

REPO = Path(__file__).resolve().parents[2]
# Where the packages live: src/ today; the lab may move to a distribution of its own.
ROOTS = [root for root in (REPO / "src", REPO / "lab", REPO / "lab" / "src") if root.is_dir()]
PACKAGES = ("weft", "weft_lab")

# Each module's room, by the longest matching name.
ROOMS = {
    "weft": "top", "weft.__main__": "top", "weft.cli": "cli",
    "weft.core": "core", "weft.store": "store",
    "weft.host": "host", "weft.lazy_pyroute2": "host",
    "weft.backends": "backends", "weft.integrations": "integrations", "weft.agent": "agent",
    "weft.lab": "lab", "weft_lab": "lab",
}
BELOW_AGENT = {"core", "store", "host", "backends", "integrations"}
ANYTHING = {*BELOW_AGENT, "agent", "lab", "cli", "top"}
MAY_IMPORT = {
    "core": {"core"},
    "store": {"core", "store"},
    "host": {"core", "host"},
    "backends": {"core", "host", "backends"},
    "integrations": BELOW_AGENT,
    "agent": {*BELOW_AGENT, "agent"},
    "lab": ANYTHING, "cli": ANYTHING, "top": ANYTHING,
}
# (module, what it imports) across a layer, while one is being removed; none now (the
# trust branch took store.sqlite -> host.files away).
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for root in ROOTS:
        for package in PACKAGES:
            for path in sorted((root / package).rglob("*.py")):
                parts = list(path.relative_to(root).with_suffix("").parts)
                if parts[-1] == "__init__":
                    parts.pop()
                found[".".join(parts)] = path
    return found


MODULES = _modules()


def room(module: str) -> str | None:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if (name := ".".join(parts[:end])) in ROOMS:
            return ROOMS[name]
    return None


def _ours(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


def imports(module: str, path: Path) -> Iterator[tuple[int, str]]:
    """(line, module imported) for every import of weft's own modules in `path`, wherever
    it stands; relative imports resolved, `from a import b` taken as `a.b` when that is a
    module, and `importlib.import_module("...")` with a literal name counted too."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[:len(package) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield node.lineno, sub if sub in MODULES else base
        elif isinstance(node, ast.Call) and node.args and isinstance(
                node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__"):
                yield node.lineno, node.args[0].value


def _where(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_every_module_has_a_room() -> None:
    assert "weft.core.config" in MODULES  # the walk found the source
    homeless = [name for name in MODULES if room(name) is None]
    assert not homeless, f"no room for {homeless}: add each to ROOMS"


def test_no_import_points_up() -> None:
    violations: set[str] = set()
    excepted: set[tuple[str, str]] = set()
    for module, path in MODULES.items():
        mine = room(module)
        if mine is None:
            continue
        for line, target in imports(module, path):
            if not _ours(target):
                continue
            theirs = room(target)
            if theirs in MAY_IMPORT[mine]:
                continue
            if (module, target) in KNOWN_EXCEPTIONS:
                excepted.add((module, target))
                continue
            violations.add(f"{_where(path)}:{line} -> {target} ({mine} may import "
                           f"{', '.join(sorted(MAY_IMPORT[mine]))}; not {theirs})")
    assert not violations, "imports that point up:\n" + "\n".join(sorted(violations))
    # An exception that no longer happens is taken off the list, so it cannot come back.
    assert excepted == KNOWN_EXCEPTIONS, f"no longer needed: {KNOWN_EXCEPTIONS - excepted}"


def test_the_checker_sees_late_relative_and_type_checking_imports(tmp_path: Path) -> None:
    core = tmp_path / "weft" / "core"
    core.mkdir(parents=True)
    (core / "x.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from weft.agent import daemon\n"
        "def f():\n    from ..backends import registry\n    from . import lease\n")
    found = {target for _, target in imports("weft.core.x", core / "x.py")}
    assert {"weft.agent.daemon", "weft.core.lease"} <= found
    assert "weft.backends.registry" in found
    assert {room(t) for t in found if _ours(t)} - MAY_IMPORT["core"] == {"agent", "backends"}


# --- backend facts, not backend types -------------------------------------------------

OPTIONS_CLASSES = frozenset(spec.options.__name__ for spec in BACKENDS.values())
TYPE_NAMES = frozenset(BACKENDS)
# Type names that are also ordinary words elsewhere ("auto" is a conntrack mode and a
# WireGuard implementation too): refused only where they stand for a backend's Type.
WORDS = frozenset({"auto"})
_TYPE_CONTEXT = re.compile(r"(?i)\btype\b|backend_?type")


def _docstrings(tree: ast.AST) -> set[int]:
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _as_type(node: ast.Constant, parent: ast.AST) -> bool:
    """Whether `node` stands for a backend's Type: compared with a type, the value of a
    `Type`/`BackendType` key, or an argument beside one (`data.get("Type", "auto")`)."""
    if isinstance(parent, ast.Compare | ast.Call):
        return bool(_TYPE_CONTEXT.search(ast.unparse(parent)))
    if isinstance(parent, ast.Dict):
        keys = [k for k, v in zip(parent.keys, parent.values, strict=True) if v is node]
        return any(isinstance(k, ast.Constant) and k.value in ("Type", "BackendType")
                   for k in keys)
    if isinstance(parent, ast.keyword):
        return bool(parent.arg and _TYPE_CONTEXT.search(parent.arg))
    return False


def backend_knowledge(path: Path) -> Iterator[tuple[int, str]]:
    """(line, what) for each place `path` names a backend's options class or uses a
    backend type name as a value. Docstrings and comments are prose, not checked."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = _docstrings(tree)
    parents = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name in OPTIONS_CLASSES:
                    yield node.lineno, f"imports {alias.name}"
        elif isinstance(node, ast.Name | ast.Attribute):
            name = node.id if isinstance(node, ast.Name) else node.attr
            if name in OPTIONS_CLASSES:
                yield node.lineno, f"names {name}"
        elif (isinstance(node, ast.Constant) and node.value in TYPE_NAMES
              and id(node) not in docstrings
              and (node.value not in WORDS or _as_type(node, parents[id(node)]))):
            yield node.lineno, f"backend type {node.value!r}"


def _product_modules() -> list[Path]:
    # backends/ is where backend knowledge lives (the registry's keys among it); the lab
    # is the bench, which names backends by design.
    return [path for name, path in MODULES.items()
            if room(name) not in ("backends", "lab") and name.startswith("weft")]


@pytest.mark.parametrize("path", _product_modules(), ids=_where)
def test_only_backends_know_which_backend_runs(path: Path) -> None:
    found = [f"{_where(path)}:{line} {what}" for line, what in backend_knowledge(path)]
    assert not found, "ask the backend's facts instead:\n" + "\n".join(found)


def test_the_facts_checker_sees_type_checks(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text(
        '"""vxlan"""\n'
        "from weft.backends.udp.options import UdpOptions\n"
        "mode = 'auto'\n"  # a conntrack mode: a word, not a type
        "def f(config, data):\n"
        "    '''auto'''\n"
        "    if config.backend.type == 'auto': pass\n"
        "    isinstance(config.backend, UdpOptions)\n"
        "    return data.get('Type', 'vxlan'), {'Type': 'auto'}, data.get('Type', 'auto')\n")
    assert sorted(backend_knowledge(path)) == [
        (2, "imports UdpOptions"), (6, "backend type 'auto'"), (7, "names UdpOptions"),
        (8, "backend type 'auto'"), (8, "backend type 'auto'"), (8, "backend type 'vxlan'")]
