"""Prometheus metrics of one agent (its own registry, so tests can run several)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


class _BackendCounters(Collector):
    """Exports the backend's own counters (packets, drops by reason...) at scrape time."""

    def __init__(self, status: Callable[[], Mapping[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterator[CounterMetricFamily]:
        counters = self._status().get("counters", {})
        family = CounterMetricFamily(
            "weft_backend_events", "Data-plane counters of the backend", labels=["counter"]
        )
        for name, value in sorted(counters.items()):
            if isinstance(value, int | float):
                family.add_metric([name], value)
        yield family


class _PeerPaths(Collector):
    """Backend "auto": per peer the data plane in use, probes sent/answered per plane and
    switches (from the backend's status at scrape time; nothing for other backends)."""

    def __init__(self, status: Callable[[], Mapping[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        paths = self._status().get("paths", {})
        plane = GaugeMetricFamily("weft_peer_data_plane",
                                  "1 for the data plane each peer's traffic is sent on",
                                  labels=["peer", "plane"])
        plane6 = GaugeMetricFamily("weft_peer_ipv6_data_plane",
                                   "Dual stack: 1 for the data plane each peer's IPv6 "
                                   "subnet is sent on", labels=["peer", "plane"])
        sent = CounterMetricFamily("weft_peer_probes_sent", "Full-size probes sent",
                                   labels=["peer", "plane"])
        answered = CounterMetricFamily("weft_peer_probes_answered",
                                       "Full-size probes answered", labels=["peer", "plane"])
        usable = GaugeMetricFamily("weft_peer_plane_usable",
                                   "1 while the plane's probes are answered",
                                   labels=["peer", "plane"])
        switches = CounterMetricFamily("weft_peer_data_plane_switches",
                                       "Times the peer's data plane changed", labels=["peer"])
        for subnet, path in sorted(paths.items()):
            switches.add_metric([subnet], path.get("switches", 0))
            for name, probes in sorted(path.get("probes", {}).items()):
                plane.add_metric([subnet, name], 1 if path.get("plane") == name else 0)
                sent.add_metric([subnet, name], probes.get("sent", 0))
                answered.add_metric([subnet, name], probes.get("answered", 0))
                usable.add_metric([subnet, name], 1 if probes.get("usable") else 0)
                if "ipv6_plane" in path:
                    plane6.add_metric([subnet, name], 1 if path["ipv6_plane"] == name else 0)
        yield from (plane, plane6, sent, answered, usable, switches)


class _IngressCounters(Collector):
    """The underlay ingress filter's drops by reason (read from nftables at scrape time)."""

    def __init__(self, backend: str, counters: Callable[[], Mapping[str, int]]) -> None:
        self._backend = backend
        self._counters = counters

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "weft_ingress_dropped_packets", "Packets the underlay ingress filter dropped",
            labels=["backend", "reason"],
        )
        for reason, value in sorted(self._counters().items()):
            family.add_metric([self._backend, reason], value)
        yield family


class _PeerHealth(Collector):
    """Every backend: peers by probe state and the mean probe loss. No per-peer label, so
    the series stay few at 5,000 peers (per-peer detail is in `weft status`)."""

    def __init__(self, source: Callable[[], Any]) -> None:
        self._source = source  # the running prober, or None

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        prober = self._source()
        if prober is None:
            return
        counts, loss = prober.gauges()
        peers = GaugeMetricFamily("weft_peer_health", "Peers by probe state",
                                  labels=["state"])
        for state, value in sorted(counts.items()):
            peers.add_metric([state], value)
        yield peers
        yield GaugeMetricFamily("weft_peer_probe_loss_ratio",
                                "Mean over peers of the probes lost in each one's window",
                                value=loss)
        c = prober.counters
        yield CounterMetricFamily("weft_peer_health_probes_sent", "Health probe datagrams sent",
                                  value=c.sent)
        yield CounterMetricFamily("weft_peer_health_probes_answered",
                                  "Health probe datagrams answered", value=c.answered)
        dropped = CounterMetricFamily("weft_peer_health_probes_dropped",
                                      "Datagrams on the health probe port dropped",
                                      labels=["reason"])
        for reason in ("non_member", "malformed", "unexpected"):
            dropped.add_metric([reason], getattr(c, f"dropped_{reason}"))
        yield dropped


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.peers = Gauge("weft_peers", "Peers in this host's data plane", registry=r)
        self.peer_subnets = Gauge("weft_peer_subnets",
                                  "Peers' subnets in this host's data plane, by family "
                                  "(both in dual stack)", ["family"], registry=r)
        self.lease_expiry = Gauge(
            "weft_lease_expiry_timestamp_seconds", "When this host's lease expires", registry=r
        )
        self.lease_renewals = Counter("weft_lease_renewals", "Lease renewals", registry=r)
        self.reconciles = Counter("weft_reconcile", "Reconcile passes", registry=r)
        self.updates = Counter("weft_incremental_update",
                               "Store events applied incrementally (only what changed)",
                               registry=r)
        self.store_events_ignored = Counter(
            "weft_store_events_unchanged",
            "Store events that changed no peer's data (renewals): nothing applied",
            registry=r)
        self.reconcile_errors = Counter(
            "weft_reconcile_errors", "Per-peer reconcile errors", registry=r
        )
        self.reconcile_seconds = Histogram(
            "weft_reconcile_duration_seconds", "Time one reconcile pass took", registry=r,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
        )
        self.peer_errors = Gauge(
            "weft_peer_errors", "Peers (or leases) that cannot be used right now", registry=r
        )
        self.store_errors = Counter("weft_store_errors", "Failed store operations", registry=r)
        self.probe_rtt = Histogram(
            "weft_peer_probe_rtt_seconds", "Round trip of full-size health probes, all peers",
            registry=r, buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1,
                                 0.25, 0.5, 1.0))

    def export_peer_health(self, prober: Callable[[], Any]) -> None:
        self.registry.register(_PeerHealth(prober))

    def export_backend(self, status: Callable[[], Mapping[str, Any]]) -> None:
        self.registry.register(_BackendCounters(status))
        self.registry.register(_PeerPaths(status))

    def export_ingress(self, backend: str, counters: Callable[[], Mapping[str, int]]) -> None:
        self.registry.register(_IngressCounters(backend, counters))

    def serve(self, addr: str) -> None:
        host, _, port = addr.rpartition(":")
        start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)
