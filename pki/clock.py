"""Clocks: the domain asks an injected clock for the time so tests can move it."""

from __future__ import annotations

import datetime
import time
from typing import Protocol


class Clock(Protocol):
    """Clock tells the current time as an aware UTC datetime."""

    def now(self) -> datetime.datetime: ...


class SystemClock:
    """SystemClock reads the system time, truncated to whole seconds as X.509 encodes it."""

    def __init__(self) -> None:
        # The OCSP path asks several times per request; within one second the answer is the
        # same object. One tuple, swapped whole, so threads never see a half update.
        self._second: tuple[int, datetime.datetime] = (0, datetime.datetime.now(datetime.UTC))

    def now(self) -> datetime.datetime:
        second = int(time.time())
        cached = self._second
        if cached[0] != second:
            cached = (second, datetime.datetime.fromtimestamp(second, datetime.UTC))
            self._second = cached
        return cached[1]


class FixedClock:
    """FixedClock stands still until a test moves it."""

    def __init__(self, at: datetime.datetime) -> None:
        if at.tzinfo is None:
            raise ValueError("FixedClock needs an aware datetime")
        self._at = at.astimezone(datetime.UTC)

    def now(self) -> datetime.datetime:
        return self._at

    def advance(self, delta: datetime.timedelta) -> None:
        self._at = self._at + delta
