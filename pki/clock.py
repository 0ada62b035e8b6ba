"""Clocks: the domain asks an injected clock for the time so tests can move it."""

from __future__ import annotations

import datetime
from typing import Protocol


class Clock(Protocol):
    """Clock tells the current time as an aware UTC datetime."""

    def now(self) -> datetime.datetime: ...


class SystemClock:
    """SystemClock reads the system time, truncated to whole seconds as X.509 encodes it."""

    def now(self) -> datetime.datetime:
        return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


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
