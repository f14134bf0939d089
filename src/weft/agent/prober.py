"""The peer-health prober: probes every peer through the data plane that carries its
containers' traffic, answers the peers' probes, and answers a member's request for this
host's health summary (`weft doctor --cluster`). The edge; the decisions are pure
(weft.agent.peer_health).

One thread, one UDP socket bound to this host's overlay address on `HEALTH_PORT`, unmarked:
the main table routes a probe to a peer's overlay address exactly as it routes the
containers' packets (through the VXLAN device, the wireguard device, the udp forwarder's
TUN, or bare to the peer for host-gw), and the peer's agent answers from its own overlay
address. Like auto's probes (weft.backends.auto.probe, whose wire format this reuses; the
socket, the sizes and the counters are both probers', in weft.host.probe_socket), each
probe is a full-size datagram with DF set and a small one beside it: an answer proves the
path carries the overlay MTU both ways; the small one answered alone says the MTU is the
problem, not the peer.

Nothing from the wire may raise out of the thread: a datagram that is not a probe, or a
probe from an address that is no member's, is dropped and counted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from weft.agent.peer_health import PACKETS_PER_PROBE, HealthBook, ProbePolicy, ProbeSchedule
from weft.backends.auto import wire
from weft.backends.auto.options import PLANES
from weft.core.config import IPAddress, IPNetwork
from weft.host.probe_socket import (
    IP_FREEBIND,
    IP_UDP,
    SMALL_PACKET,
    ProbeCounters,
    ipaddress_of,
    parse,
    probe_payloads,
    probe_socket,
    received,
    send_probe,
)

log = logging.getLogger("weft.agent")

# Beside auto's per-plane probe port (8286): both may run on one host.
HEALTH_PORT: Final = 8287
# A summary answer never exceeds the smallest MTU a path must carry.
SUMMARY_MAX: Final = SMALL_PACKET - 48
_PLANE: Final = PLANES[0]  # the plane byte of a health probe: unused

# subnet -> (the peer's overlay address, the plane its traffic uses, its public IP)
Targets = Mapping[IPNetwork, tuple[IPAddress, str, str]]


@dataclass
class ProberCounters(ProbeCounters):
    summaries_answered: int = 0  # what auto's probes never ask


@dataclass
class _Pending:
    peer: IPNetwork
    addr: IPAddress
    sent_at: float
    rtt: float | None = None
    small: bool = False
    small_sent: bool = True


class HealthProber:
    def __init__(self, own: IPAddress, mtu: int, policy: ProbePolicy | None = None, *,
                 port: int = HEALTH_PORT,
                 summary: Callable[[], Mapping[str, Any]] | None = None,
                 on_rtt: Callable[[float], None] = lambda _: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy or ProbePolicy()
        self.port = port
        self.own = own
        self.payload, self.small_payload = probe_payloads(mtu, own.version)
        self.counters = ProberCounters()
        # What a member asking gets: the agent adds its own counts to the probes' summary.
        self._summary = summary or self.summary
        self._on_rtt = on_rtt
        self._clock = clock
        self._schedule: ProbeSchedule[IPNetwork] = ProbeSchedule(self.policy)
        self.book: HealthBook[IPNetwork] = HealthBook(self.policy)
        self._lock = threading.Lock()  # the book and the targets, shared with status()
        self._targets: Targets = {}
        self._new_targets: Targets | None = None
        self._members: dict[IPAddress, IPNetwork] = {}  # overlay address -> subnet
        self._pending: dict[int, _Pending] = {}
        self._seq = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock = probe_socket(own.version, own, port, None)
        # wireguard: public IP -> Unix time of the last handshake (from the backend).
        self.handshakes: Mapping[str, int] = {}

    def set_targets(self, targets: Targets) -> None:
        """Swap the peers to probe (and answer); taken in by the thread's next turn."""
        with self._lock:
            self._new_targets = dict(targets)
            self._members = {addr: subnet for subnet, (addr, _, _) in targets.items()}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="weft-health-prober",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._sock.close()

    def status(self) -> dict[str, Any]:
        now = self._clock()
        with self._lock:
            rows = self.book.rows(now)
            counts = self.book.counts()
            loss = self.book.mean_loss()
        wall, handshakes = time.time(), self.handshakes
        for row in rows.values():
            at = handshakes.get(row["public_ip"])
            row["handshake_age_s"] = None if at is None else round(wall - at)
        return {"interval_s": round(self.policy.interval(len(rows)), 2),
                "max_packets_per_second": self.policy.max_packets_per_second,
                "unreachable_after": self.policy.misses,
                "detection_bound_s": round(self.policy.detection_bound(len(rows)), 1),
                "counts": counts, "mean_loss": round(loss, 4),
                "counters": vars(self.counters).copy(), "peers": rows}

    def gauges(self) -> tuple[dict[str, int], float]:
        """(peers by state, mean loss): for the metrics, without a row per peer."""
        with self._lock:
            return {k: v for k, v in self.book.counts().items()}, self.book.mean_loss()

    def summary(self) -> dict[str, Any]:
        """What a member asking over the probe channel gets: counts, the peers this host
        cannot reach (by subnet), and of those the ones whose probes still arrive here
        (`hears`: the way from them works), cut to fit one small datagram."""
        now = self._clock()
        with self._lock:
            counts = self.book.counts()
            down = sorted(str(p) for p, r in self.book.peers.items()
                          if r.state == "unreachable")
            hears = sorted(str(p) for p in self.book.hears(now))
        return {"counts": counts, "unreachable": down, "hears": hears}

    # --- the thread -------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._turn()
            except Exception:  # the prober must not die: log, and go on
                log.exception("health probe turn failed")
                self._stop.wait(1.0)

    def _turn(self) -> None:
        now = self._clock()
        with self._lock:
            if self._new_targets is not None:
                self._targets, self._new_targets = self._new_targets, None
                self._schedule.set_peers(self._targets, now)
                self.book.set_peers({s: (plane, ip) for s, (_, plane, ip)
                                     in self._targets.items()}, now)
        for peer in self._schedule.due(now):
            target = self._targets.get(peer)
            if target is not None:
                self._send(peer, target[0], now)
        self._expire(now)
        wake = [now + 0.2]
        if (due := self._schedule.next_due()) is not None:
            wake.append(due)
        if self._pending:
            wake.append(min(p.sent_at for p in self._pending.values()) + self.policy.timeout)
        # When the rate cap holds peers back, the next one may go after one token's time.
        floor = PACKETS_PER_PROBE / self.policy.max_packets_per_second
        wait = max(floor, min(wake) - self._clock())
        readable, _, _ = select.select([self._sock], [], [], wait)
        if readable:
            self._receive()

    def _send(self, peer: IPNetwork, addr: IPAddress, now: float) -> None:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        pending = _Pending(peer, addr, now)
        for small in (False, True):
            data = wire.encode(wire.Probe(wire.HEALTH_REQUEST, _PLANE, self._seq),
                               self.small_payload if small else self.payload)
            sent = send_probe(self._sock, data, (str(addr), self.port), self.counters,
                              log, "health probe send failed", {"peer": str(peer)})
            if small and not sent:
                pending.small_sent = False
        self._pending[self._seq] = pending

    def _expire(self, now: float) -> None:
        late = [seq for seq, p in self._pending.items()
                if now - p.sent_at >= self.policy.timeout]
        for seq in late:
            self._finish(self._pending.pop(seq), now)

    def _finish(self, p: _Pending, now: float) -> None:
        with self._lock:
            change = self.book.result(p.peer, now, rtt=p.rtt, small=p.small,
                                      full_size=self.payload + IP_UDP[self.own.version],
                                      small_size=self.small_payload + IP_UDP[self.own.version])
            record = self.book.peers.get(p.peer)
        if record is None:
            return
        if p.rtt is None and record.state != "unreachable":
            self._schedule.soon(p.peer, now)  # confirm a miss now, not an interval later
        if change is None:
            return
        fields = {"peer": str(p.peer), "public_ip": record.public_ip, "plane": record.plane}
        if change == "down":
            log.warning("peer unreachable", extra={
                **fields, "misses": record.consecutive_misses,
                "small_probe_answered": p.small})
        else:
            log.info("peer reachable again", extra=fields)

    def _receive(self) -> None:
        for data, sender in received(self._sock):
            if (parsed := parse(data, sender, wire.decode, self.counters)) is None:
                continue
            probe, source = parsed
            peer = self._members.get(source)
            if peer is None:
                self.counters.dropped_non_member += 1
                continue
            if probe.kind == wire.HEALTH_REQUEST:
                with self._lock:
                    self.book.heard(peer, self._clock())
                self._reply(wire.encode(wire.Probe(wire.HEALTH_ANSWER, _PLANE, probe.seq),
                                        len(data)), sender)
                self.counters.requests_answered += 1
            elif probe.kind == wire.SUMMARY_REQUEST:
                self._reply(summary_answer(probe.seq, self._summary()), sender)
                self.counters.summaries_answered += 1
            elif probe.kind == wire.HEALTH_ANSWER:
                self._answered(probe.seq, source, len(data))
            else:
                self.counters.dropped_unexpected += 1

    def _reply(self, data: bytes, sender: tuple[str, int]) -> None:
        with contextlib.suppress(OSError):  # the path back is broken: their miss
            self._sock.sendto(data, sender[:2])

    def _answered(self, seq: int, source: IPAddress, size: int) -> None:
        pending = self._pending.get(seq)
        if pending is None or pending.addr != source:
            self.counters.dropped_unexpected += 1  # late (already a miss), or unasked
            return
        self.counters.answered += 1
        now = self._clock()
        if size < self.payload:
            pending.small = True
        else:
            pending.rtt = now - pending.sent_at
            self._on_rtt(pending.rtt)
        if pending.rtt is not None and (pending.small or not pending.small_sent):
            self._finish(self._pending.pop(seq), now)


