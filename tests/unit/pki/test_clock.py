"""SystemClock: aware UTC, whole seconds, current."""

from __future__ import annotations

import datetime
import time

from pki.clock import SystemClock


def test_system_clock_is_aware_whole_seconds_and_moves() -> None:
    clock = SystemClock()
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    now = clock.now()
    after = datetime.datetime.now(datetime.UTC)
    assert now.tzinfo is datetime.UTC and now.microsecond == 0
    assert before <= now <= after
    time.sleep(1.05)
    assert clock.now() > now
