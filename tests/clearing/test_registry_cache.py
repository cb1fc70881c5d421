"""The SQLite writer keeps the cards, terminals and providers its batches read, and must never use them after
anyone else changed the database: a card reported lost, a provider suspended, a terminal suspended elsewhere is
declined by the very next batch."""

from __future__ import annotations

from clearing.lifecycle import report_lost, unblock
from clearing.registry import set_provider_status, set_terminal_status
from tests.clearing.conftest import PROVIDER_V, TERM_V, World


async def test_registry_rows_kept_between_batches_never_outlive_a_change_elsewhere(world: World) -> None:
    card = await world.add_card(1)
    await world.fund(card, "voucher", 100_000)
    assert (await world.svc.handle(world.purchase(card, 100))).response_code == "00"
    known = world.svc.writer._known
    sqlite = world.engine.dialect.name == "sqlite"
    assert (await world.svc.handle(world.purchase(card, 100))).response_code == "00"
    if sqlite:  # nothing else wrote since the writer's last commit: the rows it read are kept for the next batch
        assert card in known.registry.cards and TERM_V in known.registry.terminals

    await report_lost(world.engine, card)  # another connection
    assert (await world.svc.handle(world.purchase(card, 100))).response_code == "62"
    await unblock(world.engine, card)
    assert (await world.svc.handle(world.purchase(card, 100))).response_code == "00"

    await set_provider_status(world.engine, PROVIDER_V, "suspended")
    assert (await world.svc.handle(world.purchase(card, 100))).response_code == "58"
    await set_provider_status(world.engine, PROVIDER_V, "active")
    assert (await world.svc.handle(world.purchase(card, 100))).response_code == "00"

    await set_terminal_status(world.engine, TERM_V, "suspended")
    assert (await world.svc.handle(world.purchase(card, 100))).response_code != "00"
    await set_terminal_status(world.engine, TERM_V, "active")
    assert (await world.svc.handle(world.purchase(card, 100))).response_code == "00"
    assert (await world.svc.handle(world.purchase(card, 100))).response_code == "00"
    if sqlite:
        assert known.registry.cards[card].status == "active" and known.registry.terminals[TERM_V].status == "active"
