"""Prometheus metrics of the authorisation pipeline and the ledger writer (registered once per process).

A collector already registered under the same name (e.g. by ``clearing/metrics.py``) is reused.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Histogram

BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def _existing(*names: str) -> object | None:
    for n in names:
        found = REGISTRY._names_to_collectors.get(n)  # prometheus-client has no public lookup
        if found is not None:
            return found
    return None


def _counter(name: str, doc: str, labels: tuple[str, ...]) -> Counter:
    found = _existing(name, f"{name}_total")
    return found if isinstance(found, Counter) else Counter(name, doc, labels)


def _histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
    found = _existing(name, f"{name}_bucket")
    return found if isinstance(found, Histogram) else Histogram(name, doc, buckets=buckets)


DECISIONS = _counter("carepay_clearing_decisions", "Host transactions answered by the clearing pipeline",
                     ("type", "code"))
SUSPECTED_FORGERY = _counter("carepay_clearing_suspected_forgery",
                             "Card cryptograms that failed verification or were replayed (59)", ("reason",))
PIPELINE_REDONE = _counter("carepay_ledger_pipeline_redone", "PostgreSQL ledger batches built on the batch before "
                           "them whose assumptions did not hold, run again plainly", ())
BATCH_RETRIES = _counter("carepay_ledger_batch_retries", "Ledger batches rolled back and run again, by cause: "
                         "journal_raced (another worker committed a row the batch's decisions rest on), or the "
                         "database error (a unique-key race between workers, a deadlock, a busy database)", ("reason",))
BATCH_SIZE = _histogram("carepay_group_commit_batch_size", "Requests posted per group-commit database transaction",
                        BATCH_BUCKETS)
