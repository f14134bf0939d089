"""The file watcher (`watch_files`): what an inotify event means, and a removed state dir
watched again even while a file in it is still held open (as the agent's lock is)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path

from asyncinotify import Mask

from weft.agent.triggers import file_event, watch_files

RUN = Path("/run/weft")
STATE = RUN / "state"
WATCHED = (RUN, STATE)


def test_a_watched_directory_removed_from_its_parent_means_watch_again() -> None:
    # The parent's DELETE is the one event sure to come at once: DELETE_SELF waits for the
    # last reference to the directory.
    assert file_event(Mask.DELETE | Mask.ISDIR, STATE, WATCHED) == (
        f"directory {STATE} removed", True)
    assert file_event(Mask.MOVED_FROM | Mask.ISDIR, STATE, WATCHED) == (
        f"directory {STATE} removed", True)
    assert file_event(Mask.DELETE_SELF, STATE, WATCHED) == (f"directory {STATE} removed", True)
    assert file_event(Mask.IGNORED, STATE, WATCHED) == (f"directory {STATE} removed", True)


def test_files_removed_or_written_wake_the_worker_and_keep_the_watches() -> None:
    lock = STATE / "agent.lock"
    assert file_event(Mask.DELETE, lock, WATCHED) == (f"{lock} removed", False)
    assert file_event(Mask.MOVED_TO, RUN / "subnet.env", WATCHED) == (
        f"{RUN / 'subnet.env'} written", False)
    assert file_event(Mask.CLOSE_WRITE, lock, WATCHED) == (f"{lock} written", False)
    # A directory of someone else's in a watched one: a removal, not ours to watch again.
    assert file_event(Mask.DELETE | Mask.ISDIR, RUN / "cni", WATCHED) == (
        f"{RUN / 'cni'} removed", False)
    assert file_event(Mask.CREATE, lock, WATCHED) == (None, False)


def test_state_dir_removed_with_a_file_held_open_is_watched_again(tmp_path: Path) -> None:
    run_dir, state = tmp_path, tmp_path / "state"
    state.mkdir()
    reasons: list[str] = []

    async def until_seen(reason: str, poke: Path | None = None) -> None:
        async with asyncio.timeout(5.0):
            while reason not in reasons:
                if poke is not None:
                    await asyncio.to_thread(poke.write_text, "x")  # until a watch sees it
                await asyncio.sleep(0.05)

    async def scenario() -> None:
        watcher = asyncio.create_task(watch_files(reasons.append, [run_dir, state]))
        try:
            await until_seen(f"{state / 'probe'} written", state / "probe")
            held = os.open(state / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                shutil.rmtree(state)
                await until_seen(f"directory {state} removed")
                state.mkdir()  # as the worker does
                await until_seen(f"{state / 'again'} written", state / "again")
            finally:
                os.close(held)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    asyncio.run(scenario())
