"""The fleet protocol's wire shapes, defined once and imported by the server, the agent and the admin client.

What lives here crosses the wire between ``fleet_server``, ``device_agents`` and
``edgekit.fleet_client``: the signed assignment and its artifact reference, the phases a device
reports and their reasons, the names the registry accepts, the wave gates, and the rollout and
wave lifecycles as transition tables (the server's engine and its admin actions both move a
rollout only through :func:`next_rollout_state` / :func:`next_wave_state`).

Device-side code imports this module: it runs on Python 3.10 and Debian 12's 3.11.2 (no
``enum.StrEnum``, no ``typing.Self``), and needs only pydantic.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "ACTIVE_ROLLOUT_STATES",
    "ASSIGNMENT_TYPE",
    "DEFAULT_GATES",
    "DEVICE_GATES",
    "DEVICE_NAME_PATTERN",
    "FIELD_GATES",
    "GATE_NAMES",
    "LATENCY_GATES",
    "MODEL_NAME_PATTERN",
    "PHASES",
    "PSI_DRIFT_THRESHOLD",
    "REASONS",
    "ROLLOUT_STATES",
    "ROLLOUT_TRANSITIONS",
    "TAG_PATTERN",
    "TERMINAL_PHASES",
    "TERMINAL_ROLLOUT_STATES",
    "VERSION_PATTERN",
    "WAVE_STATES",
    "WAVE_TRANSITIONS",
    "ArtifactRef",
    "Assignment",
    "Gates",
    "IllegalTransition",
    "next_rollout_state",
    "next_wave_state",
    "valid_reason",
]

ASSIGNMENT_TYPE = "edgekit.assignment/v1"

# -- names -----------------------------------------------------------------------------------
MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$"
DEVICE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
TAG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}$"
_SHA256 = re.compile(r"[0-9a-f]{64}")

# -- phases a device reports, and why one failed -----------------------------------------------
PHASES = ("downloaded", "verified", "profiled", "activated", "failed", "rolled_back")
TERMINAL_PHASES = frozenset({"activated", "failed", "rolled_back"})
REASONS = frozenset({
    "sha256_mismatch", "download_failed", "bad_signature", "expired", "replayed_serial", "wrong_profile", "bundle_invalid",
    "load_failed", "golden_mismatch", "activation_failed", "crash_loop", "server_rollback", "gate_failed",
})


def valid_reason(reason: str) -> bool:
    """A reason the protocol knows, or ``other:<text>``."""
    return reason in REASONS or (reason.startswith("other:") and len(reason) > 6)


# -- the signed assignment ---------------------------------------------------------------------


class ArtifactRef(BaseModel):
    """The artifact an assignment names (``null`` in a revert to "no model")."""

    model_config = ConfigDict(frozen=True, extra="allow")

    sha256: str
    size_bytes: int
    profile: str
    format: str
    file: str
    manifest_sha256: str
    url: str

    @field_validator("sha256", "manifest_sha256")
    @classmethod
    def _hex_sha256(cls, value: str) -> str:
        # sha256 names paths on the device (models/<sha256>, models/<sha256>.part): only a plain digest is a name
        if not _SHA256.fullmatch(value):
            raise ValueError("must be 64 lowercase hex characters")
        return value


class Assignment(BaseModel):
    """An assignment payload (``edgekit.assignment/v1``). ``version`` is the registry's version: the device reports it."""

    model_config = ConfigDict(frozen=True, extra="allow")

    type: Literal["edgekit.assignment/v1"]
    device_id: str
    rollout_id: str | None = None
    serial: int
    action: Literal["install", "revert"]
    model: str | None = None
    version: str | None = None
    artifact: ArtifactRef | None = None
    issued_at: str
    expires_at: str


# -- gates -------------------------------------------------------------------------------------
PSI_DRIFT_THRESHOLD = 0.2  # population stability index: < 0.1 stable, 0.1-0.2 moderate, > 0.2 drifted (the usual reading)
DEVICE_GATES = ("max_failure_rate", "min_agreement", "require_golden", "max_p95_ratio", "max_peak_rss_mb")
FIELD_GATES = ("max_escalation_increase", "max_error_rate", "max_field_p95_ratio", "max_drift")
LATENCY_GATES = frozenset({"max_p95_ratio"})
GATE_NAMES = DEVICE_GATES + FIELD_GATES
DEFAULT_GATES = {"max_failure_rate": 0.0, "require_golden": True}


