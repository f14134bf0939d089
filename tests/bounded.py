"""Running one coroutine from a synchronous test, with a bound on how long it may take."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any


def run(coro: Awaitable[Any], timeout: float = 120.0) -> Any:
    """asyncio.run(coro), failing with TimeoutError after `timeout` seconds: a store call
    that hangs must fail the test, not stall the suite."""

    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())