def summary_answer(seq: int, summary: Mapping[str, Any]) -> bytes:
    """The answer to a summary request: JSON, cut to one small datagram (the list of
    unreachable peers is shortened, `truncated` says so)."""
    body = dict(summary)
    down = list(body.get("unreachable", []))
    while True:
        text = json.dumps(body, separators=(",", ":")).encode()
        if wire.HEADER_SIZE + len(text) <= SUMMARY_MAX or not down:
            break
        down = down[:-1]
        kept = set(down)  # `hears` names only peers in `unreachable`
        body["unreachable"], body["truncated"] = down, True
        body["hears"] = [p for p in body.get("hears", []) if p in kept]
    return wire.encode(wire.Probe(wire.SUMMARY_ANSWER, _PLANE, seq),
                       wire.HEADER_SIZE + len(text), text)


def ask_summaries(own: IPAddress, peers: Mapping[str, IPAddress], *, port: int = HEALTH_PORT,
                  timeout: float = 3.0, tries: int = 3) -> dict[str, dict[str, Any] | None]:
    """`weft doctor --cluster`: ask every peer's agent (by overlay address) for its summary
    from this host's overlay address; None for a peer that never answered."""
    family = socket.AF_INET if own.version == 4 else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_DGRAM)
    by_addr = {addr: name for name, addr in peers.items()}
    answers: dict[str, dict[str, Any] | None] = dict.fromkeys(peers)
    try:
        sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)  # the agent holds the port
        sock.bind((str(own), 0))
        for attempt in range(tries):
            for name, addr in peers.items():
                if answers[name] is None:
                    with contextlib.suppress(OSError):
                        sock.sendto(wire.encode(wire.Probe(wire.SUMMARY_REQUEST, _PLANE,
                                                           attempt), wire.HEADER_SIZE),
                                    (str(addr), port))
            until = time.monotonic() + timeout / tries
            while any(v is None for v in answers.values()):
                left = until - time.monotonic()
                if left <= 0:
                    break
                readable, _, _ = select.select([sock], [], [], left)
                if not readable:
                    break
                # A peer's answer is its own: nested past the parser's depth, or not an
                # object (the summary's shape, checked further by its reader), it is none.
                with contextlib.suppress(OSError, ValueError, RecursionError,
                                         wire.ProbeFormatError):
                    data, sender = sock.recvfrom(0x10000)
                    who = by_addr.get(ipaddress_of(sender[0]))
                    if who is not None and wire.decode(data).kind == wire.SUMMARY_ANSWER:
                        answer = json.loads(wire.body(data))
                        if isinstance(answer, dict):
                            answers[who] = answer
            if all(v is not None for v in answers.values()):
                break
    finally:
        sock.close()
    return answers
