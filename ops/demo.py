"""The whole day in one command (一键演示): ``carepay demo``.

On embedded defaults, with nothing to install: an SQLite ledger under ``--dir``,
an embedded MQTT broker on a free loopback port, one clearing worker, several
simulated terminals with simulated cards and PSAMs (one of them through the real
serial driver on a pseudo-terminal), and the whole business day:

key ceremony → card issuance → monthly recharge file imported → sign-on → a day
of purchases across both programs with voids, refunds, a lost card, an offline
period, a lost answer and its reversal → batch settlement → end of day →
reconciliation against a generated bank file with injected discrepancies →
error cases opened, one proposed and approved by two different users → signed
reports → invariant and audit checks.

Each step is a :class:`Stage` (a small async function over the shared
:class:`DemoContext`); the runner reports progress stage by stage and the
result is a :class:`DemoResult` whose ``to_dict()`` is the ``--json`` document.
``--seed`` makes every choice reproducible; ``--txns`` scales the day.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from ops.logging import get_logger

DEFAULT_DEMO_DIR = Path("carepay-demo")
DEFAULT_CARDS = 40
DEFAULT_TERMINALS = 4
DEFAULT_TXNS = 200
DEFAULT_SEED = 20260301
MAX_DEMO_CARDS = 10_000
MAX_DEMO_TERMINALS = 64
MAX_DEMO_TXNS = 200_000
DEMO_MAKER = "clerk.wang"  # 经办
DEMO_CHECKER = "supervisor.li"  # 复核
STAGE_TIMEOUT_S = 600

log = get_logger("carepay.demo")


class StageUnavailable(RuntimeError):
    """A part the stage needs is not in this build (a module missing): the stage cannot run."""


class StageFailed(RuntimeError):
    """A stage ran and found something wrong (a check failed)."""


@dataclass(frozen=True)
class DemoOptions:
    dir: Path = DEFAULT_DEMO_DIR
    cards: int = DEFAULT_CARDS
    terminals: int = DEFAULT_TERMINALS
    txns: int = DEFAULT_TXNS
    seed: int = DEFAULT_SEED
    fresh: bool = True  # wipe a previous run's files under dir first

    def check(self) -> None:
        from ops.errors import BadInput

        if not 4 <= self.cards <= MAX_DEMO_CARDS:
            raise BadInput(f"--cards must be 4..{MAX_DEMO_CARDS}")
        if not 2 <= self.terminals <= MAX_DEMO_TERMINALS:
            raise BadInput(f"--terminals must be 2..{MAX_DEMO_TERMINALS}")
        if not 20 <= self.txns <= MAX_DEMO_TXNS:
            raise BadInput(f"--txns must be 20..{MAX_DEMO_TXNS}")


@dataclass
class StageOutcome:
    name: str
    title: str
    status: str  # "ok" | "failed" | "unavailable" | "skipped"
    seconds: float
    detail: str = ""
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass
class DemoContext:
    """Everything the stages share. Paths live under ``options.dir``."""

    options: DemoOptions
    rng: random.Random
    state: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    reports: dict[str, str] = field(default_factory=dict)
    business_dates: list[str] = field(default_factory=list)
    invariant_violations: list[str] = field(default_factory=list)
    cleanups: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    progress: Callable[[str], None] = lambda _msg: None

    @property
    def dir(self) -> Path:
        return self.options.dir

    def path(self, *parts: str) -> Path:
        p = self.dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def db_url(self) -> str:
        return f"sqlite+aiosqlite:///{(self.dir / 'carepay.db').resolve()}"

    def need(self, module: str) -> Any:
        """Import a carepay module the stage depends on; :class:`StageUnavailable` if it is not there."""
        try:
            return importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
                raise StageUnavailable(f"{module} not available") from None
            raise


StageFn = Callable[[DemoContext], Awaitable[dict[str, Any] | None]]


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    fn: StageFn


@dataclass
class DemoResult:
    options: DemoOptions
    db: str
    stages: list[StageOutcome]
    summary: dict[str, Any]
    reports: dict[str, str]
    business_dates: list[str]
    invariant_violations: list[str]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(s.status == "ok" for s in self.stages) and not self.invariant_violations

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "db": self.db,
            "dir": str(self.options.dir),
            "seed": self.options.seed,
            "business_dates": self.business_dates,
            "reports": self.reports,
            "summary": self.summary,
            "invariant_violations": self.invariant_violations,
            "stages": [
                {"name": s.name, "title": s.title, "status": s.status, "seconds": round(s.seconds, 3),
                 "detail": s.detail, **({"facts": s.facts} if s.facts else {})}
                for s in self.stages
            ],
            "seconds": round(self.seconds, 3),
        }


def stages() -> list[Stage]:
    """The demo's stages, in order (see :mod:`ops.demo_stages`)."""
    from ops import demo_stages as s

    return [
        Stage("setup", "Prepare the data directory and logs", s.stage_setup),
        Stage("keys", "Key ceremony (2 officers' components → key store)", s.stage_keys),
        Stage("database", "Create the ledger (SQLite, WAL)", s.stage_database),
        Stage("registry", "Register providers and terminals", s.stage_registry),
        Stage("cards", "Issue and personalise cards", s.stage_cards),
        Stage("recharge", "Import the monthly recharge file", s.stage_recharge),
        Stage("services", "Start the embedded broker and a clearing worker", s.stage_services),
        Stage("terminals", "Start terminals (one on a serial pty) and sign on", s.stage_terminals),
        Stage("day", "A day of purchases, voids, refunds and faults", s.stage_day),
        Stage("settle", "Batch settlement at every terminal", s.stage_settle),
        Stage("eod", "End of day: cut-off and provider settlement", s.stage_eod),
        Stage("reconcile", "Reconcile with the bank's file (injected breaks)", s.stage_reconcile),
        Stage("errors", "Error cases: propose (maker) and approve (checker)", s.stage_errors),
        Stage("reports", "Signed reports and verification", s.stage_reports),
        Stage("checks", "Ledger invariants and the audit chain", s.stage_checks),
        Stage("backup", "Online backup of the ledger", s.stage_backup),
    ]


