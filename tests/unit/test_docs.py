"""The README and docs/ name only what exists: every module path, every `weft` command and
the flags given to it, every relative link (and its #anchor), and docs/bench holds only the
results a page cites. The old README drifted (it named a module that never existed), so
the names are checked, not trusted."""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer

from weft.cli import app

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BENCH = ROOT / "docs" / "bench"

# Named by the docs ahead of the code: other branches of issue 24 (and 26) are adding them.
# Each must not exist yet; once it does, its test fails until it is taken out of here.
PENDING_COMMANDS: set[str] = set()
PENDING_MODULES: set[str] = set()
PENDING_ANCHORS: set[tuple[str, str]] = set()  # (page, anchor) another branch will add

# Flags of other programs that the docs show in inline code on their own.
OTHER_FLAGS = {
    "--bip", "--mtu", "--live-restore", "--fixed-cidr-v6",  # dockerd
    "--client-cert-auth",  # etcd
    "--no-install-recommends",  # apt-get
}

# Dotted names that look like modules but are devices or files.
NOT_MODULES = re.compile(r"weft\.(vx\d*|udp\d+|wg\d+(v6)?(\.sock)?|service|conf)")
MODULE = re.compile(r"(?<![\w./-])(weft_lab(?:\.[A-Za-z_]\w*)*|weft(?:\.[A-Za-z_]\w*)+)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
STOP = {"|", "||", "&&", ";", "&"}
ROOT_COMMAND = typer.main.get_command(app)


def _subcommands(command: Any) -> dict[str, Any]:
    """A group's commands by name ({} for a plain command). Typer vendors click, so its
    command classes are duck-typed here, not imported from a private module."""
    return dict(getattr(command, "commands", {}))


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _code(text: str) -> Iterator[str]:
    """Each line of code: fenced blocks (backslash continuations joined) and inline spans."""
    for block in FENCE.findall(text):
        body = block.split("\n", 1)[1].rsplit("```", 1)[0]
        yield from body.replace("\\\n", " ").splitlines()
    yield from INLINE.findall(FENCE.sub("", text))


def _invocations(line: str) -> Iterator[list[str]]:
    """The arguments after each `weft` in command position on a line of code (first, or
    after a shell operator, `sudo`, `exec` or `$(`; also by path, `.venv/bin/weft`, and as
    `ExecStart=/usr/local/bin/weft`), up to an operator, a comment or a redirection.
    Elsewhere (`table ip weft`, `etcdctl user add weft`) weft is a name, not the command."""
    tokens = line.split()
    for i, token in enumerate(tokens):
        program = token.removeprefix("$(").rsplit("=", 1)[-1].rsplit("/", 1)[-1]
        placed = i == 0 or tokens[i - 1] in STOP | {"sudo", "exec"} or token.startswith("$(")
        if program != "weft" or not placed:
            continue
        args: list[str] = []
        for arg in tokens[i + 1:]:
            if arg in STOP or arg.startswith(("#", "<", ">", "2>")):
                break
            args.append(arg.rstrip(")"))
            if arg.endswith(")"):
                break
        if args:
            yield args


def _options(command: Any) -> set[str]:
    names = {"--help"}
    for param in command.params:
        names |= set(param.opts) | set(param.secondary_opts)
    return names


def _check_invocation(args: list[str]) -> str | None:
    """Why `weft ARGS` names a command or flag that does not exist, or None."""
    command = ROOT_COMMAND
    path = ["weft"]
    rest = list(args)
    while rest and _subcommands(command) and not rest[0].startswith("-"):
        if rest[0] in PENDING_COMMANDS and command is ROOT_COMMAND:
            return None
        sub = _subcommands(command).get(rest[0])
        if sub is None:
            return f"`{' '.join(path)} {rest[0]}`: no such command"
        command, path, rest = sub, [*path, rest.pop(0)], rest
    switches = {name for param in command.params if getattr(param, "is_flag", False)
                for name in (*param.opts, *param.secondary_opts)}
    for arg in rest:
        if not arg.startswith("-") or arg == "-":
            continue
        name, equals, _ = arg.partition("=")
        if name not in _options(command):
            return f"`{' '.join(path)} {arg}`: no such option"
        if equals and name in switches:  # `--ip-masq=false`: typer refuses it
            return f"`{' '.join(path)} {arg}`: {name} takes no value"
    return None


def _all_flags() -> set[str]:
    found: set[str] = set()

    def walk(command: Any) -> None:
        found.update(_options(command))
        for sub in _subcommands(command).values():
            walk(sub)

    walk(ROOT_COMMAND)
    return found


def _resolves(dotted: str) -> bool:
    """A module, or an attribute of one, by that full dotted path."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        try:
            spec = importlib.util.find_spec(name)
        except (ModuleNotFoundError, ValueError):
            spec = None
        if spec is None:
            continue
        obj: object = importlib.import_module(name)
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", FENCE.sub("", page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def _links(page: Path) -> Iterator[str]:
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if not re.match(r"[a-z]+:", target):
            yield target


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_weft_command_and_flag_exists(page: Path) -> None:
    wrong = [problem for line in _code(page.read_text()) for args in _invocations(line)
             if (problem := _check_invocation(args))]
    assert not wrong, f"{_rel(page)} names what `weft` does not have: {wrong}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_flag_on_its_own_is_a_weft_flag(page: Path) -> None:
    flags = _all_flags() | OTHER_FLAGS
    wrong = sorted({span.split()[0].split("=")[0] for span in INLINE.findall(
        FENCE.sub("", page.read_text())) if span.startswith("--")} - flags)
    assert not wrong, f"{_rel(page)} names flags no weft command has: {wrong}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_module_path_exists(page: Path) -> None:
    names = {m for m in MODULE.findall(page.read_text()) if not NOT_MODULES.fullmatch(m)}
    wrong = sorted(n for n in names - PENDING_MODULES if not _resolves(n))
    assert not wrong, f"{_rel(page)} names modules that do not exist: {wrong}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_relative_link_points_at_a_file_and_heading(page: Path) -> None:
    def missing(target: str) -> bool:
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            return True
        return bool(anchor) and dest.suffix == ".md" and anchor not in _anchors(dest) and (
            (dest.name, anchor) not in PENDING_ANCHORS)

    wrong = [target for target in _links(page) if missing(target)]
    assert not wrong, f"{_rel(page)} links to what does not exist: {wrong}"


def test_docs_bench_holds_only_cited_results() -> None:
    cited = {(page.parent / target.partition("#")[0]).resolve()
             for page in PAGES for target in _links(page)}
    uncited = sorted(p.name for p in BENCH.iterdir() if p.resolve() not in cited)
    assert not uncited, f"docs/bench files no page cites (git rm them): {uncited}"


def test_pending_names_do_not_exist_yet() -> None:
    """When another branch lands one of these, take it out of PENDING_*: from then on the
    docs' use of it is checked like every other name."""
    landed = [f"weft {c}" for c in PENDING_COMMANDS if c in _subcommands(ROOT_COMMAND)]
    landed += [m for m in PENDING_MODULES if _resolves(m)]
    landed += [f"{page}#{anchor}" for page, anchor in PENDING_ANCHORS
               if anchor in _anchors(ROOT / "docs" / page)]
    assert not landed, f"landed, so no longer pending (remove from PENDING_*): {landed}"


def test_the_checks_catch_what_the_old_readme_got_wrong() -> None:
    assert not _resolves("weft.core.constants.overhead")
    assert _resolves("weft.backends.registry.overhead")
    assert _check_invocation(["agent", "--no-such-flag"]) is not None
    assert _check_invocation(["no-such-command"]) is not None
    assert _check_invocation(["agent", "--ip-masq=false"]) is not None
    assert _check_invocation(["agent", "--lease-ttl=60"]) is None
    assert _check_invocation(["bench", "scale", "--leases", "5"]) is None
    assert list(_invocations("nft delete table ip weft")) == []
    assert list(_invocations("ExecStart=/usr/local/bin/weft agent --iface eth1")) == [
        ["agent", "--iface", "eth1"]]
