"""The stages of ``carepay demo`` (see :mod:`ops.demo`): each one small step of the business day.

Every stage takes the shared :class:`~ops.demo.DemoContext`, does its work with
the real parts (key store, simulator, clearing, terminal agent, end of day) and
returns a few facts for the progress display and the ``--json`` document.
"""

from __future__ import annotations

import contextlib
import shutil
from typing import Any

from ops.demo import DemoContext, StageFailed, StageUnavailable, today_local
from ops.logging import configure_logging, get_logger

log = get_logger("carepay.demo")

DEMO_KEY_COMPONENTS = 2


# --- 1. setup


async def stage_setup(ctx: DemoContext) -> dict[str, Any]:
    d = ctx.dir
    if ctx.options.fresh and d.exists():
        for name in ("carepay.db", "carepay.db-wal", "carepay.db-shm", "keys", "cards", "files", "reports",
                     "terminals", "logs", "backup"):
            target = d / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    d.mkdir(parents=True, exist_ok=True)
    log_file = ctx.path("logs", "carepay.log")
    configure_logging(json=False, level="DEBUG", log_file=log_file, console_level="CRITICAL")
    log.info("demo started", dir=str(d.resolve()), seed=ctx.options.seed, cards=ctx.options.cards,
             terminals=ctx.options.terminals, txns=ctx.options.txns)
    ctx.state["log_file"] = log_file
    return {"detail": f"{d.resolve()}", "log": str(log_file)}


# --- 2. keys


async def stage_keys(ctx: DemoContext) -> dict[str, Any]:
    ceremony = ctx.need("keys.ceremony")
    store_mod = ctx.need("keys.store")
    store_path = ctx.path("keys", "keystore.json")
    result = ceremony.run_ceremony(store_path, DEMO_KEY_COMPONENTS, generate=True, demo=True)
    comps = [f for _i, _k, f in result.components if f]
    store = store_mod.KeyStore.from_components(store_path, comps)
    ctx.state["keystore"] = store
    ctx.state["key_components"] = comps

    async def _close() -> None:
        store.close()

    ctx.cleanups.append(_close)
    log.info("key ceremony", kek_kcv=result.kek_kcv, key_count=len(result.keys), component_count=len(comps))
    return {"detail": f"KEK KCV {result.kek_kcv}, {len(result.keys)} keys sealed", "kek_kcv": result.kek_kcv}


# --- 3. database


async def stage_database(ctx: DemoContext) -> dict[str, Any]:
    db = ctx.need("clearing.db")
    engine = db.make_engine(ctx.db_url)
    ctx.state["engine"] = engine

    async def _dispose() -> None:
        await engine.dispose()

    ctx.cleanups.append(_dispose)
    applied = await db.init_db(engine)
    return {"detail": f"{ctx.dir / 'carepay.db'} ({len(applied or [])} migrations)"}


# --- placeholders wired as the parts land


async def _unavailable(ctx: DemoContext, what: str) -> dict[str, Any]:
    raise StageUnavailable(what)


DEMO_DISTRICT = "110105"  # 朝阳区
PROVIDER_NAMES = {"voucher": ("幸福里助餐点", "康乐家政服务中心", "夕阳红日间照料中心", "安康助浴服务站"),
                  "nursing": ("仁爱护理站", "颐养上门护理服务部", "同心康复护理中心", "长青护理院")}
PROVIDER_CATEGORIES = {"voucher": ["meal", "bathing", "cleaning", "daycare", "companionship"],
                       "nursing": ["nursing_care", "rehab", "home_care", "medical_escort"]}


def provider_id_for(index: int) -> str:
    return f"P{DEMO_DISTRICT}{index:08d}"


def terminal_id_for(index: int) -> str:
    return f"T{index:07d}"