class Gates(BaseModel):
    """Wave gates. ``safe_defaults`` (on unless set to false) adds ``max_failure_rate=0`` and
    ``require_golden`` where the admin did not set them; any other absent gate is not checked.

    Device gates read each device's ``profiled`` report; field gates read the wave's field
    telemetry after a bake period (``bake_s`` and/or ``bake_requests``), relative to the version
    the wave's devices replaced, on devices of the same profile. Limits are finite (NaN → 422).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    safe_defaults: bool = True
    max_failure_rate: float | None = Field(default=None, ge=0, le=1)
    min_agreement: float | None = Field(default=None, ge=0, le=1)
    require_golden: bool | None = None
    max_p95_ratio: float | None = Field(default=None, gt=0)
    max_peak_rss_mb: float | None = Field(default=None, gt=0)
    max_escalation_increase: float | None = Field(default=None, ge=0, le=1, description="Escalation rate minus the replaced version's.")
    max_error_rate: float | None = Field(default=None, ge=0, le=1, description="Errors per request (degraded answers are not errors).")
    max_field_p95_ratio: float | None = Field(default=None, gt=0, description="Field p95 latency over the replaced version's.")
    max_drift: float | None = Field(default=None, ge=0, description=f"PSI of the confidence histogram against the replaced version's "
                                                                    f"(drifted above {PSI_DRIFT_THRESHOLD}).")
    bake_s: float | None = Field(default=None, ge=0, le=7 * 24 * 3600, description="Seconds of field telemetry after activation.")
    bake_requests: int | None = Field(default=None, ge=0, le=2**62, description="Field requests after activation, across the wave.")

    def effective(self) -> dict[str, float | bool]:
        """The gates the engine checks: those set, plus the safe defaults unless opted out; the bake settings apart."""
        out: dict[str, float | bool] = dict(DEFAULT_GATES) if self.safe_defaults else {}
        for name in GATE_NAMES:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if out.get("require_golden") is False:
            del out["require_golden"]
        return out

    def field_gates_set(self) -> bool:
        """Whether any field gate is configured (then a wave bakes)."""
        return any(getattr(self, name) is not None for name in FIELD_GATES)


# -- the rollout and wave lifecycles -----------------------------------------------------------
ROLLOUT_STATES = ("running", "paused", "completed", "failed", "rolled_back")
ACTIVE_ROLLOUT_STATES = ("running", "paused")
TERMINAL_ROLLOUT_STATES = frozenset({"completed", "failed", "rolled_back"})
WAVE_STATES = ("pending", "running", "baking", "passed", "failed", "rolled_back")

# (state, event) → next state. Admin actions are pause/resume/promote/rollback; the engine's events
# are named by their outcome. Anything not listed is refused (409 on the admin routes).
ROLLOUT_TRANSITIONS: dict[tuple[str, str], str] = {
    ("running",   "pause"):        "paused",
    ("paused",    "resume"):       "running",
    ("running",   "promote"):      "running",
    ("paused",    "promote"):      "running",
    ("running",   "rollback"):     "rolled_back",
    ("paused",    "rollback"):     "rolled_back",
    ("completed", "rollback"):     "rolled_back",
    ("failed",    "rollback"):     "rolled_back",
    ("running",   "gate_failed"):  "failed",
    ("paused",    "gate_failed"):  "failed",
    ("running",   "all_passed"):   "completed",
}

WAVE_TRANSITIONS: dict[tuple[str, str], str] = {
    ("pending", "start"):          "running",
    ("running", "devices_done"):   "baking",
    ("running", "gates_passed"):   "passed",
    ("running", "gates_failed"):   "failed",
    ("baking",  "gates_passed"):   "passed",
    ("baking",  "gates_failed"):   "failed",
    ("running", "rollback"):       "rolled_back",
    ("baking",  "rollback"):       "rolled_back",
    ("passed",  "rollback"):       "rolled_back",
}


class IllegalTransition(ValueError):
    """An event the lifecycle table does not allow in the current state."""

    def __init__(self, kind: str, state: str, event: str, allowed_from: tuple[str, ...]) -> None:
        self.kind, self.state, self.event, self.allowed_from = kind, state, event, allowed_from
        super().__init__(f"cannot {event} a {kind} that is {state}")


def _next(table: dict[tuple[str, str], str], kind: str, state: str, event: str) -> str:
    try:
        return table[(state, event)]
    except KeyError:
        allowed = tuple(s for (s, e) in table if e == event)
        raise IllegalTransition(kind, state, event, allowed) from None


def next_rollout_state(state: str, event: str) -> str:
    """The rollout's state after ``event``; :class:`IllegalTransition` when the table has no such row."""
    return _next(ROLLOUT_TRANSITIONS, "rollout", state, event)


def next_wave_state(state: str, event: str) -> str:
    """The wave's state after ``event``; :class:`IllegalTransition` when the table has no such row."""
    return _next(WAVE_TRANSITIONS, "wave", state, event)
