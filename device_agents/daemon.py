"""``edgekit agent run``: enroll once, then poll, work through assignments, report, post telemetry.

One thread. Each cycle: send queued reports, poll ``desired`` (ETag / 304), run a new assignment
through the state machine to the end, post buffered telemetry, sleep the server's interval with
±20% jitter. While the server is unreachable the cycle backs off exponentially (to
``backoff_max_s``, 5 minutes by default); the active model is untouched and apps keep serving
it; reports and telemetry stay on disk until the server takes them. SIGTERM sets ``stop``: the
current step finishes or is interrupted at a safe point, and the state on disk is re-entered on
the next start.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import random
import socket
import ssl
import threading
from pathlib import Path

from edgekit.errors import RemoteError, UsageError

from device_agents.client import FleetClient
from device_agents.lock import DirLock
from device_agents.machine import Event, Interrupted, Runner, State, TransientError, backoff_delay
from device_agents.settings import AgentSettings
from device_agents.steps import open_runner
from device_agents.store import DataDir, utc_now
from device_agents.telemetry import TelemetryBuffer
from device_agents.trust import TrustStore

__all__ = ["Agent"]

log = logging.getLogger("edgekit.agent")


class Agent:
    """The device agent daemon for one data directory."""

    def __init__(self, data_dir: str, server: str, settings: AgentSettings, *, enroll_token: str | None = None,
                 name: str | None = None, tags: tuple[str, ...] = (), stop: threading.Event | None = None) -> None:
        self.data = DataDir(data_dir).ensure()
        self.server = server
        self.settings = settings
        self.enroll_token = enroll_token
        self.name = name or socket.gethostname()
        self.tags = tags
        self.stop = stop or threading.Event()
        self.telemetry = TelemetryBuffer(self.data.root)
        self.poll_interval_s = 30.0
        self._etag: str | None = None
        self._failures = 0

    # --- enrollment ---------------------------------------------------------------------------
    def enroll(self) -> dict:
        """The pinned identity; enrolls once (retrying while the server is unreachable)."""
        identity = self.data.identity()
        if identity is not None:
            if self.settings.profile and identity.get("profile") != self.settings.profile:
                raise UsageError(f"{self.data.root} is enrolled as {identity.get('profile')}, not {self.settings.profile}",
                                 "Drop --profile, or use a new --data-dir to enroll again.")
            return identity
        if not self.enroll_token:
            raise UsageError(f"{self.data.root} is not enrolled yet", "Pass --enroll-token (made with 'edgekit server token create --scope enroll').")
        if not self.settings.profile:
            raise UsageError("enrollment needs the device's profile", "Pass --profile ID (or --profile auto).")
        facts = {"hostname": socket.gethostname(), "machine": platform.machine(), "system": platform.platform(),
                 "python": platform.python_version()}
        client = FleetClient(self.server, timeout_s=self.settings.http_timeout_s, ca_file=self._server_ca())
        try:
            while True:
                try:
                    resp = client.enroll(self.enroll_token, name=self.name, profile=self.settings.profile, tags=self.tags, facts=facts)
                    break
                except TransientError as e:
                    self._back_off(e)
                    if self.stop.is_set():
                        raise Interrupted() from None
        finally:
            client.close()
        identity = {"server": self.server, "device_id": resp["device_id"], "device_token": resp["device_token"],
                    "server_public_key": resp["server_public_key"], "key_id": resp.get("key_id"), "profile": self.settings.profile,
                    "name": self.name, "tags": list(self.tags), "enrolled_at": utc_now()}
        self._pin_server_ca()
        self.data.save_identity(identity)
        self._fetch_trust(identity)
        self.poll_interval_s = float(resp.get("poll_interval_s") or self.poll_interval_s)
        log.info("enrolled as %s (%s)", resp["device_id"], self.name)
        return identity

    def _fetch_trust(self, identity: dict) -> None:
        """Pin the server's publisher allow-list right after enrolling (it is fetched again before every new assignment)."""
        client = FleetClient(self.server, identity["device_token"], timeout_s=self.settings.http_timeout_s, ca_file=self._server_ca())
        try:
            TrustStore(self.data).refresh(identity, client.trust)
        except (TransientError, RemoteError) as e:
            log.warning("could not fetch the trust document after enrolling (%s); it is fetched with the first assignment", e)
        finally:
            client.close()

    # --- the server's TLS certificate -------------------------------------------------------------
    @property
    def _pinned_ca(self) -> Path:
        return self.data.root / "server-ca.pem"

    def _server_ca(self) -> str | None:
        """The CA file https is verified against: the one pinned at enrollment, else ``--server-ca`` (before enrolling).

        A different ``--server-ca`` after enrollment is refused: the pin changes only by enrolling again.
        """
        given = self.settings.server_ca
        if given is not None:
            try:
                ssl.create_default_context(cafile=given)
            except (OSError, ssl.SSLError) as e:
                raise UsageError(f"--server-ca {given}: not a readable PEM certificate ({e})",
                                 "Pass the PEM file of the CA that signed the server's certificate (or the certificate itself).") from None
        if self._pinned_ca.exists():
            if given is not None and Path(given).read_bytes() != self._pinned_ca.read_bytes():
                raise UsageError(f"--server-ca {given} is not the CA pinned at enrollment ({self._pinned_ca})",
                                 "Drop --server-ca (the pinned one is used), or enroll again with a new --data-dir.")
            return str(self._pinned_ca)
        return given

    def _pin_server_ca(self) -> None:
        """Copy ``--server-ca`` into the data dir (atomically), so every later connection trusts it alone."""
        if self.settings.server_ca is None:
            return
        tmp = self._pinned_ca.with_name(".server-ca.pem.tmp")
        tmp.write_bytes(Path(self.settings.server_ca).read_bytes())
        os.replace(tmp, self._pinned_ca)

    # --- the loop -----------------------------------------------------------------------------
    def _back_off(self, e: Exception) -> None:
        self._failures += 1
        delay = backoff_delay(self._failures - 1, self.settings.backoff_base_s, self.settings.backoff_max_s)
        log.info("server unreachable (%s); next try in %.1fs", e, delay)
        self.stop.wait(delay)

    def _interval(self) -> float:
        base = self.settings.poll_interval_s or self.poll_interval_s
        return base * random.uniform(0.8, 1.2)

    def run(self) -> None:
        """Run until ``stop`` is set."""
        daemon_lock = DirLock(self.data.root / ".daemon.lock")
        daemon_lock.acquire(0, "another 'edgekit agent run'")
        try:
            identity = self.enroll()
            self.settings = self.settings.for_profile(identity.get("profile"))
            client = FleetClient(self.server, identity["device_token"], timeout_s=self.settings.http_timeout_s, ca_file=self._server_ca())
            try:
                self._loop(identity, client)
            except Interrupted:
                log.info("stopping")
            finally:
                client.close()
        except Interrupted:
            log.info("stopped before enrollment finished")
        finally:
            daemon_lock.release()

    def _runner(self, identity: dict, client: FleetClient) -> Runner:
        return open_runner(self.data, self.settings, identity=identity, client=client, should_stop=self.stop.is_set,
                           sleep=self.stop.wait)

    def _run_job(self, identity: dict, client: FleetClient, signed: dict | None = None) -> None:
        job_lock = DirLock(self.data.root / ".job.lock")
        with job_lock.held(None):
            runner = self._runner(identity, client)
            if signed is not None and runner.state is State.IDLE:
                rec = runner.ctx.record
                digest = hashlib.sha256(str(signed.get("payload")).encode()).hexdigest()
                rec["current"] = digest  # persisted with the start: this payload is not taken up twice
                slots = runner.ctx.slots
                runner.start(Event.ASSIGNED, {"kind": "fleet", "signed": signed, "received_at": utc_now(),
                                              "before": {"sha256": slots.active_sha(), "previous": slots.previous_sha()}})
            while runner.state is not State.IDLE:
                if self.stop.is_set():
                    raise Interrupted()
                try:
                    runner.step()
                except Interrupted:
                    raise
                except Exception:  # noqa: BLE001 - a bug or OS error in a step: counted by the loop guard, retried
                    log.exception("step %s crashed", runner.state)
                    self.stop.wait(backoff_delay(1, self.settings.backoff_base_s, self.settings.backoff_max_s))
                    runner = self._runner(identity, client)  # re-read what was persisted, as after a restart
                self._send_reports(client, runner.ctx.record, quiet=True)

    def _is_new(self, signed: dict) -> bool:
        """False for the payload last taken up (the server re-serves its desired state on every poll).

        Any other payload goes through verification, so an older assignment replayed later is
        refused and reported (``replayed_serial``) rather than silently skipped.
        """
        digest = hashlib.sha256(str(signed.get("payload")).encode()).hexdigest()
        return digest != self.data.load_state().get("current")

    def _send_reports(self, client: FleetClient, record: dict | None = None, *, quiet: bool = False) -> None:
        """Deliver queued reports in order, oldest first; stop at the first that cannot be delivered now.

        ``record``: the live runner's record (inside a job); otherwise the persisted one, under the job lock.
        """
        if record is None:
            with DirLock(self.data.root / ".job.lock").held(None):
                self._send_reports(client, self.data.load_state(), quiet=quiet)
            return
        outbox = record.get("outbox") or []
        sent = 0
        try:
            for report in outbox:
                if not client.report(report):
                    log.warning("server refused report %s/%s; dropped", report.get("serial"), report.get("phase"))
                sent += 1
        except (TransientError, RemoteError):
            if not quiet:
                raise
        finally:
            if sent:
                record["outbox"] = outbox[sent:]
                self.data.save_state(record)

    def _send_telemetry(self, client: FleetClient) -> int:
        posted = 0
        for _ in range(10):  # at most 10 batches per cycle; the rest next time
            batch = self.telemetry.batch(1000)
            if not batch.points and not batch.dropped:
                break
            if client.telemetry(list(batch.points), batch.dropped) is None:  # would be refused forever: do not block the queue
                log.warning("server refused %d telemetry points as invalid; dropped", len(batch.points))
            self.telemetry.ack(batch)
            posted += len(batch.points)
        return posted

    def _loop(self, identity: dict, client: FleetClient) -> None:
        self._run_job(identity, client)  # re-enter whatever was persisted before a restart
        while not self.stop.is_set():
            try:
                self._send_reports(client)
                status, etag, body = client.desired(self._etag)
                self.data.touch_contact("desired")
                if status == 200 and body is not None:
                    self.poll_interval_s = float(body.get("poll_interval_s") or self.poll_interval_s)
                    signed = body.get("assignment")
                    if signed and self._is_new(signed):
                        self._run_job(identity, client, signed)
                    self._etag = etag
                self._send_reports(client)
                self._send_telemetry(client)
                self._failures = 0
            except TransientError as e:
                self._back_off(e)
                continue
            except RemoteError as e:
                log.warning("server refused: %s", e.message)
                self._back_off(e)
                continue
            self.stop.wait(self._interval())
