"""A circuit breaker for the cloud: stop calling a cloud that is failing, try again after a cool-down.

closed ──(N consecutive failures, or failure rate ≥ R over the last W calls)──► open
open ──(cool-down elapsed)──► half_open: up to ``half_open_trials`` calls go through
half_open ──(a trial succeeds)──► closed      half_open ──(a trial fails)──► open (cool-down restarts)

Overload answers (HTTP 429/503) count as failures: a cloud that sheds load should see less of it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

__all__ = ["BreakerConfig", "BreakerSnapshot", "BreakerState", "CircuitBreaker"]


class BreakerState(str, Enum):
    """The breaker's three states."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerConfig:
    """When the breaker opens and how it recovers."""

    consecutive_failures: int = 5
    failure_rate: float = 0.5
    window: int = 20
    min_calls: int = 10
    cooldown_s: float = 5.0
    half_open_trials: int = 1

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1 or self.window < 1 or self.min_calls < 1 or self.half_open_trials < 1:
            raise ValueError("breaker counts must be >= 1")
        if not 0 < self.failure_rate <= 1 or self.cooldown_s < 0:
            raise ValueError("failure_rate must be in (0, 1] and cooldown_s >= 0")


@dataclass(frozen=True)
class BreakerSnapshot:
    """The breaker's state at one moment, for metrics and logs."""

    state: BreakerState
    consecutive_failures: int
    failure_rate: float
    calls_in_window: int
    opened_count: int
    seconds_until_half_open: float


class CircuitBreaker:
    """Thread-safe circuit breaker; ``allow()`` before a call, then ``record_success``/``record_failure``."""

    def __init__(self, config: BreakerConfig | None = None, *, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[BreakerState, BreakerState], None] | None = None) -> None:
        self.config = config or BreakerConfig()
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        self._window: deque[bool] = deque(maxlen=self.config.window)  # True = failure
        self._opened_at = 0.0
        self._opened_count = 0
        self._trials = 0

    @property
    def state(self) -> BreakerState:
        """The current state (an open breaker past its cool-down reads as half_open)."""
        with self._lock:
            self._maybe_half_open()
            return self._state

    def snapshot(self) -> BreakerSnapshot:
        """Counters and state, consistent with each other."""
        with self._lock:
            self._maybe_half_open()
            n = len(self._window)
            wait = max(0.0, self._opened_at + self.config.cooldown_s - self._clock()) if self._state is BreakerState.OPEN else 0.0
            return BreakerSnapshot(self._state, self._consecutive, (sum(self._window) / n) if n else 0.0, n, self._opened_count, wait)

    def allow(self) -> bool:
        """Whether a call may go to the cloud now; in half_open this takes one trial slot."""
        with self._lock:
            self._maybe_half_open()
            if self._state is BreakerState.CLOSED:
                return True
            if self._state is BreakerState.HALF_OPEN and self._trials < self.config.half_open_trials:
                self._trials += 1
                return True
            return False

    def record_success(self) -> None:
        """A call that got a good answer."""
        with self._lock:
            self._consecutive = 0
            self._window.append(False)
            if self._state is BreakerState.HALF_OPEN:
                self._window.clear()
                self._transition(BreakerState.CLOSED)

    def record_failure(self) -> None:
        """A call that failed (timeout, unreachable, overloaded, bad response)."""
        with self._lock:
            self._consecutive += 1
            self._window.append(True)
            if self._state is BreakerState.HALF_OPEN:
                self._open()
                return
            if self._state is BreakerState.CLOSED:
                n = len(self._window)
                rate_tripped = n >= self.config.min_calls and sum(self._window) / n >= self.config.failure_rate
                if self._consecutive >= self.config.consecutive_failures or rate_tripped:
                    self._open()

    def reset(self) -> None:
        """Back to closed with empty counters (operators, tests)."""
        with self._lock:
            self._consecutive = 0
            self._window.clear()
            self._transition(BreakerState.CLOSED)

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._opened_count += 1
        self._transition(BreakerState.OPEN)

    def _maybe_half_open(self) -> None:
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.config.cooldown_s:
            self._transition(BreakerState.HALF_OPEN)

    def _transition(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        if new is BreakerState.HALF_OPEN:
            self._trials = 0
        if old is not new and self._on_change is not None:
            self._on_change(old, new)
