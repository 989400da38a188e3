"""One handler per state: each does one step and returns an event (table in device_agents.machine)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from edgekit.bundle import open_bundle
from edgekit.errors import VerificationError

from device_agents.client import FleetClient, IncompleteDownload
from device_agents.machine import Event, Runner, State, StepContext
from device_agents.settings import AgentSettings
from device_agents.slots import Slots
from device_agents.store import DataDir
from device_agents.profiler import ProfileSettings, profile_candidate
from device_agents.store import utc_now
from device_agents.trust import TrustStore
from device_agents.verify import check_artifact_file, check_bundle, verify_assignment

__all__ = ["HANDLERS", "open_runner"]


def _claimed_serial(signed: dict) -> int | None:
    """The serial an assignment claims before it is verified (only to name it in a rejection report)."""
    try:
        serial = json.loads(signed["payload"])["serial"]
        return serial if isinstance(serial, int) else None
    except (KeyError, TypeError, ValueError):
        return None


def accept(ctx: StepContext) -> Event:
    """Trust refresh → signature with the pinned key → expiry → serial → profile/format; then remember the serial.

    The server's trust document (key rotations, publisher allow-list) is fetched first, so a rotated
    server key or a changed allow-list is known before this assignment is judged by it.
    """
    job, ident = ctx.job, ctx.identity or {}
    job["serial"] = _claimed_serial(job["signed"])
    trust = TrustStore(ctx.data)
    if ctx.client is not None:
        trust.refresh(ident, ctx.client.trust)
    a = verify_assignment(job["signed"], public_key=trust.server_key(ident), device_id=ident["device_id"],
                          last_serial=ctx.record.get("last_serial", 0), profile=ident.get("profile"), formats=ctx.settings.formats)
    ctx.record["last_serial"] = a.serial  # persisted with this transition: the same serial is never accepted twice
    job.update(action=a.action, model=a.model, name=a.model, version=a.version, payload=a.model_dump(mode="json"),
               sha256=a.artifact.sha256 if a.artifact else None)
    if a.action == "revert":
        return Event.REVERT
    if a.artifact is not None and a.artifact.sha256 == ctx.slots.active_sha():
        return Event.UNCHANGED  # e.g. the server re-issued the assignment at half its lifetime: no second download or profile
    return Event.INSTALL


def download(ctx: StepContext) -> Event:
    """Fetch the artifact into its ``.part`` file, resuming with Range; a short file after a full read is fatal.

    A dropped connection or an unreachable server raises ``TransientError`` (the runner retries with backoff).
    """
    art = ctx.job["payload"]["artifact"]
    sha, size = art["sha256"], art["size_bytes"]
    if ctx.slots.has(sha) and not (ctx.slots.info(sha) or {}).get("blocked"):
        return Event.DOWNLOADED  # already on the device (e.g. a version it ran before): verified again next
    part = ctx.slots.part_path(sha)
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        have = 0
    if have < size:
        try:
            # The path is built from the verified sha256, never taken from the payload's url: the device
            # token must only ever go to the server the agent enrolled with.
            ctx.client.download(f"/v1/artifacts/{sha}", part, have, should_stop=ctx.should_stop)
        except IncompleteDownload:
            # The server answers but keeps ending early without new bytes (e.g. its stored file is short):
            # unlike an unreachable server, waiting will not fix that.
            got = part.stat().st_size if part.exists() else 0
            ctx.job["stalls"] = ctx.job.get("stalls", 0) + 1 if got <= have else 0
            if ctx.job["stalls"] >= ctx.settings.max_download_stalls:
                raise VerificationError(f"the server sent {got} of {size} bytes and then nothing more in "
                                        f"{ctx.job['stalls']} tries", reason="download_failed") from None
            raise
    got = part.stat().st_size if part.exists() else 0
    if got != size:
        raise VerificationError(f"the server has {got} of the artifact's {size} bytes", reason="download_failed")
    ctx.emit("downloaded", metrics={"bytes": size})
    return Event.DOWNLOADED


def verify(ctx: StepContext) -> Event:
    """sha256 of the whole file, then manifest hash and bundle hashes; the slot appears only when all pass."""
    job = ctx.job
    profile = (ctx.identity or {}).get("profile") or ctx.settings.profile
    if job["kind"] == "local":
        sha, art = job["sha256"], None
    else:
        art = job["payload"]["artifact"]
        sha = art["sha256"]

    publishers = trusted_publishers(ctx)

    def check(bundle_dir: Path) -> dict:
        check_bundle(bundle_dir, manifest_sha256=art["manifest_sha256"] if art else None, profile=profile,
                     fmt=art["format"] if art else None, trusted_keys=publishers)
        m = open_bundle(bundle_dir).manifest
        if ctx.settings.formats is not None and m.format not in ctx.settings.formats:
            raise VerificationError(f"format {m.format} does not run on this device", reason="wrong_profile")
        facts = {"name": m.name, "version": m.version, "profile": m.profile, "format": m.format}
        if job["kind"] != "local" and job.get("version"):  # version truth: the device reports its assignment's registry version
            facts.update(version=job["version"], manifest_version=m.version)
        return facts

    if ctx.slots.has(sha) and not (ctx.slots.info(sha) or {}).get("blocked"):
        ctx.slots.verify(sha)
        facts = check(ctx.slots.bundle(sha))
        ctx.slots.part_path(sha).unlink(missing_ok=True)  # left over when a kill fell between the slot's commit and its cleanup
    elif job["kind"] == "local":
        ctx.slots.create_from_source(sha, Path(job["source"]), {"source": job["source"]}, check)
        facts = ctx.slots.info(sha) or {}
    else:
        part = ctx.slots.part_path(sha)
        if not part.exists():
            raise VerificationError("the downloaded artifact is gone", reason="download_failed")
        check_artifact_file(part, sha)
        ctx.slots.create_from_artifact(sha, part, {"model": job.get("model"), "serial": job.get("serial")}, check)
        facts = ctx.slots.info(sha) or {}
    job.update(name=facts.get("name"), version=facts.get("version"))
    ctx.emit("verified")
    return Event.VERIFIED


def trusted_publishers(ctx: StepContext) -> tuple[str, ...] | None:
    """The publisher keys this job's bundle may be signed by (None: any, for an explicit insecure local install).

    Fleet: the server's signed allow-list, narrowed to the device's pinned keys when it has any. Local:
    the pinned keys, else the allow-list the device last received from its server.
    """
    store, pinned = TrustStore(ctx.data), ctx.settings.trusted_keys
    if ctx.job["kind"] != "local":
        keys = store.effective_publishers(pinned)
        if keys is None:
            raise VerificationError("this device has no publisher allow-list from its server, so it trusts no bundle",
                                    "The server sends it with every assignment (GET /v1/device/trust); check the server.",
                                    reason="other:untrusted_publisher")
        return keys
    keys = pinned or store.publisher_keys() or ()
    if not keys and ctx.settings.insecure_any_publisher:
        return None
    return keys


def profile(ctx: StepContext) -> Event:
    """Measure the candidate and the active model on this device; refuse a golden-set mismatch."""
    sha = ctx.job["sha256"]
    active = ctx.slots.active_sha()
    baseline = ctx.slots.bundle(active) if active and active != sha and ctx.slots.has(active) else None
    s: ProfileSettings = ctx.settings.profiling
    metrics = profile_candidate(ctx.slots.bundle(sha), baseline, active if baseline else None, s, ctx.should_stop)
    ctx.job["profile"] = metrics
    ctx.record["last_profile"] = {"sha256": sha, "name": ctx.job.get("name"), "version": ctx.job.get("version"), "at": utc_now(),
                                  "metrics": metrics}
    ctx.emit("profiled", metrics=metrics)
    if not metrics.get("golden_passed"):
        raise VerificationError(
            f"golden set: top-1 agreement {metrics.get('golden_top1_agreement')} (needs {metrics.get('golden_min_top1_agreement')}), "
            f"max abs error {metrics.get('golden_max_abs_err')} (atol {metrics.get('golden_atol')})", reason="golden_mismatch")
    return Event.PROFILED


def activate(ctx: StepContext) -> Event:
    """Re-check the slot's sha256, then switch the pointer with one atomic rename."""
    sha = ctx.job["sha256"]
    ctx.slots.verify(sha)
    before = ctx.job["before"]  # recorded when the job started: a re-entered step sees the same value
    ctx.slots.point_to(sha, previous=before["previous"] if before["sha256"] == sha else before["sha256"])
    return Event.ACTIVATED


