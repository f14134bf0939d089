"""The agent's one health record and its one retry policy: what `weft status` shows, what
is logged once, what a refusing or absent store does to a running agent."""

from __future__ import annotations

import logging

import pytest

from bounded import run
from weft.agent.health import Health, Notice, Part
from weft.agent.retry import Backoff, StoreRetry, restarting
from weft.core.errors import LeaseNotFound, StoreError, StoreUnavailable


def test_status_shows_every_error_and_notice_by_its_old_keys() -> None:
    rejected = {"/weft/subnets/bad-key": "not a subnet key"}
    health = Health(lambda: rejected)
    health.notice(Notice.STORE_WATCH, "refused")
    health.host = {"files": "read-only"}
    health.backend_replaced({"198.19.2.0/24": "no route"})
    health.data_plane[Part.INGRESS] = "nft failed"
    health.publish({"198.19.9.0/24": "VtepMAC 'zz'"})
    assert health.status() == {
        "errors": {"/weft/subnets/bad-key": "not a subnet key",
                   "198.19.9.0/24": "VtepMAC 'zz'", "198.19.2.0/24": "no route",
                   "ingress": "nft failed"},
        "host_errors": {"files": "read-only"},
        "notices": {"store_watch": "refused"},
    }


def test_a_full_pass_keeps_only_the_ingress_error_an_update_only_its_peers() -> None:
    health = Health()
    health.backend_replaced({"198.19.2.0/24": "a", "198.19.3.0/24": "b"})
    health.data_plane.update({Part.INGRESS: "i", Part.FASTPATH: "f", Part.RECONCILE: "r"})
    health.backend_updated(["198.19.2.0/24"], {"198.19.4.0/24": "c"})
    assert health.backend == {"198.19.3.0/24": "b", "198.19.4.0/24": "c"}
    assert health.data_plane == {Part.INGRESS: "i", Part.FASTPATH: "f"}
    health.backend_replaced({})
    assert health.backend == {}
    assert health.data_plane == {Part.INGRESS: "i"}


def test_a_peer_error_is_logged_when_it_appears_changes_and_clears(
        caplog: pytest.LogCaptureFixture) -> None:
    health = Health()
    caplog.set_level(logging.INFO, "weft.agent")
    assert health.publish({"198.19.9.0/24": "bad"}) == 1
    assert health.publish({"198.19.9.0/24": "bad"}) == 0
    assert health.publish({"198.19.9.0/24": "worse"}) == 0
    assert health.publish({}) == 0
    assert [r.getMessage() for r in caplog.records] == [
        "peer not usable", "peer not usable", "peer error cleared"]


def test_a_notice_says_whether_it_is_new_and_whether_it_was_set() -> None:
    health = Health()
    assert health.notice(Notice.CONFIG, "changed")
    assert not health.notice(Notice.CONFIG, "changed")
    assert health.notice(Notice.CONFIG, "invalid")
    assert health.clear(Notice.CONFIG)
    assert not health.clear(Notice.CONFIG)


def test_backoff_doubles_to_its_cap_with_jitter_and_resets() -> None:
    backoff = Backoff(initial=1.0, cap=4.0)
    steps = [backoff.next() for _ in range(4)]
    for step, base in zip(steps, [1.0, 2.0, 4.0, 4.0], strict=True):
        assert 0.8 * base <= step <= 1.2 * base
    backoff.reset()
    assert backoff.next() <= 1.2


class FlakyOp:
    def __init__(self, *failures: Exception) -> None:
        self.failures = list(failures)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "done"


def fast_retry(health: Health) -> tuple[StoreRetry, list[int]]:
    errors: list[int] = []
    return StoreRetry(health, lambda: errors.append(1)), errors


def test_an_absent_store_is_retried_and_a_refusal_is_a_notice_until_it_passes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Backoff, "next", lambda self: 0.0)
    health = Health()
    retry, errors = fast_retry(health)
    op = FlakyOp(StoreUnavailable("down"), StoreError("permission denied"))
    seen: list[dict[str, str]] = []

    async def spy() -> str:  # the notices as each attempt starts
        seen.append(health.status()["notices"])
        return await op()

    assert run(retry.call("lease renewal", spy, refusals=Notice.STORE)) == "done"
    assert op.calls == 3
    assert len(errors) == 2
    assert seen[2] == {"store": "the store refuses this host's lease renewal: "
                                "permission denied"}
    assert health.status()["notices"] == {}  # cleared by the success


def test_without_refusals_a_refusal_and_the_stores_answers_are_the_callers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Backoff, "next", lambda self: 0.0)
    retry, _ = fast_retry(Health())
    with pytest.raises(StoreError):
        run(retry.call("get config", FlakyOp(StoreError("no"))))
    with pytest.raises(LeaseNotFound):
        run(retry.call("renew", FlakyOp(LeaseNotFound("gone")), refusals=Notice.STORE))


def test_a_failed_watcher_is_restarted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Backoff, "next", lambda self: 0.0)
    op = FlakyOp(OSError("nft exited"), OSError("nft exited"))

    async def watcher() -> None:
        await op()

    asked: list[str] = []
    run(restarting("netfilter events", watcher, asked.append), timeout=10)
    assert op.calls == 3
    # What changed while it was down asks for a pass at each restart.
    assert asked == ["netfilter events watcher restarted"] * 2
