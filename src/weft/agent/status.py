"""The agent's status socket: one JSON line per connection, root-only (0600)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from weft.core.errors import UsageError

STATUS_SOCKET = "agent.sock"


async def serve_status(path: Path,
                       status: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    """Answer every connection with `status()` until cancelled."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a socket a crashed run left

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(json.dumps(await status()).encode() + b"\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(answer, path=str(path))
    os.chmod(path, 0o600)
    async with server:
        await server.serve_forever()


async def serve_status_anew(path: Path, status: Callable[[], Awaitable[dict[str, Any]]],
                            restart: asyncio.Event) -> None:
    """Serve the status socket; serve it anew whenever `restart` is set (the socket was
    removed under us). A server that fails (its directory gone) waits for that too."""

    async def serve() -> None:
        with contextlib.suppress(OSError):
            await serve_status(path, status)

    while True:
        restart.clear()
        async with asyncio.TaskGroup() as tg:
            server = tg.create_task(serve())
            await restart.wait()
            server.cancel()


async def query_status(state_dir: Path) -> dict[str, Any]:
    """Ask a running agent for its status over its unix socket."""
    path = state_dir / STATUS_SOCKET
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        raise UsageError(f"no agent answers at {path}: is `weft agent` running?") from None
    # To the end, not one line under asyncio's 64 KiB line limit: with a row per peer, a
    # host with 1,000 peers answers with more than that (the agent closes after its line).
    data = await reader.read()
    writer.close()
    result: dict[str, Any] = json.loads(data)
    return result