def finish(ctx: StepContext) -> Event:
    """Report ``activated`` and collect slots beyond the ones kept."""
    ctx.emit("activated", metrics={"sha256": ctx.job["sha256"], "version": ctx.job.get("version")})
    ctx.slots.gc()
    return Event.DONE


def roll_back(ctx: StepContext) -> Event:
    """Put back the model that was active before the assignment; drop the candidate; report the failure."""
    job = ctx.job
    failure = job.get("failure") or {"reason": "other:unknown", "message": "no failure recorded"}
    before = job["before"]
    if ctx.slots.active_sha() != before["sha256"]:
        ctx.slots.point_to(before["sha256"], previous=before["previous"])
    sha = job.get("sha256")
    if sha and job.get("action") != "revert":
        ctx.slots.part_path(sha).unlink(missing_ok=True)  # a corrupted download must not be resumed
        if sha not in (before["sha256"], before["previous"]):
            ctx.slots.block(sha, failure["reason"])
    ctx.emit("failed", reason=failure["reason"], metrics={"message": failure.get("message", "")[:500]})
    return Event.ROLLED_BACK


def revert(ctx: StepContext) -> Event:
    """The server says return to the previous version (or to none); keep the reverted-from slot out of use."""
    job = ctx.job
    art = job["payload"].get("artifact")
    current = job["before"]["sha256"]  # what was active when the revert arrived, even if this step is re-entered
    target = art["sha256"] if art else None
    if target is not None:
        if not ctx.slots.has(target):
            raise VerificationError(f"the revert target {target[:12]} is not on this device", reason="other:revert_target_missing")
        blocked = (ctx.slots.info(target) or {}).get("blocked")
        if blocked and target != current:  # a slot kept out of use as bad is never switched back to; the current model stays
            raise VerificationError(f"the revert target {target[:12]} is blocked ({blocked}); the current model is kept",
                                    reason="other:revert_target_blocked")
        ctx.slots.verify(target)
    if ctx.slots.active_sha() != target:
        ctx.slots.point_to(target, previous=None)
    if current is not None and current != target:
        ctx.slots.block(current, "reverted")
    reason = job["payload"].get("reason") or "server_rollback"
    ctx.emit("rolled_back", reason=reason, metrics={"sha256": target, "from_sha256": current})
    return Event.REVERTED


HANDLERS = {
    State.ACCEPTING: accept,
    State.DOWNLOADING: download,
    State.VERIFYING: verify,
    State.PROFILING: profile,
    State.ACTIVATING: activate,
    State.ACTIVE: finish,
    State.ROLLING_BACK: roll_back,
    State.REVERTING: revert,
}


def open_runner(data: DataDir, settings: AgentSettings, *, identity: dict | None = None, client: FleetClient | None = None,
                should_stop: Callable[[], bool] = lambda: False, sleep: Callable[[float], None] = lambda s: None) -> Runner:
    """A :class:`~device_agents.machine.Runner` over this data dir's persisted record, with the handlers above."""

    ctx = StepContext(data=data, slots=Slots(data, settings.keep_slots), settings=settings, record=data.load_state(),
                      identity=identity, client=client, should_stop=should_stop, sleep=sleep)
    return Runner(ctx, HANDLERS, max_attempts=settings.max_attempts, backoff_base_s=settings.backoff_base_s,
                  backoff_max_s=settings.backoff_max_s)
