"""Container runtimes for the testbed: how a testbed container comes to exist.

    netns    a bare network namespace attached by weft-cni (weft_lab.testbed itself)
    docker   a real dockerd per host, configured from `weft docker-opts` (docker.py)
    podman   real podman containers on `--network weft`, i.e. weft-cni (podman.py)

Each runtime keeps what it starts under the host's run directory and in cgroups named
after the run, so `weft testbed down` can find and remove it after a crash (cleanup.py).
"""

RUNTIMES = ("netns", "docker", "podman")
