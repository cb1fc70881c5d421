"""Prometheus metrics (监控指标) shared by the clearing service and the terminal agent.

Names follow the Prometheus conventions: a ``carepay_`` namespace, base units in
the name (``_seconds``, ``_fen``), ``_total`` on counters, low-cardinality labels
only (message type, response code, program — never a card number or a terminal
id with unbounded growth).

``clearing`` and ``terminal_agent`` may not import ``ops`` (DESIGN.md), so they
declare their metrics themselves in the process registry; this module declares
the same names get-or-create (:func:`counter`, :func:`gauge`, :func:`histogram`
check that labels agree), adds the operational ones (error cases, invariants,
reconciliation breaks) and serves the lot. The dashboard and alert rules in
``ops/monitoring/`` use these names.
:func:`start_metrics_server` exposes ``/metrics`` on a port (0 = a free one).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from time import perf_counter
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY as DEFAULT_REGISTRY
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.exposition import generate_latest

NAMESPACE = "carepay"
REGISTRY: CollectorRegistry = DEFAULT_REGISTRY
"""The process registry. ``clearing/metrics.py`` and the terminal agent register their metrics here too
(they may not import ``ops``), so one ``/metrics`` endpoint serves them all."""

LATENCY_BUCKETS_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
DEFAULT_METRICS_HOST = "127.0.0.1"


def _existing(name: str) -> Any:
    return REGISTRY._names_to_collectors.get(name)  # prometheus-client has no public lookup by name


def _same_labels(found: Any, labels: Sequence[str], name: str) -> Any:
    have = tuple(getattr(found, "_labelnames", ()))
    if have != tuple(labels):
        raise ValueError(f"metric {name} already registered with labels {have}, wanted {tuple(labels)}")
    return found


def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
    """The counter ``name`` (full name without ``_total``), created once per process and shared."""
    found = _existing(name) or _existing(f"{name}_total")
    if isinstance(found, Counter):
        return _same_labels(found, labels, name)
    return Counter(name, doc, list(labels), registry=REGISTRY)


def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
    found = _existing(name)
    if isinstance(found, Gauge):
        return _same_labels(found, labels, name)
    return Gauge(name, doc, list(labels), registry=REGISTRY)


def histogram(name: str, doc: str, buckets: Sequence[float], labels: Sequence[str] = ()) -> Histogram:
    found = _existing(name) or _existing(f"{name}_bucket")
    if isinstance(found, Histogram):
        return _same_labels(found, labels, name)
    return Histogram(name, doc, list(labels), buckets=list(buckets), registry=REGISTRY)


# --- clearing service (清算): the same names and labels as clearing/metrics.py, whichever module loads first
AUTH_REQUESTS = counter("carepay_auth_requests", "Terminal requests answered, by message type and response code",
                        ("type", "code"))
AUTH_LATENCY = histogram("carepay_auth_latency_seconds",
                         "Time from receiving a terminal request to publishing its answer",
                         LATENCY_BUCKETS_SECONDS, ("type",))
MAC_FAILURES = counter("carepay_mac_failures", "Terminal messages refused for a bad or missing MAC", ("type",))
QUEUE_DEPTH = gauge("carepay_queue_depth", "Requests received by this worker and not yet answered")
GROUP_COMMIT_BATCH_SIZE = histogram("carepay_group_commit_batch_size",
                                    "Requests posted per group-commit database transaction", BATCH_SIZE_BUCKETS)
BAD_INPUT = counter("carepay_bad_input",
                    "Malformed input refused without posting (frame, message, file line, APDU), by source and reason",
                    ("source", "reason"))
POSTED_AMOUNT = counter("carepay_posted_amount_fen", "Money posted to the ledger in fen, by transaction type and program",
                        ("type", "program"))
ERROR_CASES_OPEN = gauge("carepay_error_cases_open", "Error cases not closed, by overdue", ("overdue",))
"""Set by ``clearing.error_cases`` (差错账): ``overdue="true"`` counts cases past their due time."""
RECONCILIATION_BREAKS = counter("carepay_reconciliation_breaks", "Reconciliation rows that did not match, by class",
                                ("break_class",))
INVARIANT_CHECKS = counter("carepay_invariant_checks", "Ledger invariant check runs")
INVARIANT_VIOLATIONS = counter("carepay_invariant_violations", "Ledger invariant violations found, by check",
                               ("check",))

# --- terminal agent (终端)
TERMINAL_TXNS = counter("carepay_terminal_transactions", "Terminal transactions finished, by type and outcome",
                        ("type", "outcome"))
TERMINAL_ROUND_TRIP = histogram("carepay_terminal_round_trip_seconds", "Terminal request to host answer",
                                LATENCY_BUCKETS_SECONDS, ("type",))
TERMINAL_BACKLOG = gauge("carepay_terminal_backlog", "Items waiting in the terminal's store-and-forward queues",
                         ("queue",))
TERMINAL_OFFLINE = gauge("carepay_terminal_offline", "1 while the terminal cannot reach the host")
CARD_ERRORS = counter("carepay_card_errors", "Card or PSAM exchanges that failed (removed, timeout, status word)",
                      ("kind",))


def observe_auth(msg_type: str, code: str, seconds: float) -> None:
    """Count one answered host message and its latency."""
    AUTH_REQUESTS.labels(type=msg_type, code=code).inc()
    AUTH_LATENCY.labels(type=msg_type).observe(seconds)


def observe_terminal_outcome(kind: str, state: str, seconds: float | None = None) -> None:
    """Count one finished terminal transaction (``kind`` purchase/void/refund/…, ``state`` approved/declined/…).

    ``terminal_agent`` may not import ``ops``: the process that runs the agent (``carepay terminal run``,
    the demo) calls this with each outcome.
    """
    TERMINAL_TXNS.labels(type=kind, outcome=state).inc()
    if seconds is not None:
        TERMINAL_ROUND_TRIP.labels(type=kind).observe(seconds)


def refresh_terminal_gauges(journal: Any, connected: bool) -> None:
    """Set the terminal's backlog gauges from its journal and the offline flag from its link."""
    TERMINAL_BACKLOG.labels(queue="reversal").set(len(journal.reversal_queue()))
    TERMINAL_BACKLOG.labels(queue="offline_advice").set(len(journal.offline_queue()))
    TERMINAL_OFFLINE.set(0 if connected else 1)


