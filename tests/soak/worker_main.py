"""A clearing worker process for the soak (``python -m tests.soak.worker_main``): killed with -9 on purpose.

The same parts ``carepay clearing serve`` runs — clearing service, group-commit writer, MQTT worker on the
shared subscription — with the public demo keys, and an optional host clock offset (``--clock-offset-s``)
so the soak can put the host just before the daily cut-off; ``--ledger-process`` runs the service in a child
(``tests.soak.ledger_child_main``) as ``clearing serve --ledger-process`` does. Prints ``READY`` once subscribed;
stops cleanly on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from datetime import UTC, datetime, timedelta
from typing import Any


async def main(args: argparse.Namespace) -> int:
    from clearing.db import make_engine
    from clearing.service import ClearingConfig, ClearingService
    from clearing.signon import SignOnService
    from clearing.terminal_keys import DemoTerminalKeys, WorkingKeys, demo_working_key_master
    from clearing.worker import ClearingWorker
    from keys.issuer import IssuerKeySet
    from ops.logging import configure_logging

    configure_logging(json=True, level="INFO", log_file=args.log, console_level="CRITICAL")
    offset = timedelta(seconds=args.clock_offset_s)
    engine = make_engine(args.db, pg_schema=args.pg_schema or None)
    service: Any = ClearingService(engine, IssuerKeySet.demo(), ClearingConfig(),
                                   clock=lambda: datetime.now(UTC) + offset)
    if args.ledger_process:  # as clearing serve --ledger-process: the service in a child of this worker
        from clearing.ledger_link import LedgerProcessClient

        service = LedgerProcessClient([sys.executable, "-m", "tests.soak.ledger_child_main", "--db", args.db,
                                       "--clock-offset-s", str(args.clock_offset_s), "--pg-schema", args.pg_schema]
                                      + (["--log", f"{args.log}.ledger"] if args.log else []))
    wkm = demo_working_key_master()
    working = WorkingKeys(engine, wkm)
    worker = ClearingWorker(args.mqtt, service, working, SignOnService(DemoTerminalKeys(), working, wkm),
                            name=args.name, max_age_s=args.max_age_s)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with service:
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.ready.wait(), 20)
        print("READY", flush=True)
        await stop.wait()
        worker.stop()
        await worker.drain(5)
        task.cancel()
        try:
            await task
        except BaseException:  # cancelled on purpose
            pass
    await engine.dispose()
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--db", required=True)
    p.add_argument("--mqtt", required=True)
    p.add_argument("--name", default="w1")
    p.add_argument("--clock-offset-s", type=float, default=0.0)
    p.add_argument("--max-age-s", type=int, default=300)
    p.add_argument("--log", default=None)
    p.add_argument("--pg-schema", default="")
    p.add_argument("--ledger-process", action="store_true")
    sys.exit(asyncio.run(main(p.parse_args())))
