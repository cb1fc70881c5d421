"""Link-speed emulation of the virtual reader: a UART's line time, with bounded credit for late wake-ups."""

from __future__ import annotations

import time

from simulator.reader_pty import LINK_CREDIT_MAX_S, LinkClock

BAUD = 115_200
BYTES_PER_FRAME = 50
FRAMES = 16


def test_paced_time_is_the_line_time_within_the_credit_cap() -> None:
    clock = LinkClock(BAUD)
    line_s = FRAMES * BYTES_PER_FRAME * 10 / BAUD  # 8N1: 10 bits a byte
    t0 = time.perf_counter()
    for _ in range(FRAMES):
        clock.pace(BYTES_PER_FRAME)
    elapsed = time.perf_counter() - t0
    assert clock.waits == FRAMES
    assert abs(clock.line_s - line_s) < 1e-9
    assert elapsed >= line_s - LINK_CREDIT_MAX_S  # never faster than the wire, but for the bounded credit
    assert 0.0 <= clock.credit_s <= LINK_CREDIT_MAX_S


def test_credit_is_capped_and_never_makes_a_wait_negative() -> None:
    clock = LinkClock(BAUD)
    clock.credit_s = LINK_CREDIT_MAX_S
    t0 = time.perf_counter()
    clock.pace(1)  # 87 µs of line time, all covered by credit
    assert time.perf_counter() - t0 < 0.05
    assert clock.credit_s <= LINK_CREDIT_MAX_S
    stats = clock.stats()
    assert stats["waits"] == 1 and stats["line_ms"] > 0
