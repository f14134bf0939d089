"""auto's prober: probes every plane towards every peer, and answers peers' probes.

One thread, one `select` over a responder socket (this host's overlay address, the probe
port) and one socket per plane, marked (SO_MARK) so the plane's routing table carries it.
Every datagram leaves with DF set (IP_PMTUDISC_DO) at the full overlay MTU, so an answer
proves the plane carries full-size packets both ways. Each round sends one probe per peer
and plane; whatever is unanswered when the next round starts is a miss. The outcome of a
round goes to `on_round` (the backend's state machine), on this thread. The socket, the
probe sizes and the counters are the peer-health prober's too (weft.host.probe_socket).

Nothing from the wire may raise out of the thread: a datagram that is not a probe, or a
probe from an address that is no member's, is dropped and counted.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping

from weft.backends.auto import wire
from weft.backends.auto.options import AUTO_TABLES, PLANES
from weft.core.config import IPAddress, IPNetwork
from weft.host.probe_socket import (
    ProbeCounters,
    parse,
    probe_payloads,
    probe_socket,
    received,
    send_probe,
)

log = logging.getLogger("weft.backends.auto")

# subnet -> (the peer's overlay address, the planes to probe)
Targets = Mapping[IPNetwork, tuple[IPAddress, tuple[str, ...]]]
# subnet -> plane -> (full-size answered, small answered) in the last round
Outcomes = dict[IPNetwork, dict[str, tuple[bool, bool]]]
Key = tuple[IPNetwork, str, bool]  # (peer subnet, plane, small probe)


class Prober:
    def __init__(self, own: IPAddress, port: int, mtu: int, interval: float,
                 on_round: Callable[[Outcomes], None]) -> None:
        self.own = own
        self.port = port
        self.interval = interval
        self.payload, self.small_payload = probe_payloads(mtu, own.version)
        self.on_round = on_round
        self.counters = ProbeCounters()
        self._targets: Targets = {}
        self._members: frozenset[IPAddress] = frozenset()
        self._seq = 0  # the round whose answers count
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._responder = probe_socket(own.version, own, port, None)
        self._planes: dict[str, socket.socket] = {}
        try:
            for plane in PLANES:
                self._planes[plane] = probe_socket(own.version, own, 0, AUTO_TABLES[plane])
        except BaseException:
            self.close()
            raise

    def set_targets(self, targets: Targets) -> None:
        """Swap the peers to probe (and answer) atomically."""
        self._targets = dict(targets)
        self._members = frozenset(addr for addr, _ in targets.values())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="weft-auto-prober", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for sock in [self._responder, *self._planes.values()]:
            sock.close()

    # --- the thread -------------------------------------------------------------------

    def _run(self) -> None:
        seq = 0
        while not self._stop.is_set():
            try:
                seq += 1
                outstanding = self._send_round(seq)
                answered = self._collect(outstanding, time.monotonic() + self.interval)
                outcomes: Outcomes = {}
                for subnet, plane, small in outstanding:
                    if not small:
                        outcomes.setdefault(subnet, {})[plane] = (
                            (subnet, plane, False) in answered, (subnet, plane, True) in answered)
                self.on_round(outcomes)
            except Exception:  # the prober must not die: log, and try again next round
                log.exception("probe round failed")
                self._stop.wait(self.interval)

    def _send_round(self, seq: int) -> dict[Key, IPAddress]:
        outstanding: dict[Key, IPAddress] = {}
        for subnet, (addr, planes) in self._targets.items():
            for plane, small in ((p, s) for p in planes for s in (False, True)):
                # A round's probes share its seq: an answer from an earlier round is late.
                outstanding[(subnet, plane, small)] = addr
                data = wire.encode(wire.Probe(wire.REQUEST, plane, seq),
                                   self.small_payload if small else self.payload)
                send_probe(self._planes[plane], data, (str(addr), self.port), self.counters,
                           log, "probe send failed", {"plane": plane})
        self._seq = seq
        return outstanding

    def _collect(self, outstanding: Mapping[Key, IPAddress], until: float) -> set[Key]:
        answered: set[Key] = set()
        by_addr = {(addr, plane): subnet for (subnet, plane, _), addr in outstanding.items()}
        sockets = [self._responder, *self._planes.values()]
        while not self._stop.is_set():
            left = until - time.monotonic()
            if left <= 0:
                break
            readable, _, _ = select.select(sockets, [], [], left)
            for sock in readable:
                for data, sender in received(sock):
                    if sock is self._responder:
                        self._answer(data, sender)
                    else:
                        hit = self._answered(data, sender, by_addr)
                        if hit is not None:
                            answered.add(hit)
        return answered

    def _answer(self, data: bytes, sender: tuple[str, int]) -> None:
        if (parsed := parse(data, sender, wire.decode, self.counters)) is None:
            return
        probe, source = parsed
        if source not in self._members:
            self.counters.dropped_non_member += 1
            return
        if probe.kind != wire.REQUEST:
            self.counters.dropped_unexpected += 1
            return
        answer = wire.encode(wire.Probe(wire.ANSWER, probe.plane, probe.seq), len(data))
        with contextlib.suppress(OSError):  # the plane is broken back to them: their miss
            self._planes[probe.plane].sendto(answer, sender[:2])
            self.counters.requests_answered += 1

    def _answered(self, data: bytes, sender: tuple[str, int],
                  by_addr: Mapping[tuple[IPAddress, str], IPNetwork]) -> Key | None:
        if (parsed := parse(data, sender, wire.decode, self.counters)) is None:
            return None
        probe, source = parsed
        subnet = by_addr.get((source, probe.plane))
        if probe.kind != wire.ANSWER or subnet is None or probe.seq != self._seq:
            # A late answer from an earlier round, or one nobody asked for.
            self.counters.dropped_unexpected += 1
            return None
        self.counters.answered += 1
        return subnet, probe.plane, len(data) < self.payload
