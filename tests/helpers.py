"""What the test modules share: waiting on a condition, and recording a figure a test measured.

A test never sleeps for a fixed time to let something happen, and never asserts how long
something took: it waits for the condition itself (`wait_for`), and a wait that runs out
fails with what it saw last. How long a recovery took is a figure for the docs, recorded
with `record_figure` (pytest's `record_property`), printed in a table at the end of the
run and, when WEFT_FIGURES names a file, written there as JSON (see conftest.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

FIGURE = "weft_figure"  # the user_properties name conftest.py collects


def wait_for(what: str, check: Callable[[], T], timeout: float = 30.0, *,
             interval: float = 0.1, seen: Callable[[], object] | None = None,
             ignore: tuple[type[Exception], ...] = ()) -> T:
    """Poll `check()` until it returns something truthy, and return that. After `timeout`
    seconds fail with `what` and what was seen last: `seen()` if given, else the last value
    `check()` returned (or the `ignore`d exception it raised: a status socket not up yet)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            last: object = check()
        except ignore as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last  # type: ignore[return-value]
        if time.monotonic() > deadline:
            shown = seen() if seen is not None else last
            raise AssertionError(f"waited {timeout:g} s for {what}; last seen: {shown!r}")
        time.sleep(interval)


async def await_for(what: str, check: Callable[[], Awaitable[T]], within: float = 30.0, *,
                    interval: float = 0.1, ignore: tuple[type[Exception], ...] = ()) -> T:
    """`wait_for` for a coroutine check, inside an event loop (`within` seconds)."""
    deadline = time.monotonic() + within
    while True:
        try:
            last: object = await check()
        except ignore as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {within:g} s for {what}; last seen: {last!r}")
        await asyncio.sleep(interval)


def record_figure(record_property: Callable[[str, object], None], case: str,
                  seconds: float, **more: Any) -> None:
    """Keep a measured figure (say, how long a recovery took) for the report, not as a
    pass/fail bound: the test asserts the state and the traffic."""
    record_property(FIGURE, {"case": case, "seconds": round(seconds, 3), **more})
