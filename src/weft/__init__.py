"""weft: a fast overlay network for containers."""

__version__ = "0.1.0"

from weft import lazy_pyroute2

lazy_pyroute2.install()
