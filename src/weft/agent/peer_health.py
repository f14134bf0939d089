"""Per-peer health from the probes, pure: when to probe whom, and what the answers say.

Every agent probes every peer through the data plane that carries its containers' traffic
(weft.agent.prober, the edge: sockets and a thread). This module holds everything that is
decided there, with time passed in, so it is tested without a clock or a socket:

    ProbePolicy    how often, how many packets a second at most, when a peer is down
    ProbeSchedule  which peers are due now: each peer every `interval(n)` seconds, spread
                   over the interval (never all at once), never more than the cap
    PeerRecord     one peer: reachable or not since when, RTT median/p99 and loss over a
                   window, the path MTU that passed, the plane
    HealthBook     every peer's record; transitions (down / back) for the log line

The rate is bounded whatever the number of peers: a probe is two datagrams (one full-size
with DF, one small), each peer is probed every `period` seconds while that stays under
`max_packets_per_second`, and less often beyond (5,000 peers at 200 packets/s: every 50 s).
A probe that missed is sent again at once (within the same cap) until the peer answers or
is unreachable, so a stopped peer shows within one interval and a few timeouts.
"""

from __future__ import annotations

import heapq
import math
import zlib
from collections import deque
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

K = TypeVar("K", bound=Hashable)

PACKETS_PER_PROBE = 2  # a full-size probe and a small one
State = Literal["unknown", "reachable", "unreachable"]


@dataclass(frozen=True)
class ProbePolicy:
    period: float = 2.0  # each peer at most this often
    max_packets_per_second: float = 200.0  # sent by this host, whatever the peer count
    timeout: float = 1.0  # an answer later than this is a miss
    misses: int = 3  # consecutive misses that make a peer unreachable
    window: int = 30  # probes the RTT and loss are computed over

    def interval(self, peers: int) -> float:
        """Seconds between two probes of one peer, with `peers` peers to probe."""
        return max(self.period, peers * PACKETS_PER_PROBE / self.max_packets_per_second)

    def detection_bound(self, peers: int) -> float:
        """At most this long from a peer's agent stopping to the peer shown unreachable:
        one interval until its next probe, then `misses` probes, each sent again as soon as
        the last one timed out (a second of slack for the prober's turns and the cap)."""
        return self.interval(peers) + self.misses * self.timeout + 1.0


class ProbeSchedule(Generic[K]):
    """Which peers to probe now. A heap of (due time, peer); a peer removed or re-added is
    skipped lazily. A token bucket holds the global packet rate to the policy's cap."""

    def __init__(self, policy: ProbePolicy) -> None:
        self.policy = policy
        self._due: dict[K, float] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._order = 0  # ties in the heap never compare peers
        self._tokens = 0.0  # probes that may be sent now
        self._last: float | None = None

    def __len__(self) -> int:
        return len(self._due)

    def set_peers(self, peers: Iterable[K], now: float) -> None:
        """The peers to probe: new ones are spread over one interval (by a stable hash,
        so a restart or a burst of joins never lines them up); gone ones are dropped."""
        wanted = set(peers)
        for gone in self._due.keys() - wanted:
            del self._due[gone]
        interval = self.policy.interval(len(wanted))
        for peer in wanted - self._due.keys():
            offset = (zlib.crc32(repr(peer).encode()) % 10_000) / 10_000 * interval
            self._push(peer, now + offset)
        if len(self._heap) > 2 * len(self._due) + 64:  # removed peers' entries pile up
            self._heap = [(t, o, p) for t, o, p in self._heap if self._due.get(p) == t]
            heapq.heapify(self._heap)

    def _push(self, peer: K, due: float) -> None:
        self._due[peer] = due
        self._order += 1
        heapq.heappush(self._heap, (due, self._order, peer))

    def due(self, now: float) -> list[K]:
        """The peers to probe now, each rescheduled one interval on; at most what the
        rate cap allows since the last call (the rest stay due, first in line)."""
        rate = self.policy.max_packets_per_second / PACKETS_PER_PROBE
        if self._last is not None:
            self._tokens = min(self._tokens + (now - self._last) * rate, max(1.0, rate / 10))
        else:
            self._tokens = 1.0
        self._last = now
        interval = self.policy.interval(len(self._due))
        out: list[K] = []
        while self._heap and self._tokens >= 1.0:
            due, _, peer = self._heap[0]
            if due > now:
                break
            heapq.heappop(self._heap)
            if self._due.get(peer) != due:
                continue  # removed, or rescheduled since
            out.append(peer)
            self._tokens -= 1.0
            # Keep the peer's phase; a peer held back by the cap starts again from now.
            self._push(peer, due + interval if due + interval > now else now + interval)
        return out

    def soon(self, peer: K, now: float) -> None:
        """Probe `peer` again now (its last probe missed: confirm before the interval)."""
        if peer in self._due:
            self._push(peer, now)

    def next_due(self) -> float | None:
        while self._heap and self._due.get(self._heap[0][2]) != self._heap[0][0]:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None