def count_bad_input(source: str, reason: str) -> None:
    """Count one refused malformed input. ``reason`` must be a short fixed word (it becomes a label)."""
    BAD_INPUT.labels(source=source, reason=reason[:40]).inc()


@contextmanager
def timed(histogram: Histogram, **labels: str) -> Iterator[None]:
    """Observe the wall time of the ``with`` body in ``histogram`` (seconds)."""
    start = perf_counter()
    try:
        yield
    finally:
        (histogram.labels(**labels) if labels else histogram).observe(perf_counter() - start)


def sample_value(name: str, labels: dict[str, str] | None = None) -> float | None:
    """The current value of one sample in :data:`REGISTRY` (``carepay_auth_requests_total`` …)."""
    return REGISTRY.get_sample_value(name, labels or {})


def render() -> bytes:
    """The text exposition of every carepay metric (what ``/metrics`` serves)."""
    return generate_latest(REGISTRY)


class MetricsServer:
    """A running ``/metrics`` HTTP endpoint; :meth:`close` stops it."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    @property
    def url(self) -> str:
        return f"http://{self._server.server_address[0]}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(port: int = 0, host: str = DEFAULT_METRICS_HOST) -> MetricsServer:
    """Serve :data:`REGISTRY` on ``http://host:port/metrics`` in a daemon thread (port 0 = a free port)."""
    server, thread = start_http_server(port, addr=host, registry=REGISTRY)
    return MetricsServer(server, thread)
