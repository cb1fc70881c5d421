"""The worker ↔ ledger-process link (clearing.ledger_link): frames survive any split of the byte stream; garbage
is a FrameError (or, for an answer, the service's failure as RuntimeError), never anything else; a ledger process
that cannot start is reported by ``start()``. (The link serving real traffic, a killed ledger process and its
restart: tests/e2e/test_worker_process.py.)"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clearing.ledger_link import (
    MAX_FRAME_BODY,
    FrameError,
    FrameReader,
    answer_body,
    error_body,
    frame,
    read_answer,
)
from protocol.messages import Answered

FRAMES = st.lists(st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=300)), max_size=20)


@given(FRAMES, st.lists(st.integers(1, 64), max_size=40))
def test_frames_survive_any_split_of_the_stream(frames: list[tuple[int, bytes]], cuts: list[int]) -> None:
    data = b"".join(frame(rid, body) for rid, body in frames)
    reader, got, pos = FrameReader(), [], 0
    for n in cuts:
        got += reader.feed(data[pos:pos + n])
        pos += n
    got += reader.feed(data[pos:])
    assert got == frames


@given(st.binary(max_size=2_000))
def test_garbage_is_a_frame_error_or_frames(data: bytes) -> None:
    try:
        frames = FrameReader().feed(data)
    except FrameError:
        return
    assert all(len(body) <= MAX_FRAME_BODY for _, body in frames)


def test_an_oversized_frame_is_refused_both_ways() -> None:
    with pytest.raises(FrameError):
        frame(1, b"x" * (MAX_FRAME_BODY + 1))
    with pytest.raises(FrameError):
        FrameReader().feed((MAX_FRAME_BODY + 1).to_bytes(4, "big") + (7).to_bytes(4, "big"))


@given(st.sampled_from(["purchase_result", "void_result", "batch_settle_result"]),
       st.sampled_from(["00", "51", "A0", "96"]), st.binary(max_size=500))
def test_answers_cross_the_link_unchanged(typ: str, code: str, canonical: bytes) -> None:
    answer = Answered("T0000001", typ, code, canonical)
    assert read_answer("T0000001", answer_body(answer)) == answer
    assert read_answer("T0000001", answer_body(None)) is None
    with pytest.raises(RuntimeError, match="ValueError"):
        read_answer("T0000001", error_body("ValueError"))


@given(st.binary(max_size=300))
def test_a_garbled_answer_is_a_frame_error_or_the_services_failure(body: bytes) -> None:
    try:
        read_answer("T0000001", body)
    except (FrameError, RuntimeError):
        pass


async def test_a_ledger_process_that_cannot_start_is_reported_at_once() -> None:
    """``start()`` returns only once the child is ready; a child that exits first (a database it cannot open,
    keys it cannot read) is :class:`LedgerUnavailable` there and then — ``clearing serve`` never says ready."""
    import sys
    import time

    from clearing.ledger_link import LedgerProcessClient, LedgerUnavailable

    client = LedgerProcessClient([sys.executable, "-c", "import sys; sys.exit(3)"])
    t0 = time.monotonic()
    with pytest.raises(LedgerUnavailable, match="did not start"):
        await client.start()
    assert time.monotonic() - t0 < 10
