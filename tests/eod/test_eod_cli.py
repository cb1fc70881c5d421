"""The CLI verbs end to end on an SQLite file: sim bank-file → eod run → reconcile → errors → report verify."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from clearing.audit import verify_chain
from tests.eod.conftest import Day
from tests.ops.cli_helpers import CliResult, invoke


async def cli(*args: str) -> CliResult:
    return await asyncio.to_thread(invoke, *args)


async def test_cli_day(sqlite_day: tuple[str, Day], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, day = sqlite_day
    monkeypatch.setenv("CAREPAY_DATA_DIR", str(tmp_path / "data"))
    bank = tmp_path / "bank-20260310.txt"
    out = tmp_path / "reports"

    res = await cli("sim", "bank-file", "--date", "2026-03-10", "--out", str(bank), "--discrepancies", "0.3",
                    "--seed", "3", "--db", url, "--json")
    assert res.exit_code == 0, res.output
    truth = json.loads(Path(str(bank) + ".truth.json").read_text())
    assert all(n >= 1 for n in truth["counts"].values())

    res = await cli("eod", "run", "--date", "2026-03-10", "--bank-file", str(bank), "--db", url, "--out", str(out),
                    "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["reconciliation"]["new"] == len(truth["breaks"])
    assert len(doc["reports"]) == 10

    res = await cli("reconcile", "--date", "2026-03-10", "--bank-file", str(bank), "--db", url, "--out", str(out),
                    "--json")
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert set(rec) == {"business_date", "counts", "breaks"}
    assert sorted((b["class"], b["rrn"]) for b in rec["breaks"]) == sorted(
        (b["class"], b["rrn"]) for b in truth["breaks"])
    assert sum(rec["counts"][c] for c in truth["counts"]) == len(truth["breaks"])

    res = await cli("errors", "list", "--status", "open", "--db", url, "--json")
    cases = json.loads(res.stdout)
    assert len(cases) == len(truth["breaks"])
    case = cases[0]["case_no"]
    assert (await cli("errors", "propose", case, "--user", "alice", "--action", "write_off", "--note",
                      "immaterial difference", "--db", url)).exit_code == 0
    refused = await cli("errors", "approve", case, "--user", "alice", "--db", url)
    assert refused.exit_code == 1 and "different person" in refused.output
    assert (await cli("errors", "approve", case, "--user", "bob", "--db", url)).exit_code == 0
    posted = await cli("errors", "post", case, "--user", "bob", "--db", url, "--json")
    assert posted.exit_code == 0 and json.loads(posted.stdout)["status"] == "closed"
    shown = json.loads((await cli("errors", "show", case, "--db", url, "--json")).stdout)
    assert (shown["maker"], shown["checker"], shown["action"]) == ("alice", "bob", "write_off")

    opened = await cli("errors", "open", "--date", "2026-03-10", "--rrn", day.rrns["purchase"][0], "--user", "carol",
                       "--note", "cardholder complaint by phone", "--db", url, "--json")
    assert opened.exit_code == 0, opened.output
    assert (json.loads(opened.stdout)["source"], json.loads(opened.stdout)["status"]) == ("manual", "open")

    journal = tmp_path / "journal.csv"
    res = await cli("report", "journal", "--date", "2026-03-10", "--format", "csv", "--out", str(journal),
                    "--db", url, "--user", "auditor1")
    assert res.exit_code == 0, res.output
    assert (await cli("report", "verify", str(journal))).exit_code == 0
    journal.write_text(journal.read_text().replace("SUCCESS", "FAILED", 1))
    assert (await cli("report", "verify", str(journal))).exit_code == 1

    access = tmp_path / "access.csv"
    await cli("report", "access", "--date", "2026-03-10", "--format", "csv", "--out", str(access), "--db", url)
    assert "auditor1" in access.read_text()  # the journal export is on the access trail

    res = await cli("audit", "verify", "--db", url, "--manifest", str(out / "manifest-20260310.json"), "--json")
    assert res.exit_code == 0, res.output
    res = await cli("report", "verify", str(out), "--chain", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["manifests"] == 1, res.output
    assert (await verify_chain(day.engine)).intact


async def test_cli_rejects_bad_bank_file(sqlite_day: tuple[str, Day], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = sqlite_day
    monkeypatch.setenv("CAREPAY_DATA_DIR", str(tmp_path / "data"))
    bank = tmp_path / "bank.txt"
    assert (await cli("sim", "bank-file", "--date", "2026-03-10", "--out", str(bank), "--db", url)).exit_code == 0
    lines = bank.read_text().splitlines()
    _, count, total = lines[-1].split("|")
    lines[-1] = f"T|{count}|{int(total) + 1}"  # trailer disagrees with the details
    bank.write_text("\n".join(lines) + "\n")
    res = await cli("reconcile", "--date", "2026-03-10", "--bank-file", str(bank), "--db", url)
    assert res.exit_code == 2 and "trailer" in res.output
    res = await cli("eod", "run", "--date", "2026-03-10", "--bank-file", str(bank), "--db", url)
    assert res.exit_code == 2  # rejected before anything is closed
    other = await cli("reconcile", "--date", "2026-03-11", "--bank-file", str(bank), "--db", url)
    assert other.exit_code == 2
    assert (await cli("eod", "run", "--date", "03/10/2026", "--db", url)).exit_code == 2
    early = await cli("eod", "run", "--date", "2099-01-01", "--db", url)  # before its cut-off
    assert early.exit_code == 2 and "--early" in early.output
