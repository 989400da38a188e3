"""Gate evaluation: device gates on a wave's ``profiled`` reports, field gates on its telemetry after the bake.

A gate result is ``{"gate", "limit", "value", "passed", "device_id", "note"}``. ``passed`` is
True or False, or None where the gate could not be read (emulated timing: the latency measured
under an emulator says nothing about the device, so it is never passed or failed on); only
``passed is False`` fails a wave.
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
from typing import Any

from sqlalchemy.orm import Session

from edgekit.protocol import FIELD_GATES
from fleet_server.services.field_stats import FieldSums, calibration_reference, minute_sums, psi, wave_sums
from fleet_server.tables import RolloutDevice, VersionArtifact

__all__ = ["bake_progress", "evaluate_device_gates", "evaluate_field_gates", "field_gates_of", "result"]

_EPS = 1e-9


def result(gate: str, limit: float | bool, value: float | None, passed: bool | None, device_id: str | None,
           note: str | None = None) -> dict[str, Any]:
    """One gate result; a value that is not a finite number (e.g. a ratio that overflowed) fails with value null."""
    if value is not None and not math.isfinite(value):
        return {"gate": gate, "limit": limit, "value": None, "passed": False, "device_id": device_id, "note": "not a finite number"}
    return {"gate": gate, "limit": limit, "value": value, "passed": passed, "device_id": device_id, "note": note}


def _ratio(num: float, den: float) -> float:
    try:
        return num / den
    except (OverflowError, ZeroDivisionError):
        return math.inf


def _rounds(value: Any) -> list[float] | None:
    """Per-round p95s as reported (a list of up to 100 finite, non-negative numbers), else None."""
    if not isinstance(value, list) or not 0 < len(value) <= 100:
        return None
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0 for x in value):
        return None
    return [float(x) for x in value]


def _p95_ratio(m: dict[str, Any]) -> tuple[float, str | None]:
    """Candidate p95 / baseline p95: the medians of their rounds when the profile has rounds for both (agents since the
    rounds profiler interleave them), else the single figures older agents sent; and a note saying which."""
    cand, base = _rounds(m.get("p95_rounds_ms")), _rounds((m.get("baseline") or {}).get("p95_rounds_ms"))
    if cand and base:
        return (_ratio(statistics.median(cand), statistics.median(base)),
                f"median of {len(cand)} rounds vs median of {len(base)} baseline rounds")
    return _ratio(float(m["p95_ms"]), float(m["baseline"]["p95_ms"])), "one measurement each (no rounds reported)"


def _failed(rd: RolloutDevice) -> bool:
    return rd.finished and rd.phase != "activated"


def evaluate_device_gates(gates: dict[str, Any], rds: list[RolloutDevice]) -> list[dict[str, Any]]:
    """Every configured device gate's result on one finished wave (per device where the gate is per device)."""
    results: list[dict[str, Any]] = []
    limit = gates.get("max_failure_rate")
    if limit is not None:
        rate = sum(_failed(rd) for rd in rds) / len(rds) if rds else 0.0
        results.append(result("max_failure_rate", limit, rate, rate <= limit + _EPS, None))
    for rd in rds:
        m = rd.metrics or {}
        if (limit := gates.get("min_agreement")) is not None and m.get("golden_top1_agreement") is not None:
            v = float(m["golden_top1_agreement"])
            results.append(result("min_agreement", limit, v, v >= limit - _EPS, rd.device_id))
        base = (m.get("baseline") or {}).get("p95_ms")
        if (limit := gates.get("max_p95_ratio")) is not None and m.get("p95_ms") is not None and base:
            v, note = _p95_ratio(m)
            if m.get("timing_source") == "emulated":
                results.append(result("max_p95_ratio", limit, None, None, rd.device_id,
                                      f"emulated timing (ratio {v:.3g} under emulation): latency unknown on this device, not gated"))
            else:
                results.append(result("max_p95_ratio", limit, v, v <= limit + _EPS, rd.device_id, note))
        if (limit := gates.get("max_peak_rss_mb")) is not None and m.get("peak_rss_mb") is not None:
            v = float(m["peak_rss_mb"])
            results.append(result("max_peak_rss_mb", limit, v, v <= limit + _EPS, rd.device_id))
        if gates.get("require_golden") and m.get("golden_passed") is not None:
            ok = bool(m["golden_passed"])
            results.append(result("require_golden", True, 1.0 if ok else 0.0, ok, rd.device_id))
    return results


def field_gates_of(gates: dict[str, Any]) -> dict[str, float]:
    """The field gates among a rollout's stored gates."""
    return {k: gates[k] for k in FIELD_GATES if gates.get(k) is not None}


def _shas(s: Session, ids: set[int | None]) -> dict[int, tuple[str, str]]:
    """version_artifact id → (artifact sha256, profile)."""
    ids = {i for i in ids if i is not None}
    if not ids:
        return {}
    rows = s.query(VersionArtifact.id, VersionArtifact.artifact_sha256, VersionArtifact.profile).filter(VersionArtifact.id.in_(ids)).all()
    return {i: (sha, profile) for i, sha, profile in rows}


