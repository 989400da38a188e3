"""The rollout and wave lifecycles on the server's rows: every state change goes through the
transition tables in :mod:`edgekit.protocol` (admin actions and the engine alike)."""

from __future__ import annotations

import datetime as dt

from edgekit.protocol import IllegalTransition, next_rollout_state, next_wave_state
from fleet_server.errors import Conflict
from fleet_server.tables import Rollout, RolloutWave

__all__ = ["admin_move", "move_rollout", "move_wave", "wave_may"]


def move_rollout(r: Rollout, event: str, now: dt.datetime) -> str:
    """Apply ``event`` to a rollout (IllegalTransition when the table has no such row)."""
    r.state = next_rollout_state(r.state, event)
    r.updated_at = now
    return r.state


def admin_move(r: Rollout, action: str, now: dt.datetime) -> str:
    """An admin's action on a rollout: the table's next state, or 409 naming the states that allow it."""
    try:
        return move_rollout(r, action, now)
    except IllegalTransition as e:
        raise Conflict(f"cannot {action} a rollout that is {r.state}",
                       f"'{action}' needs a rollout that is {' or '.join(e.allowed_from)}.") from None


def wave_may(w: RolloutWave, event: str) -> bool:
    """Whether the wave table has a row for ``event`` from the wave's state."""
    try:
        next_wave_state(w.state, event)
    except IllegalTransition:
        return False
    return True


def move_wave(w: RolloutWave, event: str, now: dt.datetime) -> str:
    """Apply ``event`` to a wave; a wave that leaves running/baking gets its finish time."""
    w.state = next_wave_state(w.state, event)
    if w.state in ("passed", "failed", "rolled_back"):
        w.finished_at = w.finished_at or now
    return w.state
