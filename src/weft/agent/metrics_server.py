"""The metrics endpoint: prometheus-client's handler behind a server with bounds.

prometheus-client's own server starts a thread per connection with no limit and no
timeout: 1,000 idle connections made 890 threads and slowed `weft status` to 2 s. Here a
few worker threads serve at most `MAX_CONNECTIONS` connections at once (one more is closed
at once), and a connection that sends no request for `IDLE_TIMEOUT` seconds is closed.

The socket is bound when the server is made (before the agent takes a lease: an address
the host lacks, or a port in use, is a one-line error before anything changes); serving
starts later.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import HTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import MetricsHandler

from weft.core.errors import UsageError

WORKERS = 4
MAX_CONNECTIONS = 16  # served or waiting for a worker
IDLE_TIMEOUT = 2.0  # seconds a connection may take to send its request (and between reads)


class _BoundedServer(HTTPServer):
    def __init__(self, address: tuple[str, int], handler: type[MetricsHandler],
                 family: socket.AddressFamily) -> None:
        self.address_family = family
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="weft-metrics")
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # over the cap: closed, not queued
            return
        self._pool.submit(self._serve, request, client_address)

    def _serve(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away mid-answer: nothing to say (no traceback on stderr)

    def server_close(self) -> None:
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)


class MetricsServer:
    """Bound at once (UsageError naming --metrics-addr if it cannot be); `start` serves in
    a thread of its own; `close` stops."""

    def __init__(self, addr: str, registry: CollectorRegistry) -> None:
        host, _, port = addr.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        handler = type("WeftMetricsHandler", (MetricsHandler.factory(registry),),
                       {"timeout": IDLE_TIMEOUT})
        try:
            self._server = _BoundedServer((host, int(port)), handler, family)
        except OSError as exc:
            raise UsageError(f"--metrics-addr {addr}: cannot listen there "
                             f"({exc.strerror or exc}); choose an address of this host and a "
                             "free port") from None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="weft-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
        with contextlib.suppress(OSError):
            self._server.server_close()