def wave_field_sums(s: Session, rollout_id: str, wave_index: int, rds: list[RolloutDevice], since: dt.datetime,
                    until: dt.datetime) -> tuple[FieldSums, FieldSums, str]:
    """The wave's field sums on the new version since ``since``, the replaced version's on comparable devices, and how
    the reference was chosen.

    Comparable devices: devices outside the wave running the artifact the wave's devices replaced, over the same
    window (that artifact's rollup minus the wave's own points on it). When none posted any, the wave's own devices
    on that artifact over an equally long window before ``since`` (at least 10 minutes) are the reference.
    """
    arts = _shas(s, {rd.artifact_id for rd in rds} | {rd.previous_artifact_id for rd in rds})
    new_shas = sorted({arts[rd.artifact_id][0] for rd in rds if rd.artifact_id in arts})
    old_shas = sorted({arts[rd.previous_artifact_id][0] for rd in rds if rd.previous_artifact_id in arts})
    new = wave_sums(s, rollout_id, wave_index, new_shas, since, until)
    new.calibration = _calibration(s, {rd.artifact_id for rd in rds}, rollout_id, wave_index, new_shas, new, since, until)
    total_old = FieldSums()
    for _, _, sums in minute_sums(s, old_shas, since, until):
        total_old.add(sums)
    ref_out = total_old.minus(wave_sums(s, rollout_id, wave_index, old_shas, since, until))
    if ref_out.requests:
        return new, ref_out, "the replaced version on devices outside the wave, same window"
    before = since - max(until - since, dt.timedelta(minutes=10))
    return new, wave_sums(s, rollout_id, wave_index, old_shas, before, since), \
        "the replaced version on the wave's own devices, the window before the wave"


def _calibration(s: Session, artifact_ids: set[int | None], rollout_id: str, wave_index: int, shas: list[str], new: FieldSums,
                 since: dt.datetime, until: dt.datetime) -> tuple[list[float], str] | None:
    """The confidence histogram the wave's new artifacts were calibrated on (their manifests' router policies), mixed by
    each artifact's requests in the wave, with its label; None when any artifact that served requests has none."""
    ids = {i for i in artifact_ids if i is not None}
    if not ids or not new.requests:
        return None
    manifests = {sha: m for sha, m in s.query(VersionArtifact.artifact_sha256, VersionArtifact.manifest).filter(VersionArtifact.id.in_(ids))}
    requests = ({shas[0]: new.requests} if len(shas) == 1
                else {sha: wave_sums(s, rollout_id, wave_index, [sha], since, until).requests for sha in shas})
    mix, label = calibration_reference(manifests, requests)
    return (mix, label) if mix is not None else None


def bake_progress(gates: dict[str, Any], started: dt.datetime, now: dt.datetime, requests: int) -> bool:
    """Whether the bake is over: ``bake_s`` elapsed and ``bake_requests`` seen (each when set; 60 s when neither is)."""
    bake_s, bake_requests = gates.get("bake_s"), gates.get("bake_requests")
    if bake_s is None and bake_requests is None:
        bake_s = 60.0
    if bake_s is not None and (now - started).total_seconds() < bake_s:
        return False
    return bake_requests is None or requests >= bake_requests


def evaluate_field_gates(gates: dict[str, Any], new: FieldSums, ref: FieldSums, how: str, enough: bool) -> list[dict[str, Any]]:
    """Every field gate's result; with too little data (``enough`` False: the bake timed out short of its requests) each fails."""
    out: list[dict[str, Any]] = []
    fg = field_gates_of(gates)
    if not enough or not new.requests:
        return [result(g, limit, None, False, None, f"not enough field data ({new.requests} requests on the new version)")
                for g, limit in fg.items()]
    ref_note = f"reference: {how}; {ref.requests} requests" if ref.requests else "no reference telemetry"
    if (limit := fg.get("max_error_rate")) is not None:
        v = new.error_rate or 0.0
        out.append(result("max_error_rate", limit, v, v <= limit + _EPS, None, f"{new.requests} requests"))
    if (limit := fg.get("max_escalation_increase")) is not None:
        if ref.requests:
            v = (new.escalation_rate or 0.0) - (ref.escalation_rate or 0.0)
            out.append(result("max_escalation_increase", limit, v, v <= limit + _EPS, None,
                              f"escalation rate {new.escalation_rate:.4f} vs {ref.escalation_rate:.4f}; {ref_note}"))
        else:
            out.append(result("max_escalation_increase", limit, None, None, None, ref_note))
    if (limit := fg.get("max_field_p95_ratio")) is not None:
        p_new, p_ref = new.latency()["p95"], ref.latency()["p95"]
        if ref.requests and p_ref:
            v = _ratio(float(p_new or 0.0), float(p_ref))
            out.append(result("max_field_p95_ratio", limit, v, v <= limit + _EPS, None, ref_note))
        else:
            out.append(result("max_field_p95_ratio", limit, None, None, None, ref_note))
    if (limit := fg.get("max_drift")) is not None:
        if new.calibration is not None:  # the distribution the router was calibrated on: the reference the threshold assumes
            v, drift_note = psi(new.hist, new.calibration[0]), f"reference: {new.calibration[1]}"
        else:
            v = psi(new.hist, ref.hist) if ref.requests else None
            drift_note = f"{ref_note} (no calibration histogram in the new version's manifests)"
        if v is None:
            out.append(result("max_drift", limit, None, None, None, f"PSI needs confidence histograms on both sides; {drift_note}"))
        else:
            out.append(result("max_drift", limit, v, v <= limit + _EPS, None, f"PSI of the confidence histogram; {drift_note}"))
    return out
