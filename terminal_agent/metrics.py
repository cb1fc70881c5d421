"""Prometheus metrics of the terminal agent (终端监控指标).

``terminal_agent`` may not import ``ops``; ``ops/metrics.py`` declares the same names get-or-create,
so whichever loads first owns them and one ``/metrics`` endpoint serves both.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

ROUND_TRIP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _existing(name: str) -> object | None:
    return REGISTRY._names_to_collectors.get(name)  # prometheus-client has no public lookup by name


def _counter(name: str, doc: str, labels: tuple[str, ...]) -> Counter:
    found = _existing(name) or _existing(f"{name}_total")
    return found if isinstance(found, Counter) else Counter(name, doc, labels)  # type: ignore[return-value]


def _gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
    found = _existing(name)
    return found if isinstance(found, Gauge) else Gauge(name, doc, labels)  # type: ignore[return-value]


def _histogram(name: str, doc: str, labels: tuple[str, ...]) -> Histogram:
    found = _existing(name) or _existing(f"{name}_bucket")
    return found if isinstance(found, Histogram) else Histogram(  # type: ignore[return-value]
        name, doc, labels, buckets=ROUND_TRIP_BUCKETS_S)


TERMINAL_TXNS = _counter("carepay_terminal_transactions", "Terminal transactions finished, by type and outcome",
                         ("type", "outcome"))
TERMINAL_ROUND_TRIP = _histogram("carepay_terminal_round_trip_seconds", "Terminal request to host answer", ("type",))
TERMINAL_BACKLOG = _gauge("carepay_terminal_backlog", "Items waiting in the terminal's store-and-forward queues",
                          ("queue",))
TERMINAL_OFFLINE = _gauge("carepay_terminal_offline", "1 while the terminal cannot reach the host")
