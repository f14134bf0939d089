"""Structured logs (one line per event, each field once) and the agent's metrics."""

from __future__ import annotations

import json
import logging

import pytest
from prometheus_client import generate_latest

from weft.agent.logs import JsonFormatter, TextFormatter, configure
from weft.agent.metrics import AgentMetrics
from weft.core.errors import UsageError


def record(**extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("weft.agent", logging.INFO, __file__, 1, "peer added", (), None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_text_line_names_every_field_exactly_once() -> None:
    line = TextFormatter().format(record(subnet="198.19.2.0/24", public_ip="198.18.0.2"))
    assert "\n" not in line
    assert line.count("subnet=198.19.2.0/24") == 1
    assert line.count("public_ip=198.18.0.2") == 1
    assert "peer added" in line


def test_json_line_keeps_numbers_and_stringifies_the_rest() -> None:
    data = json.loads(JsonFormatter().format(record(peers=3, ratio=0.5, where=object)))
    assert data["event"] == "peer added"
    assert data["level"] == "info"
    assert data["logger"] == "weft.agent"
    assert data["peers"] == 3
    assert data["ratio"] == 0.5
    assert isinstance(data["where"], str)


def test_an_unknown_level_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--log-level 'loud'"):
        configure("loud", json_output=True)


def test_metrics_export_agent_figures_and_the_backends_counters() -> None:
    metrics = AgentMetrics()
    metrics.peers.set(4)
    metrics.reconciles.inc()
    metrics.export_backend(lambda: {"counters": {"rx_packets": 7, "note": "not a number"}})
    text = generate_latest(metrics.registry).decode()
    assert "weft_peers 4.0" in text
    assert "weft_reconcile_total 1.0" in text
    assert 'weft_backend_events_total{counter="rx_packets"} 7.0' in text
    assert "note" not in text


def test_two_agents_in_one_process_have_separate_registries() -> None:
    a, b = AgentMetrics(), AgentMetrics()
    a.peers.set(1)
    b.peers.set(2)
    assert "weft_peers 1.0" in generate_latest(a.registry).decode()
    assert "weft_peers 2.0" in generate_latest(b.registry).decode()
