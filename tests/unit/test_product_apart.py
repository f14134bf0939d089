"""The product installs apart from the lab: an agent host needs neither `weft_lab` nor
matplotlib. Each command runs in a fresh interpreter where both cannot be imported, as on
a host that installed `pip install .` alone."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys

# A meta-path finder that refuses the lab and its plotting library, then runs the entry
# point named by argv[1] ("cli" or "cni") with the rest of argv.
BLOCKED_RUN = """
import sys
BLOCKED = ("weft_lab", "matplotlib")
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Blocker())
which, sys.argv = sys.argv[1], ["weft", *sys.argv[2:]]
if which == "cli":
    from weft.cli import main
else:
    from weft.integrations.cni.plugin import main
main()
"""


def run_without_lab(which: str, *args: str, env: dict[str, str] | None = None,
                    stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCKED_RUN, which, *args], input=stdin,
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


def requirement_names(dist: str) -> set[str]:
    return {re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0].lower()
            for r in importlib.metadata.requires(dist) or []}


def test_the_product_does_not_require_the_lab_or_matplotlib() -> None:
    names = requirement_names("weft")
    assert "matplotlib" not in names
    assert "weft-lab" not in names
    # ... while the lab brings them (the README's set-up installs both).
    assert {"weft", "matplotlib"} <= requirement_names("weft-lab")


def test_agent_help_runs_without_the_lab() -> None:
    proc = run_without_lab("cli", "agent", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--store" in proc.stdout


def test_cni_plugin_version_runs_without_the_lab() -> None:
    proc = run_without_lab("cni", env={"CNI_COMMAND": "VERSION"})
    assert proc.returncode == 0, proc.stderr
    assert "1.0.0" in json.loads(proc.stdout)["supportedVersions"]


def test_lab_commands_say_the_lab_is_missing_in_one_line() -> None:
    for args in (["demo"], ["bench"], ["bench", "scale"], ["testbed", "down"]):
        proc = run_without_lab("cli", *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, (args, proc.stderr)
        assert "the lab is not installed: pip install ./lab" in lines[0]
