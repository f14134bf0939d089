"""The package build: everything is in pyproject.toml but one step, weft's tc BPF program
compiled into the package when clang is on the build machine, so that a host without a
compiler runs the fast path (weft.host.fastpath says how the object reaches a host).
Without clang the package is built all the same, and the agent compiles the object at its
first start if it can, or runs the nftables path and says why."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
BPF = Path("weft") / "host" / "bpf"


class BuildPyWithBpf(build_py):
    def run(self) -> None:
        super().run()
        if shutil.which("clang") is None:
            print("clang not found: the package holds no fast path object; weft compiles "
                  "it at the agent's first start where clang is installed", file=sys.stderr)
            return
        sys.path.insert(0, str(HERE / "src"))
        from weft.host.fastpath import SOURCE, build_packaged

        # An editable install runs from the source tree: the object goes there (ignored by
        # git); a wheel gets it in its build directory.
        out = HERE / "src" / BPF if self.editable_mode else Path(self.build_lib) / BPF
        out.mkdir(parents=True, exist_ok=True)
        try:
            build_packaged(HERE / "src" / BPF / SOURCE, out)
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"the fast path object was not built ({exc}); weft compiles it at the "
                  "agent's first start where clang is installed", file=sys.stderr)


setup(cmdclass={"build_py": BuildPyWithBpf})
