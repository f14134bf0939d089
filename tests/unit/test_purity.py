"""The one I/O boundary, checked: pure modules import nothing that does I/O or reads the
clock, directly or through another weft module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
WEFT = SRC / "weft"
FORBIDDEN = frozenset({
    "socket", "asyncio", "subprocess", "pyroute2", "time", "select", "fcntl", "threading",
    "aetcd", "grpc", "sqlite3", "os", "shutil", "signal",
})
PURE = sorted(
    [*(WEFT / "core").glob("*.py"), *WEFT.glob("backends/*/plan.py"),
     WEFT / "backends" / "udp" / "codec.py", WEFT / "backends" / "auto" / "wire.py",
     WEFT / "host" / "ingress_rules.py", WEFT / "agent" / "peer_health.py",
     WEFT / "agent" / "doctor.py"]
)


def _module_file(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _closure(path: Path) -> dict[str, str]:
    """Every outside module `path` reaches through weft's own imports -> who imports it."""
    seen: set[Path] = set()
    reached: dict[str, str] = {}
    todo = [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for name in _imports(current):
            if name.split(".")[0] == "weft":
                target = _module_file(name)
                if target is not None:
                    todo.append(target)
            else:
                reached.setdefault(name.split(".")[0], str(current.relative_to(SRC)))
    return reached


@pytest.mark.parametrize("path", PURE, ids=lambda p: str(p.relative_to(WEFT)))
def test_pure_module_imports_no_io(path: Path) -> None:
    bad = {name: via for name, via in _closure(path).items() if name in FORBIDDEN}
    assert not bad, f"{path.relative_to(SRC)} reaches I/O modules: {bad}"


def test_every_backend_package_has_a_plan() -> None:
    packages = [p for p in (WEFT / "backends").iterdir() if (p / "__init__.py").exists()]
    assert packages
    assert [p.name for p in packages if not (p / "plan.py").exists()] == []


# --- the CNI handler is pure: everything that touches the host is injected (moved from
# tests/netns/test_cni.py, where the plugins' absence skipped it with the module) ---

IO_MODULES = {"subprocess", "socket", "asyncio", "pyroute2", "os", "time", "pathlib",
              "tempfile", "shutil"}


@pytest.mark.parametrize("module", ["weft.integrations.cni.handler", "weft.integrations.cni.spec"])
def test_pure_modules_import_no_io(module: str) -> None:
    import importlib

    source = Path(importlib.import_module(module).__file__ or "").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & IO_MODULES, imported & IO_MODULES
