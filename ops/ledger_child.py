"""The ledger process of a clearing worker (``carepay clearing serve --ledger-process`` starts it; see
:mod:`clearing.ledger_link`): the clearing service — authorisation pipeline and group-commit writer — reading
request frames on stdin and writing answer frames on stdout. Not a command for people: stdout is the link.

    python -m ops.ledger_child [--db URL] [--keystore PATH] [--metrics-port N]

The database as configured (``clearing serve`` puts its URL in the child's ``CAREPAY_DB_URL``: a URL may hold a
password, and command lines are public on the machine). Keys as ``clearing serve`` takes them (the key store named the same way, or the public demo keys); logs go to
stderr; its Prometheus metrics (decisions, batch sizes, pipeline counters) on ``--metrics-port`` when given.
"""

from __future__ import annotations

import argparse
import asyncio
import sys


async def main(argv: list[str] | None = None) -> None:
    from clearing.db import make_engine
    from clearing.ledger_link import serve_stdio
    from clearing.metrics import serve_metrics
    from clearing.service import ClearingConfig, ClearingService
    from clearing.worker import WORKER_SWITCH_INTERVAL_S, sample_group_commit, tune_gc
    from ops.cli_serve import load_host_keys
    from ops.config import load_settings

    ap = argparse.ArgumentParser(prog="python -m ops.ledger_child", description=__doc__.splitlines()[0])
    ap.add_argument("--db", default=None, help="database URL (default: the configuration's, e.g. $CAREPAY_DB_URL "
                    "— clearing serve passes it there, never on the command line)")
    ap.add_argument("--keystore", default=None)
    ap.add_argument("--metrics-port", type=int, default=0)
    args = ap.parse_args(argv)
    settings = load_settings()
    keys = load_host_keys(args.keystore, settings)
    engine = make_engine(args.db or settings.resolved_db_url())
    try:
        async with ClearingService(engine, keys.issuer_keys, ClearingConfig.from_settings(settings.clearing)) as svc:
            if args.metrics_port:
                serve_metrics(args.metrics_port)
            sampler = asyncio.create_task(sample_group_commit(svc))
            tune_gc()
            sys.setswitchinterval(WORKER_SWITCH_INTERVAL_S)
            try:
                await serve_stdio(svc)
            finally:
                sampler.cancel()
    finally:
        await engine.dispose()
        if keys.store is not None:
            keys.store.close()


if __name__ == "__main__":
    from ops.cli import setup_logging

    setup_logging()  # as every carepay verb: masked, to stderr
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