async def run_demo(
    options: DemoOptions,
    on_stage_start: Callable[[Stage], None] = lambda _s: None,
    on_stage_end: Callable[[StageOutcome], None] = lambda _o: None,
    on_progress: Callable[[str], None] = lambda _m: None,
) -> DemoResult:
    """Run every stage in order; a failed or unavailable stage skips the rest. Always cleans up."""
    options.check()
    started = time.perf_counter()
    ctx = DemoContext(options=options, rng=random.Random(options.seed), progress=on_progress)
    outcomes: list[StageOutcome] = []
    blocked = ""
    try:
        for stage in stages():
            if blocked:
                outcome = StageOutcome(stage.name, stage.title, "skipped", 0.0, f"after {blocked}")
                outcomes.append(outcome)
                on_stage_end(outcome)
                continue
            on_stage_start(stage)
            t0 = time.perf_counter()
            try:
                facts = await asyncio.wait_for(stage.fn(ctx), STAGE_TIMEOUT_S) or {}
                outcome = StageOutcome(stage.name, stage.title, "ok", time.perf_counter() - t0,
                                       str(facts.pop("detail", "")), facts)
            except StageUnavailable as exc:
                outcome = StageOutcome(stage.name, stage.title, "unavailable", time.perf_counter() - t0, str(exc))
                blocked = stage.name
            except Exception as exc:  # one stage's failure is reported, never a traceback on the console
                log.exception("demo stage failed", stage=stage.name)
                outcome = StageOutcome(stage.name, stage.title, "failed", time.perf_counter() - t0,
                                       f"{type(exc).__name__}: {exc}")
                blocked = stage.name
            outcomes.append(outcome)
            log.info("demo stage", stage=stage.name, status=outcome.status, seconds=round(outcome.seconds, 3),
                     detail=outcome.detail)
            on_stage_end(outcome)
    finally:
        for cleanup in reversed(ctx.cleanups):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(cleanup(), 30)
    return DemoResult(
        options=options, db=ctx.db_url, stages=outcomes, summary=ctx.summary, reports=ctx.reports,
        business_dates=ctx.business_dates, invariant_violations=ctx.invariant_violations,
        seconds=time.perf_counter() - started,
    )


def today_local(tz: str = "Asia/Shanghai") -> date:
    from datetime import datetime
    from zoneinfo import ZoneInfo

    return datetime.now(ZoneInfo(tz)).date()
