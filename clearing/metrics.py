"""Prometheus metrics of the clearing service (监控指标).

Names follow Prometheus conventions; the clearing core's group-commit writer
observes ``GROUP_COMMIT_BATCH_SIZE`` (or its own metric of that name, reused
here when it already exists). Each worker process serves its own ``/metrics``
(``carepay clearing serve --metrics-port P``: worker *i* listens on P + i).
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def _existing(name: str) -> object | None:
    """A collector already registered under ``name`` (another module defined it first)."""
    return REGISTRY._names_to_collectors.get(name)  # prometheus-client has no public lookup


def _counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
    found = _existing(name) or _existing(f"{name}_total")
    return found if isinstance(found, Counter) else Counter(name, doc, labels)  # type: ignore[return-value]


def _histogram(name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()) -> Histogram:
    found = _existing(name) or _existing(f"{name}_bucket")
    return found if isinstance(found, Histogram) else Histogram(name, doc, labels, buckets=buckets)  # type: ignore[return-value]


def _gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
    found = _existing(name)
    return found if isinstance(found, Gauge) else Gauge(name, doc, labels)  # type: ignore[return-value]


AUTH_REQUESTS = _counter("carepay_auth_requests", "Terminal requests answered, by message type and response code",
                         ("type", "code"))
AUTH_LATENCY = _histogram("carepay_auth_latency_seconds",
                          "Time from receiving a terminal request to publishing its answer", LATENCY_BUCKETS_S,
                          ("type",))
GROUP_COMMIT_BATCH_SIZE = _histogram("carepay_group_commit_batch_size",
                                     "Requests posted per group-commit database transaction", BATCH_BUCKETS)
MAC_FAILURES = _counter("carepay_mac_failures", "Terminal messages refused for a bad or missing MAC", ("type",))
QUEUE_DEPTH = _gauge("carepay_queue_depth", "Requests received by this worker and not yet answered")
REFUSED = _counter("carepay_refused_messages",
                   "Messages refused before processing (malformed, stale, replayed, wrong topic, unknown terminal)",
                   ("reason",))
SIGN_ONS = _counter("carepay_sign_ons", "Sign-on steps answered", ("step", "code"))
LEDGER_PROCESS_RESTARTS = _counter("carepay_ledger_process_restarts",
                                   "Ledger processes (clearing serve --ledger-process) started again after one died")
LEDGER_UNANSWERED = _counter("carepay_ledger_unanswered",
                             "Requests left unanswered because the ledger process ended before it answered "
                             "(the terminals reverse them)")


def serve_metrics(port: int, addr: str = "127.0.0.1") -> None:
    """Expose ``/metrics`` on ``addr:port`` (a daemon thread)."""
    start_http_server(port, addr=addr)