async def stage_registry(ctx: DemoContext) -> dict[str, Any]:
    """Providers for both programs, and terminals bound to them with TMK and SM2 keys in the key store."""
    registry = ctx.need("clearing.registry")
    tk = ctx.need("clearing.terminal_keys")
    diversify = ctx.need("keys.diversify")
    store = ctx.state["keystore"]
    engine = ctx.state["engine"]
    n_terms = ctx.options.terminals
    n_providers = max(2, (n_terms + 1) // 2)
    providers: list[dict[str, Any]] = []
    for i in range(n_providers):
        program = ("voucher", "nursing")[i % 2]
        pid = provider_id_for(i + 1)
        name = PROVIDER_NAMES[program][(i // 2) % len(PROVIDER_NAMES[program])]
        if i >= 2 * len(PROVIDER_NAMES[program]):
            name = f"{name}{i // 8 + 1}号"
        await registry.add_provider(engine, pid, name, [program], PROVIDER_CATEGORIES[program],
                                    settle_account=f"6222{i + 1:012d}", district=DEMO_DISTRICT)
        providers.append({"provider_id": pid, "program": program, "name": name})
    terminals: list[dict[str, Any]] = []
    install = today_local()
    for i in range(n_terms):
        tid = terminal_id_for(i + 1)
        provider = providers[i % n_providers]
        tmk = tk.demo_terminal_tmk(tid)
        pair = tk.demo_terminal_sm2(tid)
        store.put_symmetric(f"tmk:{tid}", tmk, "sm4")
        store.put_sm2(tid, pair)
        await registry.register_terminal(
            engine, tid, provider["provider_id"], psam_serial=f"PSAM{i + 1:08d}", install_date=install,
            address=f"北京市朝阳区示范街{i + 1}号", sm2_public_key=pair.public_key.hex().upper(),
            tmk_kcv=diversify.kcv(tmk).hex().upper())
        terminals.append({"terminal_id": tid, **provider})
    ctx.state["providers"] = providers
    ctx.state["terminals"] = terminals
    return {"detail": f"{len(providers)} providers (voucher and nursing), {len(terminals)} terminals"}


async def stage_cards(ctx: DemoContext) -> dict[str, Any]:
    """Personalise cards with keys diversified from the key store's issuer keys; register them with clearing."""
    personalise = ctx.need("simulator.personalise")
    cardfile = ctx.need("simulator.cardfile")
    config = ctx.need("ops.config")
    store = ctx.state["keystore"]
    key_set = store.issuer_key_set("sm4")
    aid = bytes.fromhex(config.DEFAULT_AID_HEX)
    cards = personalise.issue_cards(ctx.options.cards, aid=aid, key_set=key_set, seed=ctx.options.seed,
                                    today=today_local())
    deck = cardfile.CardDeck(cards=cards, issuer="keystore:demo", path=ctx.path("cards", "deck.json"))
    deck.save()
    ctx.state["cards"] = cards
    ctx.state["key_set"] = key_set
    registered = await _register_cards(ctx, cards)
    nursing = sum(1 for c in cards if "nursing" in _card_programs(c))
    return {"detail": f"{len(cards)} cards personalised ({nursing} with nursing subsidy), {registered} registered",
            "deck": str(deck.path)}


def _card_programs(card: Any) -> tuple[str, ...]:
    from protocol import card_files as cf

    return cf.programs_from_bits(cf.ENTITLEMENT.parse(card.entitlement_ef).programs)


def card_spec(card: Any) -> dict[str, Any]:
    """What the issuing bank registers for a personalised card (the cardholder EF plus serial and keys' version)."""
    from protocol import card_files as cf

    holder = cf.CARDHOLDER.parse(card.cardholder_ef)
    return {
        "card_no": holder.card_no, "id_no": holder.id_no, "name": holder.name, "app_serial": card.app_serial,
        "district_code": holder.district_code, "street_code": holder.street_code,
        "category": cf.Category(holder.category).name, "valid_until": holder.valid_until,
        "programs": _card_programs(card), "key_version": card.key_version, "suite": card.suite.value,
        "status": "active",
    }


async def _register_cards(ctx: DemoContext, cards: list[Any]) -> int:
    lifecycle = ctx.need("clearing.lifecycle")
    specs = [card_spec(c) for c in cards]
    ctx.state["card_specs"] = specs
    return int(await lifecycle.register_cards(ctx.state["engine"], specs))


VOUCHER_MONTHLY_FEN = {"AGE60": 10_000, "AGE80": 20_000, "DISABILITY": 30_000, "DISABLED_ELDERLY": 40_000}
"""Monthly elder-care service voucher per category (illustrative amounts, fen)."""
NURSING_MONTHLY_FEN = 60_000
"""Monthly nursing subsidy for disabled elderly (illustrative, fen)."""


async def stage_recharge(ctx: DemoContext) -> dict[str, Any]:
    """Write the civil-affairs monthly subsidy file for every card and import it (all or nothing)."""
    rfile = ctx.need("protocol.files.recharge")
    recharge = ctx.need("clearing.recharge")
    today = today_local()
    period = f"{today:%Y%m}"
    batch_id = f"MZ{period}-{ctx.options.seed % 100_000:05d}"
    expires = _month_end(today.year + (1 if today.month == 12 else 0), 1 if today.month == 12 else today.month + 1)
    lines = []
    for spec in ctx.state["card_specs"]:
        voucher = VOUCHER_MONTHLY_FEN.get(spec["category"], 10_000)
        lines.append(rfile.RechargeLine(batch_id, spec["card_no"], spec["id_no"], "voucher", voucher, period, expires))
        if "nursing" in spec["programs"]:
            lines.append(rfile.RechargeLine(batch_id, spec["card_no"], spec["id_no"], "nursing", NURSING_MONTHLY_FEN,
                                            period, None))
    path = rfile.write_recharge(ctx.path("files", f"recharge-{batch_id}.csv"), lines)
    result = await recharge.import_recharge(ctx.state["engine"], path)
    total = sum(line.amount_fen for line in lines)
    ctx.summary["recharge"] = {"batch": batch_id, "lines": len(lines), "total": _yuan(total)}
    ctx.state["recharge_file"] = path
    return {"detail": f"batch {batch_id}: {len(lines)} lines, {_yuan(total)} yuan ({path.name})",
            "result": _plain(result)}


def _month_end(year: int, month: int) -> Any:
    import calendar
    from datetime import date

    return date(year, month, calendar.monthrange(year, month)[1])


def _yuan(fen: int) -> str:
    from protocol.money import format_fen

    return format_fen(fen)


def _plain(obj: Any) -> Any:
    """A result object as JSON-friendly data (dataclass → dict), for the --json document."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return str(obj)


async def stage_services(ctx: DemoContext) -> dict[str, Any]:
    """The embedded MQTT broker on a free loopback port, the clearing service and one worker, /metrics."""
    import asyncio

    eb = ctx.need("ops.embedded_broker")
    service_mod = ctx.need("clearing.service")
    worker_mod = ctx.need("clearing.worker")
    tk = ctx.need("clearing.terminal_keys")
    signon = ctx.need("clearing.signon")
    from ops.config import load_settings
    from ops.metrics import start_metrics_server

    store, engine = ctx.state["keystore"], ctx.state["engine"]
    broker = eb.EmbeddedBroker()
    await broker.start()
    ctx.cleanups.append(broker.stop)
    ctx.state["broker_url"] = broker.url

    settings = load_settings().clearing
    service = service_mod.ClearingService(engine, ctx.state["key_set"], service_mod.ClearingConfig.from_settings(settings))
    await service.start()
    ctx.cleanups.append(service.stop)
    ctx.state["service"] = service
    if hasattr(tk, "ensure_schema"):
        await tk.ensure_schema(engine)
    wkm = tk.working_key_master_from_keystore(store)
    working = tk.WorkingKeys(engine, wkm)
    sign_on = signon.SignOnService(tk.KeyStoreTerminalKeys(store), working, wkm, engine)
    worker = worker_mod.ClearingWorker(broker.url, service, working, sign_on, embedded=True, name="demo",
                                       max_age_s=settings.message_max_age_s)
    task = asyncio.create_task(worker.run(), name="clearing-worker")

    async def _stop_worker() -> None:
        worker.stop()
        await worker.drain(5)
        task.cancel()
        with contextlib.suppress(BaseException):
            await task

    ctx.cleanups.append(_stop_worker)
    await asyncio.wait_for(worker.ready.wait(), 15)
    ctx.state["worker"] = worker
    metrics = start_metrics_server(0)

    async def _close_metrics() -> None:
        metrics.close()

    ctx.cleanups.append(_close_metrics)
    ctx.summary["metrics"] = metrics.url
    return {"detail": f"broker {broker.url}, 1 clearing worker, metrics {metrics.url}", "broker": broker.url}


async def stage_terminals(ctx: DemoContext) -> dict[str, Any]:
    """Every terminal: PSAM in its reader (terminal 1 through the serial driver on a pty), journal, sign-on."""
    fleet = ctx.need("ops.demo_fleet")
    tk = ctx.need("clearing.terminal_keys")
    from ops.config import DEFAULT_AID_HEX

    aid = bytes.fromhex(DEFAULT_AID_HEX)
    terminals = []
    for i, t in enumerate(ctx.state["terminals"]):
        term = await fleet.open_terminal(
            index=i, terminal_id=t["terminal_id"], provider_id=t["provider_id"], provider_name=t["name"],
            program=t["program"], broker_url=ctx.state["broker_url"], key_set=ctx.state["key_set"],
            tmk=tk.demo_terminal_tmk(t["terminal_id"]), sm2=tk.demo_terminal_sm2(t["terminal_id"]), aid=aid,
            workdir=ctx.dir / "terminals" / t["terminal_id"], serial=(i == 0),
            categories=tuple(PROVIDER_CATEGORIES[t["program"]]))
        ctx.cleanups.append(term.close)
        terminals.append(term)
        if not term.agent.signed_on:
            raise StageFailed(f"terminal {term.terminal_id} could not sign on")
        ctx.progress(f"{term.terminal_id} signed on (key version {term.agent.key_version})")
    ctx.state["demo_terminals"] = terminals
    serial = terminals[0]
    return {"detail": f"{len(terminals)} terminals signed on; {serial.terminal_id} via the serial driver on "
                      f"{serial.pty.path}", "pty": serial.pty.path}


async def stage_day(ctx: DemoContext) -> dict[str, Any]:
    """The day's traffic across both programs, with voids, refunds, a lost card, an offline period, a lost answer."""
    fleet = ctx.need("ops.demo_fleet")
    from ops.config import load_settings

    floor = load_settings().terminal.offline_floor_limit_fen
    scripts, chosen = fleet.plan_day(ctx.rng, ctx.state["terminals"], ctx.state["card_specs"], ctx.options.txns,
                                     floor)
    runner = fleet.DayRunner(ctx.state["demo_terminals"], ctx.state["cards"], ctx.state["engine"], ctx.rng,
                             ctx.progress)
    await runner.run(scripts)
    stats = _day_stats(ctx.state["demo_terminals"])
    ctx.summary["transactions"] = stats["counts"]
    ctx.summary["amounts"] = stats["amounts"]
    ctx.summary["faults"] = {"offline_purchases": stats["counts"].get("offline approved", 0),
                             "answers_lost": sum(t.host.answers_dropped for t in ctx.state["demo_terminals"]),
                             "lost_card_declines": stats["counts"].get("declined 62", 0)}
    ctx.state["events"] = runner.events
    receipts = ctx.path("terminals", "receipts.txt")
    receipts.write_text("\n\n".join(r for t in ctx.state["demo_terminals"] for r in t.receipts[:5]), encoding="utf-8")
    log.info("day done", counts=stats["counts"], events=runner.events)
    if ctx.summary["faults"]["answers_lost"] < 1 or stats["counts"].get("reversed", 0) < 1:
        raise StageFailed("the lost answer was not reversed")
    if stats["counts"].get("declined 62", 0) < 1:
        raise StageFailed("the lost card was not declined")
    return {"detail": ", ".join(f"{k} {v}" for k, v in stats["counts"].items()), "events": runner.events,
            "chosen": chosen}


def _day_stats(terminals: list[Any]) -> dict[str, Any]:
    from collections import Counter

    counts: Counter[str] = Counter()
    amounts: Counter[str] = Counter()
    for t in terminals:
        for row in t.agent.journal.rows():
            if row.kind == "reversal":
                continue
            if row.kind == "offline_purchase" or (row.kind == "purchase" and row.state in ("advised", "offline")):
                counts["offline approved"] += 1
                amounts[f"{row.program} offline"] += row.amount_fen
            elif row.state == "approved":
                counts[f"{row.kind} approved"] += 1
                amounts[f"{row.program} {row.kind}"] += row.amount_fen
            elif row.state == "reversed":
                counts["reversed"] += 1
            elif row.state == "declined":
                counts[f"declined {row.response_code or 'offline'}"] += 1
            else:
                counts[row.state] += 1
    return {"counts": dict(sorted(counts.items())),
            "amounts": {k: _yuan(v) for k, v in sorted(amounts.items())}}


async def stage_settle(ctx: DemoContext) -> dict[str, Any]:
    """批结算 at every terminal: counts and totals per type; the host answers balanced or not."""
    fleet = ctx.need("ops.demo_fleet")
    balanced = 0
    for t in ctx.state["demo_terminals"]:
        waiting = await fleet.drain(t)
        if waiting:
            raise StageFailed(f"{t.terminal_id}: {waiting} transaction(s) still waiting for the host")
        outcome = await t.agent.settle()
        balanced += int(outcome.balanced)
        if not outcome.balanced:
            log.warning("batch did not balance", terminal_id=t.terminal_id, batch_no=outcome.batch_no,
                        missing_on_host=outcome.missing_on_host, missing_on_terminal=outcome.missing_on_terminal)
    n = len(ctx.state["demo_terminals"])
    ctx.summary["batches"] = {"balanced": balanced, "unbalanced": n - balanced}
    if balanced != n:
        raise StageFailed(f"{n - balanced} terminal batch(es) did not balance")
    return {"detail": f"{balanced}/{n} batches balanced"}


async def _business_dates(engine: Any) -> list[Any]:
    from sqlalchemy import select

    from clearing.schema import host_txns

    async with engine.connect() as conn:
        rows = await conn.execute(select(host_txns.c.business_date).distinct().order_by(host_txns.c.business_date))
        return [r[0] for r in rows]


def _eod_config(ctx: DemoContext, d: Any) -> Any:
    eod = ctx.need("clearing.eod")
    signing = ctx.need("clearing.signing")
    from ops.config import load_settings

    s = load_settings().clearing
    return eod.EodConfig(data_dir=ctx.dir, out_dir=ctx.dir / "reports" / d.isoformat(),
                         signer=signing.signer_for(ctx.dir, ctx.state["keystore"]), cutoff_local_time=s.cutoff_local_time,
                         timezone=s.timezone, fee_rate_ppm=s.fee_rate_ppm, bank_code=s.bank_code, actor="demo:eod")


async def stage_eod(ctx: DemoContext) -> dict[str, Any]:
    """Cut-off: close each business date's settlement window and settle every provider (fees to the bank)."""
    eod = ctx.need("clearing.eod")
    dates = await _business_dates(ctx.state["engine"])
    if not dates:
        raise StageFailed("no host transactions: nothing to close")
    ctx.business_dates = [d.isoformat() for d in dates]
    settlements = []
    for d in dates:
        cfg = _eod_config(ctx, d)
        out = await eod.close_and_settle(ctx.state["engine"], d, cfg)
        settlements.append(out)
        ctx.reports[f"settlement file {d.isoformat()}"] = out["settlement_file"]
    ctx.state["settlements"] = settlements
    net = sum(s["net_fen"] for s in settlements)
    fee = sum(s["fee_fen"] for s in settlements)
    providers = sum(s["providers"] for s in settlements)
    ctx.summary["settlement"] = {"providers": providers, "net paid": _yuan(net), "fees (bank)": _yuan(fee)}
    return {"detail": f"{', '.join(ctx.business_dates)}: {providers} providers, net {_yuan(net)} yuan, "
                      f"fees {_yuan(fee)} yuan"}


BANK_DISCREPANCY_RATE = 0.06


async def stage_reconcile(ctx: DemoContext) -> dict[str, Any]:
    """The bank's clearing file (generated from the host journal, with injected discrepancies) reconciled."""
    bank_sim = ctx.need("simulator.bank_file")
    eod = ctx.need("clearing.eod")
    settlement = ctx.need("clearing.settlement")
    from ops.config import load_settings

    engine = ctx.state["engine"]
    bank_code = load_settings().clearing.bank_code
    totals: dict[str, int] = {}
    missed: list[str] = []
    ctx.state["recon"] = {}
    for iso in ctx.business_dates:
        from datetime import date

        d = date.fromisoformat(iso)
        async with engine.connect() as conn:
            journal = await conn.run_sync(settlement.journal_frame_sync, d)
        made = bank_sim.generate(journal, rate=BANK_DISCREPANCY_RATE, seed=ctx.options.seed)
        path = ctx.path("files", f"bank-{d:%Y%m%d}.txt")
        bank_sim.write(path, made.rows, d, bank_code)
        bank_sim.write_truth(bank_sim.truth_path(path), made, d, BANK_DISCREPANCY_RATE, ctx.options.seed)
        out = await eod.reconcile(engine, d, path, _eod_config(ctx, d))
        ctx.state["recon"][iso] = out
        ctx.reports[f"bank file {iso}"] = str(path)
        for cls, n in out["counts"].items():
            totals[cls] = totals.get(cls, 0) + int(n)
        found = {(b["class"], b["rrn"]) for b in out["breaks"]}
        for row in made.truth.iter_rows(named=True):
            if (row["class"], row["rrn"]) not in found:
                missed.append(f"{row['class']} {row['rrn']}")
    breaks = {k: v for k, v in totals.items() if k != "matched" and v}
    ctx.summary["breaks"] = breaks
    ctx.summary["matched"] = totals.get("matched", 0)
    if missed:
        raise StageFailed(f"injected breaks not found: {', '.join(missed[:5])}")
    cases = sum(o["run"]["cases_opened"] for o in ctx.state["recon"].values())
    return {"detail": f"matched {totals.get('matched', 0)}, breaks "
                      + (", ".join(f"{k} {v}" for k, v in breaks.items()) or "none")
                      + f"; every injected break found; {cases} error cases opened"}


async def stage_errors(ctx: DemoContext) -> dict[str, Any]:
    """One error case proposed by a maker and approved by a different checker, then posted; maker ≠ checker held."""
    ec = ctx.need("clearing.error_cases")
    from ops.demo import DEMO_CHECKER, DEMO_MAKER

    engine = ctx.state["engine"]
    async with engine.connect() as conn:
        cases = await conn.run_sync(lambda c: ec.list_cases_sync(c, status="open"))
    if not cases:
        raise StageFailed("no error case was opened")
    case = next((c for c in cases if c["class"] == "amount_mismatch"), cases[0])
    case_no = case["case_no"]
    from clearing.db import write_transaction

    async with write_transaction(engine) as conn:
        await conn.run_sync(lambda c: ec.propose_sync(
            c, case_no, DEMO_MAKER, "adjust" if case["provider_id"] else "write_off",
            "bank amount checked against the provider's service record; adjust in the next settlement"))
    refused = False
    try:
        async with write_transaction(engine) as conn:
            await conn.run_sync(lambda c: ec.approve_sync(c, case_no, DEMO_MAKER, "self-approval attempt"))
    except ec.MakerCheckerViolation:
        refused = True
    if not refused:
        raise StageFailed("the maker could approve their own proposal")
    async with write_transaction(engine) as conn:
        await conn.run_sync(lambda c: ec.approve_sync(c, case_no, DEMO_CHECKER, "approved after review"))
    async with write_transaction(engine) as conn:
        closed = await conn.run_sync(lambda c: ec.post_sync(c, case_no, DEMO_CHECKER))
    async with engine.connect() as conn:
        after = await conn.run_sync(lambda c: ec.list_cases_sync(c))
    by_status: dict[str, int] = {}
    for c in after:
        by_status[c["status"]] = by_status.get(c["status"], 0) + 1
    ctx.summary["error_cases"] = by_status
    return {"detail": f"case {case_no} ({case['class']}): proposed by {DEMO_MAKER}, self-approval refused, "
                      f"approved by {DEMO_CHECKER}, {closed['status']}; cases "
                      + ", ".join(f"{k} {v}" for k, v in sorted(by_status.items()))}


async def stage_reports(ctx: DemoContext) -> dict[str, Any]:
    """Every report (daily, settlement, stats, journal, access) as CSV and HTML, signed; the daily manifest."""
    eod = ctx.need("clearing.eod")
    signing = ctx.need("clearing.signing")
    engine = ctx.state["engine"]
    written = 0
    bad = []
    from datetime import date

    trusted = signing.trusted_public_key(ctx.dir, ctx.state["keystore"])
    for iso, settle in zip(ctx.business_dates, ctx.state["settlements"], strict=True):
        d = date.fromisoformat(iso)
        cfg = _eod_config(ctx, d)
        paths = await eod.write_reports(engine, d, cfg)
        files = [__import__("pathlib").Path(settle["settlement_file"]), *paths]
        manifest = await eod.write_manifest(engine, d, cfg, ctx.state["recon"].get(iso), settle, files)
        for p in [*files, manifest]:
            if not signing.verify_file(p, trusted).ok:
                bad.append(str(p))
        written += len(paths)
        for p in paths:
            if p.suffix == ".html":
                ctx.reports[f"{p.stem.rsplit('-', 1)[0]} {iso}"] = str(p)
        ctx.reports[f"manifest {iso}"] = str(manifest)
    if bad:
        raise StageFailed(f"signature check failed: {', '.join(bad)}")
    ctx.summary["reports_dir"] = str((ctx.dir / "reports").resolve())
    return {"detail": f"{written} report files + manifest, all signatures verified ({ctx.dir / 'reports'})"}


async def stage_checks(ctx: DemoContext) -> dict[str, Any]:
    """Ledger invariants (Σ debits = Σ credits, no negative balance, …) and the audit chain."""
    inv = ctx.need("clearing.invariants")
    audit = ctx.need("clearing.audit")
    engine = ctx.state["engine"]
    problems = list(await inv.check_invariants(engine))
    chain = await audit.verify_chain(engine)
    if not chain.intact:
        problems.append(f"audit chain broken at entry {chain.first_bad_seq}: {chain.problem}")
    ctx.invariant_violations.extend(problems)
    if problems:
        raise StageFailed("; ".join(problems[:3]))
    return {"detail": f"all ledger invariants hold; audit chain intact ({chain.entries} entries)"}


async def stage_backup(ctx: DemoContext) -> dict[str, Any]:
    """What operators do every night: an online backup of the ledger, integrity-checked."""
    from ops.backup import backup_sqlite

    out = ctx.path("backup", "carepay-backup.db")
    result = backup_sqlite(ctx.db_url, out, overwrite=True)
    ctx.reports["ledger backup"] = str(out)
    return {"detail": f"{out} ({result.bytes:,} bytes, {sum(result.tables.values()):,} rows, "
                      f"integrity {result.integrity})"}
