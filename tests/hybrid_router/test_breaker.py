"""The circuit breaker: opens on consecutive failures or a failure rate, half-opens after the cool-down."""

from __future__ import annotations

import threading

import pytest

from hybrid_router.breaker import BreakerConfig, BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_opens_after_consecutive_failures_and_refuses() -> None:
    b = CircuitBreaker(BreakerConfig(consecutive_failures=3, min_calls=100), clock=Clock())
    for _ in range(2):
        assert b.allow()
        b.record_failure()
    assert b.state is BreakerState.CLOSED
    b.record_failure()
    assert b.state is BreakerState.OPEN
    assert not b.allow()
    assert b.snapshot().opened_count == 1


def test_a_success_resets_the_consecutive_count() -> None:
    b = CircuitBreaker(BreakerConfig(consecutive_failures=3, min_calls=100), clock=Clock())
    for _ in range(5):
        b.record_failure()
        b.record_failure()
        b.record_success()
    assert b.state is BreakerState.CLOSED


def test_opens_on_failure_rate_over_the_window() -> None:
    b = CircuitBreaker(BreakerConfig(consecutive_failures=100, failure_rate=0.5, window=10, min_calls=10), clock=Clock())
    for i in range(9):  # alternating, never two failures in a row: 5 failures in 9 calls
        b.record_failure() if i % 2 == 0 else b.record_success()
    assert b.state is BreakerState.CLOSED  # fewer than min_calls so far
    b.record_success()
    assert b.state is BreakerState.CLOSED  # the rate is only checked when a failure comes in
    b.record_failure()  # window of 10: 5 failures -> 50%
    assert b.state is BreakerState.OPEN
    assert b.snapshot().failure_rate >= 0.5


def test_half_open_after_cooldown_then_closes_on_success() -> None:
    clock = Clock()
    changes: list[tuple[str, str]] = []
    b = CircuitBreaker(BreakerConfig(consecutive_failures=1, cooldown_s=5.0, half_open_trials=1), clock=clock,
                       on_change=lambda old, new: changes.append((old.value, new.value)))
    b.record_failure()
    clock.t += 4.9
    assert not b.allow()
    assert b.snapshot().seconds_until_half_open == pytest.approx(0.1, abs=1e-6)
    clock.t += 0.2
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow()          # the one trial
    assert not b.allow()      # no second trial while the first is out
    b.record_success()
    assert b.state is BreakerState.CLOSED and b.allow()
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_failed_trial_reopens_and_restarts_the_cooldown() -> None:
    clock = Clock()
    b = CircuitBreaker(BreakerConfig(consecutive_failures=1, cooldown_s=5.0), clock=clock)
    b.record_failure()
    clock.t += 5.0
    assert b.allow()
    b.record_failure()
    assert b.state is BreakerState.OPEN
    clock.t += 4.0
    assert not b.allow()
    clock.t += 1.0
    assert b.allow()


def test_thread_safe_counting() -> None:
    b = CircuitBreaker(BreakerConfig(consecutive_failures=10_000, window=20_000, min_calls=20_000))

    def hammer() -> None:
        for _ in range(1000):
            b.record_failure()

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert b.snapshot().consecutive_failures == 4000


@pytest.mark.parametrize("kwargs", [{"consecutive_failures": 0}, {"failure_rate": 0.0}, {"failure_rate": 1.5}, {"cooldown_s": -1}])
def test_bad_configs_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        BreakerConfig(**kwargs)
