"""Retry policy: exponential backoff with jitter (the same formula the rescuer uses in SQL)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

# 2^64 seconds is past any maximum delay: a larger exponent changes nothing but can overflow
# (Python floats, and float8 in the rescuer's SQL).
MAX_BACKOFF_EXPONENT = 64


def retry_delay(
    attempts: int,
    *,
    base_seconds: float,
    max_seconds: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before the next attempt, after `attempts` failed ones:
    min(max, base × 2^(attempts−1)), then ±25 % jitter so that failures don't retry in step."""
    exponent = min(max(attempts - 1, 0), MAX_BACKOFF_EXPONENT)
    delay = min(max_seconds, base_seconds * 2.0**exponent)
    return delay * (0.75 + rand() * 0.5)


@dataclass(frozen=True, slots=True)
class Backoff:
    """The retry policy of a worker: `retry_delay`'s parameters (the rescuer applies the same
    formula in SQL)."""

    base_seconds: float
    max_seconds: float

    def delay(self, attempts: int, rand: Callable[[], float] = random.random) -> float:
        return retry_delay(
            attempts, base_seconds=self.base_seconds, max_seconds=self.max_seconds, rand=rand
        )
