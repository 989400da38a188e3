"""The agent's state machine: one transition table, a runner that persists before each step.

Each state's handler (:mod:`device_agents.steps`) does one step and returns an :class:`Event`;
the runner looks the pair up in :data:`TRANSITIONS`. Before a handler runs, the runner writes
``{state, assignment, attempts}`` durably (temp file, fsync, rename), so after a kill or power
loss the agent re-enters the step that was running. ``attempts`` counts entries into a state that
did not finish: past ``max_attempts`` the step is not run again and :data:`Event.CRASH_LOOP`
rolls back instead (the loop guard). Errors are split the Mender way: a
:class:`TransientError` (server unreachable, connection dropped) retries the same state with
exponential backoff; a :class:`edgekit.errors.VerificationError` or any other edgekit error is
fatal: it is recorded as the failure and the machine rolls back to the previous model.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from edgekit.errors import EdgekitError, VerificationError

from device_agents.slots import Slots
from device_agents.store import DataDir, utc_now

if TYPE_CHECKING:  # the client imports this module's errors; the settings import the profiler
    from device_agents.client import FleetClient
    from device_agents.settings import AgentSettings

__all__ = ["Event", "Interrupted", "Runner", "State", "StepContext", "TRANSITIONS", "TransientError", "backoff_delay"]

log = logging.getLogger("edgekit.agent")


class _StrEnum(str, Enum):
    """A str-valued enum whose str() and format() are the value (enum.StrEnum is 3.11+; devices run 3.10)."""

    __str__ = str.__str__
    __format__ = str.__format__


class State(_StrEnum):
    """Where the agent is with its current assignment."""

    IDLE = "idle"
    ACCEPTING = "accepting"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    PROFILING = "profiling"
    ACTIVATING = "activating"
    ACTIVE = "active"
    ROLLING_BACK = "rolling_back"
    REVERTING = "reverting"


class Event(_StrEnum):
    """What a step reports back."""

    ASSIGNED = "assigned"
    LOCAL_INSTALL = "local_install"
    INSTALL = "install"
    UNCHANGED = "unchanged"
    REVERT = "revert"
    DOWNLOADED = "downloaded"
    RETRY = "retry"
    VERIFIED = "verified"
    PROFILED = "profiled"
    ACTIVATED = "activated"
    DONE = "done"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    REVERTED = "reverted"
    CRASH_LOOP = "crash_loop"


S, E = State, Event
# One table, every transition the agent can make.
TRANSITIONS: dict[tuple[State, Event], State] = {
    # state            event                next state
    (S.IDLE,           E.ASSIGNED):         S.ACCEPTING,     # the server sent a new signed assignment
    (S.IDLE,           E.LOCAL_INSTALL):    S.VERIFYING,     # `edgekit agent install BUNDLE`: no server, no download
    (S.ACCEPTING,      E.INSTALL):          S.DOWNLOADING,   # signature, expiry, serial, profile all good
    (S.ACCEPTING,      E.REVERT):           S.REVERTING,
    (S.ACCEPTING,      E.UNCHANGED):        S.ACTIVE,        # install of the model already active (a re-issued assignment)
    (S.ACCEPTING,      E.FAILED):           S.ROLLING_BACK,  # rejected: nothing changed, report why
    (S.ACCEPTING,      E.CRASH_LOOP):       S.ROLLING_BACK,
    (S.DOWNLOADING,    E.DOWNLOADED):       S.VERIFYING,
    (S.DOWNLOADING,    E.RETRY):            S.DOWNLOADING,   # transient: back off, resume with Range
    (S.DOWNLOADING,    E.FAILED):           S.ROLLING_BACK,
    (S.DOWNLOADING,    E.CRASH_LOOP):       S.ROLLING_BACK,
    (S.VERIFYING,      E.VERIFIED):         S.PROFILING,     # sha256, manifest hash, bundle hashes; slot created
    (S.VERIFYING,      E.FAILED):           S.ROLLING_BACK,
    (S.VERIFYING,      E.CRASH_LOOP):       S.ROLLING_BACK,
    (S.PROFILING,      E.PROFILED):         S.ACTIVATING,    # measured on this device, golden set passed
    (S.PROFILING,      E.FAILED):           S.ROLLING_BACK,
    (S.PROFILING,      E.CRASH_LOOP):       S.ROLLING_BACK,
    (S.ACTIVATING,     E.ACTIVATED):        S.ACTIVE,        # the pointer now names the new slot
    (S.ACTIVATING,     E.FAILED):           S.ROLLING_BACK,
    (S.ACTIVATING,     E.CRASH_LOOP):       S.ROLLING_BACK,
    (S.ACTIVE,         E.DONE):             S.IDLE,          # reported `activated`, old slots collected
    (S.ACTIVE,         E.CRASH_LOOP):       S.IDLE,          # the switch is done; only the cleanup keeps failing
    (S.REVERTING,      E.REVERTED):         S.IDLE,          # server said go back: pointer to the previous slot
    (S.REVERTING,      E.FAILED):           S.ROLLING_BACK,
    (S.REVERTING,      E.CRASH_LOOP):       S.ROLLING_BACK,
    (S.ROLLING_BACK,   E.ROLLED_BACK):      S.IDLE,          # the model active before the assignment is active again
    (S.ROLLING_BACK,   E.CRASH_LOOP):       S.IDLE,          # give up on the cleanup; the pointer is never half-written
}
del S, E


class TransientError(EdgekitError):
    """A failure worth retrying with backoff: the server is unreachable or the connection dropped."""


class Interrupted(Exception):
    """The agent is stopping (SIGTERM): leave the state as persisted; the step is re-entered on start."""


def backoff_delay(attempt: int, base_s: float, max_s: float) -> float:
    """Exponential backoff with full jitter: uniform in [base, min(max, base * 2**attempt)]."""
    return random.uniform(base_s, max(base_s, min(max_s, base_s * 2 ** max(0, attempt))))


@dataclass
class StepContext:
    """What a step handler works with: the data dir, the slots, settings, and the persisted record."""

    data: DataDir
    slots: Slots
    settings: AgentSettings
    record: dict
    identity: dict | None = None
    client: FleetClient | None = None
    should_stop: Callable[[], bool] = lambda: False
    sleep: Callable[[float], None] = field(default=lambda s: None)

    @property
    def job(self) -> dict:
        """The assignment being worked on (persisted with the state)."""
        return self.record["assignment"]

    def emit(self, phase: str, *, reason: str | None = None, metrics: dict | None = None) -> None:
        """Queue a phase report; it is persisted with the next transition and sent until accepted."""
        report = {"serial": self.job.get("serial"), "phase": phase, "reason": reason, "metrics": metrics or {}, "at": utc_now()}
        if self.job.get("kind") == "fleet":
            if report["serial"] is not None:
                self.record.setdefault("outbox", []).append(report)
        self.job.setdefault("reports", []).append(report)


Handler = Callable[[StepContext], Event]


class Runner:
    """Drives the table: one persisted step at a time."""

    def __init__(self, ctx: StepContext, handlers: dict[State, Handler], *, max_attempts: int = 3,
                 backoff_base_s: float = 1.0, backoff_max_s: float = 300.0) -> None:
        self.ctx = ctx
        self.handlers = handlers
        self.max_attempts = max_attempts
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s

    @property
    def state(self) -> State:
        return State(self.ctx.record["state"])

    def _persist(self) -> None:
        self.ctx.data.save_state(self.ctx.record)

    def start(self, event: Event, job: dict) -> None:
        """Begin work on an assignment from IDLE."""
        if self.state is not State.IDLE:
            raise RuntimeError(f"cannot start a new assignment in state {self.state}")
        rec = self.ctx.record
        rec["assignment"] = {**job, "started_at": utc_now(), "transitions": []}
        rec["attempts"] = 0
        self._transition(event)

    def _transition(self, event: Event) -> None:
        rec = self.ctx.record
        state = self.state
        nxt = TRANSITIONS[(state, event)]
        job = rec["assignment"]
        if job is not None:
            job["transitions"].append([state.value, event.value, nxt.value])
            job["retries"] = job.get("retries", 0) + 1 if event is Event.RETRY else 0
        rec["state"], rec["attempts"] = nxt.value, 0
        if nxt is State.IDLE and job is not None:
            rec["last_result"] = {k: job.get(k) for k in ("kind", "serial", "sha256", "name", "version", "action", "failure", "reports",
                                                          "transitions", "started_at")} | {"finished_at": utc_now()}
            rec["assignment"] = None
        self._persist()

    def step(self) -> State:
        """Run the current state's handler once (or the loop guard) and take the transition."""
        state = self.state
        if state is State.IDLE:
            return state
        rec = self.ctx.record
        rec["attempts"] = rec.get("attempts", 0) + 1
        self._persist()  # before the risky step: a crash here is counted on the next start
        if rec["attempts"] > self.max_attempts:
            log.warning("crash loop in %s after %d attempts: rolling back", state, rec["attempts"] - 1)
            self.ctx.job.setdefault("failure", {"reason": "crash_loop",
                                                "message": f"the agent died {rec['attempts'] - 1} times in '{state}'"})
            self._transition(Event.CRASH_LOOP)
            return self.state
        try:
            event = self.handlers[state](self.ctx)
        except (Interrupted, InterruptedError):
            rec["attempts"] -= 1  # a clean stop is not a crash
            self._persist()
            raise Interrupted() from None
        except TransientError as e:
            if (state, Event.RETRY) not in TRANSITIONS:
                self._fail(VerificationError(e.message, reason="other:transient"))
                return self.state
            delay = backoff_delay(self.ctx.job.get("retries", 0), self.backoff_base_s, self.backoff_max_s)
            log.info("%s: %s; retrying in %.1fs", state, e.message, delay)
            self._transition(Event.RETRY)
            self.ctx.sleep(delay)
            return self.state
        except EdgekitError as e:
            self._fail(e)
            return self.state
        self._transition(event)
        return self.state

    def _fail(self, e: EdgekitError) -> None:
        if (self.state, Event.FAILED) not in TRANSITIONS:  # cleanup states: retried on the next step, then the loop guard
            raise e
        reason = e.reason if isinstance(e, VerificationError) else f"other:{type(e).__name__}"
        log.warning("%s failed (%s): %s", self.state, reason, e.message)
        self.ctx.job["failure"] = {"reason": reason, "message": e.message, "state": self.state.value}
        self._transition(Event.FAILED)

    def run_until_idle(self) -> None:
        """Step until the assignment is finished (raises Interrupted when asked to stop)."""
        while self.state is not State.IDLE:
            if self.ctx.should_stop():
                raise Interrupted()
            self.step()
