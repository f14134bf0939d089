"""One retry policy for every part of the agent: back off with jitter; the store being down
is never fatal, nor, for a running agent, the store refusing it (said in a notice); a
change watcher that fails is restarted.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from weft.agent.health import Health, Notice
from weft.core.errors import (
    LeaseNotFound,
    NetworkFull,
    StoreError,
    StoreUnavailable,
    WatchCompacted,
)

log = logging.getLogger("weft.agent")
T = TypeVar("T")


@dataclass
class Backoff:
    """Exponential backoff with jitter for retries (pure but for the sleep)."""

    initial: float = 0.5
    cap: float = 15.0
    current: float = field(default=0.0, init=False)

    def next(self) -> float:
        self.current = min(self.cap, self.current * 2 if self.current else self.initial)
        return self.current * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.current = 0.0


class StoreRetry:
    """How the agent meets a store that fails: `call` retries, `refused` says so."""

    def __init__(self, health: Health, count_error: Callable[[], None]) -> None:
        self._health = health
        self._count_error = count_error  # the metrics' failed store operations

    async def call(self, what: str, op: Callable[[], Awaitable[T]], *,
                   refusals: Notice | None = None, cap: float | None = None) -> T:
        """Run a store operation until it succeeds; the store being down is not fatal, nor,
        for a running agent, the store refusing it: then `refusals` names the notice that
        says so (see `refused`). What the store answers (a lease gone, a network full, a
        compacted history) is the caller's. `cap` bounds the backoff (a lease that must
        be taken back before peers act on its end)."""
        backoff = Backoff() if cap is None else Backoff(initial=min(0.5, cap), cap=cap)
        while True:
            try:
                result = await op()
            except StoreUnavailable as exc:
                self._count_error()
                delay = backoff.next()
                log.warning("store unavailable; retrying",
                            extra={"op": what, "error": str(exc), "retry_in": round(delay, 2)})
                await asyncio.sleep(delay)
            except (LeaseNotFound, NetworkFull, WatchCompacted):
                raise
            except StoreError as exc:
                if refusals is None:
                    raise
                self.refused(refusals, what, exc)
                await asyncio.sleep(backoff.next())
            else:
                if refusals is not None:
                    self._health.clear(refusals)
                return result

    def unavailable(self) -> None:
        """A failed store operation the caller retries in its own way."""
        self._count_error()

    def refused(self, notice: Notice, what: str, exc: StoreError) -> None:
        """The store refused a running agent (its permissions changed, say). Stopping would
        let this host's lease run out with nobody left to take it back, so the subnet and
        the data plane stay and the caller asks again; `weft status` says so, and the log
        does when the refusal is new or changes (a refusal answers at once: no log flood)."""
        self._count_error()
        if self._health.notice(notice, f"the store refuses this host's {what}: {exc}"):
            log.error("store refused; retrying", extra={"op": what, "error": str(exc)})


async def restarting(name: str, watcher: Callable[[], Awaitable[None]],
                     missed: Callable[[str], None] | None = None) -> None:
    """A change watcher that fails is restarted; what changed while it was down is not
    waited for until the next resync: `missed` asks for a pass as it restarts."""
    backoff = Backoff(initial=1.0, cap=30.0)
    while True:
        try:
            await watcher()
            return
        except Exception as exc:
            delay = backoff.next()
            log.warning("change watcher failed; restarting it",
                        extra={"watcher": name, "error": repr(exc),
                               "retry_in": round(delay, 2)})
            await asyncio.sleep(delay)
            if missed is not None:
                missed(f"{name} watcher restarted")
