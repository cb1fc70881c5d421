"""The worker process's garbage-collector setting (clearing.worker.tune_gc, called by ``clearing serve``)."""

from __future__ import annotations

import gc
import weakref

from clearing.worker import tune_gc


class _Node:
    other: _Node | None = None


def test_tune_gc_freezes_start_up_objects_and_keeps_the_thresholds() -> None:
    before = gc.get_threshold()
    frozen_before = gc.get_freeze_count()
    survivor = {"kept": [1, 2, 3]}  # alive at "start-up": ends in the permanent generation
    try:
        tune_gc()
        assert gc.get_freeze_count() > frozen_before
        assert gc.get_threshold() == before
        assert survivor["kept"] == [1, 2, 3]
    finally:
        gc.unfreeze()


def test_cycles_created_after_tuning_are_still_collected() -> None:
    try:
        tune_gc()
        a, b = _Node(), _Node()
        a.other, b.other = b, a
        probe = weakref.ref(a)
        del a, b
        gc.collect()
        assert probe() is None  # cyclic garbage made after the freeze is still reclaimed
    finally:
        gc.unfreeze()
