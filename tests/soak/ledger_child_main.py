"""The soak worker's ledger process (``tests.soak.worker_main --ledger-process``): what ``ops.ledger_child`` runs
for ``clearing serve --ledger-process`` — the clearing service behind the worker↔ledger link — with the soak's
public demo keys and its host clock offset (the clock-skew phase moves the host to just before the cut-off).
"""

from __future__ import annotations

import argparse
import asyncio
from datetime import UTC, datetime, timedelta


async def main(args: argparse.Namespace) -> None:
    from clearing.db import make_engine
    from clearing.ledger_link import serve_stdio
    from clearing.service import ClearingConfig, ClearingService
    from keys.issuer import IssuerKeySet
    from ops.logging import configure_logging

    configure_logging(json=True, level="INFO", log_file=args.log, console_level="CRITICAL")
    offset = timedelta(seconds=args.clock_offset_s)
    engine = make_engine(args.db, pg_schema=args.pg_schema or None)
    try:
        async with ClearingService(engine, IssuerKeySet.demo(), ClearingConfig(),
                                   clock=lambda: datetime.now(UTC) + offset) as svc:
            await serve_stdio(svc)
    finally:
        await engine.dispose()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--db", required=True)
    p.add_argument("--clock-offset-s", type=float, default=0.0)
    p.add_argument("--log", default=None)
    p.add_argument("--pg-schema", default="")
    asyncio.run(main(p.parse_args()))