@dataclass
class PeerRecord:
    plane: str
    public_ip: str = ""
    state: State = "unknown"
    since: float = 0.0  # when the state began (the caller's clock)
    consecutive_misses: int = 0
    pmtu: int | None = None  # the largest probe that passed: the overlay MTU, or the small one
    samples: deque[float | None] = field(default_factory=deque)  # RTT, None for a miss
    sent: int = 0
    answered: int = 0
    # When the peer's own probe last arrived here (the caller's clock; None: never). With
    # `state` it tells the two directions apart: a peer this host cannot reach but hears
    # has its packets arrive, so the way from here to it is the broken one.
    heard: float | None = None
    # The peer's probes heard since it last went unreachable: one could be its last, sent
    # as its agent stopped (or while it stopped answering first); a live peer probes again
    # within an interval, so two say the way from it works.
    heard_down: int = 0

    def rtt(self) -> tuple[float | None, float | None]:
        """(median, p99) of the answered probes in the window, seconds."""
        rtts = sorted(s for s in self.samples if s is not None)
        if not rtts:
            return None, None
        return _quantile(rtts, 0.5), _quantile(rtts, 0.99)

    def loss(self) -> float | None:
        if not self.samples:
            return None
        return sum(1 for s in self.samples if s is None) / len(self.samples)


