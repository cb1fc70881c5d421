"""The seeded fault soak at CI size: every phase's checks must come back empty.

A seed that ever fails (``bench/soak.py`` prints it) goes into ``REGRESSION_SEEDS`` and stays there.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.soak.scenario import PHASES, SoakConfig, run_soak

CI_SEEDS = (11, 29)
REGRESSION_SEEDS: tuple[int, ...] = (1,)
"""1: on PostgreSQL with 2 workers, a void answered 96 (a ledger batch lost a unique-key race) was recorded as
declined while the host had posted it; purchases answered 96 were taken as declines too."""
PG_SEEDS = (1,)

pytestmark = [pytest.mark.mqtt, pytest.mark.timeout(240)]


@pytest.fixture(autouse=True)
def _need_mosquitto() -> None:
    from ops.mosquitto_proc import find_mosquitto

    try:
        find_mosquitto()
    except Exception as exc:  # the soak drives its own mosquitto (restarts it): it needs the binary
        from tests.conftest import IN_CI

        if IN_CI:
            pytest.fail(f"mosquitto binary needed for the soak: {exc}")
        pytest.skip(f"mosquitto binary needed for the soak: {exc}")


@pytest.mark.parametrize("seed", REGRESSION_SEEDS)
async def test_soak_regression_seed(seed: int, tmp_path: Path) -> None:
    """A seed that once failed: it must stay clean. Which faults a small run draws depends on timing (how many
    retries and reversals the phase produced), so only the CI seeds below also assert every fault kind occurred."""
    report = await run_soak(SoakConfig(seed=seed, workdir=tmp_path / f"soak-{seed}", txns_per_phase=24))
    assert [p["name"] for p in report.to_dict()["phases"]] == list(PHASES)
    assert report.violations == [], f"regression seed {seed} failed again: {report.violations[:10]}"
    assert report.faults.get("broker_restarts") == 1 and report.faults.get("workers_killed") == 1
    assert report.checks >= len(PHASES) * 3


@pytest.mark.parametrize("seed", CI_SEEDS)
async def test_soak_seed(seed: int, tmp_path: Path) -> None:
    report = await run_soak(SoakConfig(seed=seed, workdir=tmp_path / f"soak-{seed}", txns_per_phase=24))
    doc = report.to_dict()
    assert [p["name"] for p in doc["phases"]] == list(PHASES)
    assert report.violations == [], f"seed {seed} failed (add it to REGRESSION_SEEDS): {report.violations[:10]}"
    faults = report.faults
    # every fault kind actually happened
    assert faults.get("duplicated", 0) + faults.get("reordered", 0) > 0
    assert faults.get("answers_lost", 0) > 0
    assert faults.get("broker_restarts") == 1 and faults.get("workers_killed") == 1
    assert faults.get("torn_cards", 0) > 0 and faults.get("clock_skew_terminals", 0) > 0
    assert report.checks >= len(PHASES) * 3
    assert report.transactions >= len(PHASES) * 24


@pytest.mark.parametrize("seed", PG_SEEDS)
async def test_soak_seed_on_postgresql(seed: int, tmp_path: Path, pg_url: str) -> None:
    """PG mode: two worker processes racing on one PostgreSQL schema (unique-key races, snapshot checks)."""
    report = await run_soak(SoakConfig(seed=seed, workdir=tmp_path / f"soak-pg-{seed}", txns_per_phase=24,
                                       pg_url=pg_url))
    assert report.violations == [], f"seed {seed} failed on PostgreSQL: {report.violations[:10]}"
    assert report.checks >= len(PHASES) * 3
    assert report.transactions >= len(PHASES) * 24


async def test_soak_with_ledger_processes(tmp_path: Path) -> None:
    """Every fault with the workers as ``clearing serve --ledger-process`` runs them: each worker's clearing service
    in a child process (a worker killed -9 leaves its child to finish what it holds and exit)."""
    report = await run_soak(SoakConfig(seed=CI_SEEDS[0], workdir=tmp_path / "soak-lp", txns_per_phase=24,
                                       ledger_process=True))
    assert [p["name"] for p in report.to_dict()["phases"]] == list(PHASES)
    assert report.violations == [], f"ledger-process soak failed: {report.violations[:10]}"
    assert report.faults.get("broker_restarts") == 1 and report.faults.get("workers_killed") == 1
    assert report.checks >= len(PHASES) * 3
    assert report.transactions >= len(PHASES) * 24
