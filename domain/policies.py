"""Retry policy: exponential backoff with jitter (the same formula the rescuer uses in SQL)."""

from __future__ import annotations

import random
from collections.abc import Callable


def retry_delay(
    attempts: int,
    *,
    base_seconds: float,
    max_seconds: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before the next attempt, after `attempts` failed ones:
    min(max, base × 2^(attempts−1)), then ±25 % jitter so that failures don't retry in step."""
    exponent = max(attempts - 1, 0)
    delay = max_seconds if exponent >= 64 else min(max_seconds, base_seconds * 2**exponent)
    return delay * (0.75 + rand() * 0.5)