def _quantile(ordered: list[float], q: float) -> float:
    """Nearest-rank quantile of a sorted, non-empty list."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


Transition = Literal["down", "back"]


class HealthBook(Generic[K]):
    """Every peer's record. `result` takes one probe's outcome and says whether the peer
    went down or came back (the edge logs it)."""

    def __init__(self, policy: ProbePolicy) -> None:
        self.policy = policy
        self.peers: dict[K, PeerRecord] = {}

    def set_peers(self, peers: Mapping[K, tuple[str, str]], now: float) -> None:
        """peer -> (plane, public IP): new peers start unknown, gone ones are dropped."""
        for gone in self.peers.keys() - peers.keys():
            del self.peers[gone]
        for peer, (plane, public_ip) in peers.items():
            record = self.peers.get(peer)
            if record is None:
                self.peers[peer] = PeerRecord(plane, public_ip, since=now)
            else:
                record.plane, record.public_ip = plane, public_ip

    def result(self, peer: K, now: float, *, rtt: float | None, small: bool,
               full_size: int, small_size: int) -> Transition | None:
        """One probe of `peer`: `rtt` of its full-size datagram (None: unanswered), and
        whether the small one was answered."""
        record = self.peers.get(peer)
        if record is None:
            return None
        record.sent += 1
        record.samples.append(rtt)
        while len(record.samples) > self.policy.window:
            record.samples.popleft()
        if rtt is not None or small:
            record.answered += 1
            record.pmtu = full_size if rtt is not None else small_size
        if rtt is not None:
            record.consecutive_misses = 0
            if record.state == "unknown":
                # Misses before a peer ever answered are its start (its agent not yet
                # answering, or not yet knowing us), not loss on the path.
                record.samples = deque([rtt])
            if record.state != "reachable":
                back = record.state == "unreachable"
                record.state, record.since = "reachable", now
                return "back" if back else None
            return None
        record.consecutive_misses += 1
        if record.consecutive_misses >= self.policy.misses and record.state != "unreachable":
            record.state, record.since, record.heard_down = "unreachable", now, 0
            return "down"
        return None

    def heard(self, peer: K, now: float) -> None:
        """A probe of `peer`'s own arrived: the way from it to this host carries."""
        record = self.peers.get(peer)
        if record is not None:
            record.heard = now
            record.heard_down += record.state == "unreachable"

    def hearing(self, record: PeerRecord, now: float) -> bool:
        """Whether the peer's probes still arrive: one within the detection bound (a
        peer probes every interval, and again at once after a miss)."""
        return record.heard is not None and \
            now - record.heard <= self.policy.detection_bound(len(self.peers))

    def hears(self, now: float) -> list[K]:
        """The unreachable peers whose own probes still arrive here: the way from them
        to this host works, the way back does not. Only probes heard since the peer went
        unreachable count, and at least two (`PeerRecord.heard_down`): a probe from before,
        or a last one from a peer whose agent was stopping, would name a way broken that
        is not."""
        return [p for p, r in self.peers.items()
                if r.state == "unreachable" and r.heard_down >= 2 and self.hearing(r, now)]

    def counts(self) -> dict[State, int]:
        counts: dict[State, int] = {"reachable": 0, "unreachable": 0, "unknown": 0}
        for record in self.peers.values():
            counts[record.state] += 1
        return counts

    def mean_loss(self) -> float:
        losses = [x for x in (r.loss() for r in self.peers.values()) if x is not None]
        return sum(losses) / len(losses) if losses else 0.0

    def rows(self, now: float) -> dict[str, dict[str, Any]]:
        """Per peer, what `weft status --json` shows (`since_s`: seconds in this state)."""
        out: dict[str, dict[str, Any]] = {}
        for peer, r in self.peers.items():
            median, p99 = r.rtt()
            loss = r.loss()
            out[str(peer)] = {
                "public_ip": r.public_ip, "plane": r.plane, "state": r.state,
                "since_s": round(now - r.since, 1),
                "rtt_ms": None if median is None else {
                    "median": round(median * 1000, 3), "p99": round((p99 or 0) * 1000, 3)},
                "loss": None if loss is None else round(loss, 3),
                "pmtu": r.pmtu, "probes": {"sent": r.sent, "answered": r.answered},
                # Seconds since the peer's own probe last arrived (None: never).
                "heard_s": None if r.heard is None else round(now - r.heard, 1),
                "hears": self.hearing(r, now),
            }
        return out


def where_to_look(report: Mapping[str, Any]) -> str:
    """The first line of `weft status`: the one thing to look at first, from the agent's
    report (its host errors, its peers' errors and health, its notices)."""
    if report.get("host_errors"):
        part, message = sorted(report["host_errors"].items())[0]
        return f"look first at this host: {part}: {message}"
    health = report.get("peer_health", {}).get("peers", {})
    down = sorted((p for p, r in health.items() if r.get("state") == "unreachable"),
                  key=lambda p: -health[p].get("since_s", 0))
    if down:
        first = health[down[0]]
        more = f" (and {len(down) - 1} more)" if len(down) > 1 else ""
        return (f"look first at peer {down[0]} ({first.get('public_ip')}): unreachable on "
                f"{first.get('plane')} for {round(first.get('since_s') or 0)}s{more}; "
                "run `weft doctor`")
    if report.get("errors"):
        key, message = sorted(report["errors"].items())[0]
        more = f" (and {len(report['errors']) - 1} more)" if len(report["errors"]) > 1 else ""
        return f"look first at {key}: {message}{more}"
    if report.get("notices"):
        kind, message = sorted(report["notices"].items())[0]
        return f"look first at the notice {kind}: {message}"
    lossy = sorted((p for p, r in health.items() if (r.get("loss") or 0) > 0.05),
                   key=lambda p: -(health[p].get("loss") or 0))
    if lossy:
        return (f"look first at peer {lossy[0]}: {health[lossy[0]]['loss']:.0%} of probes "
                "lost")
    reachable = sum(1 for r in health.values() if r.get("state") == "reachable")
    return f"all well: {reachable} of {len(health)} peers reachable, no errors"
