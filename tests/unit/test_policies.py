"""`retry_delay`: min(max, base × 2^(attempts−1)) with ±25 % jitter."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.policies import retry_delay


def delay(attempts: int, rand: float, base: float = 1.0, cap: float = 300.0) -> float:
    return retry_delay(attempts, base_seconds=base, max_seconds=cap, rand=lambda: rand)


@pytest.mark.parametrize(
    ("attempts", "expected"),
    [(0, 1.0), (1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (9, 256.0), (10, 300.0), (50, 300.0)],
)
def test_backoff_without_jitter(attempts: int, expected: float) -> None:
    assert delay(attempts, rand=0.5) == pytest.approx(expected)


def test_negative_attempts_count_as_the_first() -> None:
    assert delay(-5, rand=0.5) == pytest.approx(1.0)


@pytest.mark.parametrize("attempts", [1, 4, 20])
def test_jitter_is_plus_or_minus_a_quarter(attempts: int) -> None:
    middle = delay(attempts, rand=0.5)
    assert delay(attempts, rand=0.0) == pytest.approx(middle * 0.75)
    assert delay(attempts, rand=0.999999) == pytest.approx(middle * 1.25, rel=1e-5)


@pytest.mark.parametrize("attempts", [63, 64, 65, 1_000, 10**9, 10**18])
def test_huge_attempt_numbers_stay_at_the_cap(attempts: int) -> None:
    assert delay(attempts, rand=0.5) == pytest.approx(300.0)
    assert delay(attempts, rand=0.5, base=1e300, cap=7.0) == pytest.approx(7.0)


def test_the_default_random_source_stays_within_the_bounds() -> None:
    samples = [retry_delay(3, base_seconds=2, max_seconds=100) for _ in range(500)]
    assert all(6.0 <= s <= 10.0 for s in samples)
    assert len(set(samples)) > 1  # it does jitter


@given(
    attempts=st.integers(min_value=-10, max_value=10**20),
    base=st.floats(min_value=0.001, max_value=1e6),
    cap=st.floats(min_value=0.001, max_value=1e6),
    rand=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
def test_delay_bounds(attempts: int, base: float, cap: float, rand: float) -> None:
    result = delay(attempts, rand, base=base, cap=cap)
    exponent = max(attempts - 1, 0)
    nominal = cap if exponent > 1000 else min(cap, base * 2.0**exponent)
    assert nominal * 0.75 * (1 - 1e-12) <= result <= nominal * 1.25 * (1 + 1e-12)
    assert result <= cap * 1.25 * (1 + 1e-12)
    # More failures never shorten the wait (for the same draw).
    assert delay(attempts + 1, rand, base=base, cap=cap) >= result * (1 - 1e-12)
