"""Reports: self-contained HTML (rendered in headless Chromium, screenshot taken), CSV beside, masking."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import polars as pl
import pytest

from clearing.eod import run_eod
from tests.eod.conftest import Day, make_bank_file

CHROMIUM = "/usr/bin/chromium"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SCREENSHOT_TIMEOUT_S = 90
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CARD_NO = re.compile(r"(?<![0-9])[0-9]{19}(?![0-9])")


def chromium() -> str:
    if Path(CHROMIUM).exists():
        return CHROMIUM
    reason = f"{CHROMIUM} not installed (apt-get install chromium)"
    if IN_CI:
        pytest.fail(f"{reason}; CI=true requires it")
    print(f"skipping: {reason}")
    pytest.skip(reason)


def screenshot(html: Path, png: Path) -> None:
    profile = png.parent / f"chromium-profile-{png.stem}"
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--hide-scrollbars", f"--user-data-dir={profile}", "--no-first-run", "--window-size=1280,1600",
           f"--screenshot={png}", html.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, timeout=SCREENSHOT_TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-800:]
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
async def reports(sqlite_day: tuple[str, Day], eod_config, tmp_path: Path) -> dict[str, Path]:
    _, day = sqlite_day
    bank = tmp_path / "bank.txt"
    await make_bank_file(day, bank, rate=0.3, seed=2)
    doc = await run_eod(day.engine, day.business_date, eod_config, bank)
    return {Path(p).name: Path(p) for p in doc["reports"]}


async def test_html_reports_render_in_chromium(reports: dict[str, Path], tmp_path: Path) -> None:
    for kind in ("daily", "settlement", "stats", "journal", "access"):
        html = reports[f"{kind}-20260310.html"]
        text = html.read_text(encoding="utf-8")
        assert "<svg" in text and "<script" not in text.lower()
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)  # nothing fetched from a network
        png = tmp_path / f"{kind}.png"
        screenshot(html, png)
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000  # a real rendered page, not a blank one


async def test_reports_content_and_masking(reports: dict[str, Path]) -> None:
    for name, path in reports.items():
        assert not CARD_NO.search(path.read_text(encoding="utf-8")), f"unmasked card number in {name}"
    daily = pl.read_csv(reports["daily-20260310.csv"], infer_schema=False)
    assert set(daily["section"].unique()) == {"class", "break", "aging"}
    breaks = daily.filter(pl.col("section") == "break")
    assert breaks.height > 0 and breaks["case_no"].is_not_null().all()
    html = reports["daily-20260310.html"].read_text(encoding="utf-8")
    assert "out of balance" in html  # the terminal batch whose totals disagree
    journal = pl.read_csv(reports["journal-20260310.csv"], infer_schema=False)
    assert journal.columns[:14] == ["rrn", "business_date", "provider_id", "terminal_id", "batch_no", "trace_no",
                                    "txn_type", "program", "card_no_masked", "amount_fen", "fee_fen", "txn_time",
                                    "status", "orig_rrn"]
    assert journal["card_no_masked"].str.contains(r"^[0-9]{6}\*{9}[0-9]{4}$").all()
    stats = pl.read_csv(reports["stats-20260310.csv"], infer_schema=False)
    assert {"month", "district", "street", "provider_id", "program"} <= set(stats.columns)
    assert set(stats["district"].unique()) == {"110105"}
    access = pl.read_csv(reports["access-20260310.csv"], infer_schema=False)
    assert (access["action"] == "export").any()
