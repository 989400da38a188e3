"""The agent's one HTTP client for the fleet protocol (docs/protocol.md), over httpx."""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from pathlib import Path

import httpx

from edgekit import __version__
from edgekit.errors import RemoteError

from device_agents.machine import Interrupted, TransientError

__all__ = ["FleetClient", "IncompleteDownload"]


class IncompleteDownload(TransientError):
    """The server answered but the body ended early: retried with Range, and given up if it never progresses."""


def _error(resp: httpx.Response) -> RemoteError:
    try:
        err = resp.json()["error"]
        return RemoteError(f"{resp.request.method} {resp.request.url.path}: {resp.status_code} {err.get('code')}: {err.get('message')}",
                           err.get("hint") or None)
    except (ValueError, KeyError, TypeError):
        return RemoteError(f"{resp.request.method} {resp.request.url.path}: HTTP {resp.status_code}")


class FleetClient:
    """Device-side calls; connection failures and 5xx/429 become :class:`TransientError`, other 4xx :class:`RemoteError`."""

    def __init__(self, server: str, token: str | None = None, *, timeout_s: float = 30.0, ca_file: str | None = None) -> None:
        self.server = server.rstrip("/")
        headers = {"User-Agent": f"edgekit-agent/{__version__}"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        # ca_file: the server's CA (or certificate) pinned at enrollment; https is then verified against it alone
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
        self._http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout_s, verify=verify)

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, url: str, **kw) -> httpx.Response:
        try:
            resp = self._http.request(method, url, **kw)
        except httpx.TransportError as e:  # connect, read, timeout, protocol errors
            raise TransientError(f"{self.server} unreachable ({type(e).__name__}: {e})") from None
        if resp.status_code >= 500 or resp.status_code == 429:
            raise TransientError(f"{method} {url}: server error {resp.status_code}")
        return resp

    def enroll(self, enroll_token: str, *, name: str, profile: str, tags: tuple[str, ...], facts: dict) -> dict:
        """``POST /v1/devices/enroll`` with the enroll token; the device id, token and server key."""
        resp = self._send("POST", "/v1/devices/enroll", json={"name": name, "profile": profile, "tags": list(tags), "facts": facts},
                          headers={"Authorization": f"Bearer {enroll_token}"})
        if resp.status_code != 201:
            raise _error(resp)
        return resp.json()

    def trust(self) -> dict:
        """``GET /v1/device/trust``: the server key's rotations and the signed publisher allow-list."""
        resp = self._send("GET", "/v1/device/trust")
        if resp.status_code != 200:
            raise _error(resp)
        try:
            body = resp.json()
        except ValueError:
            raise RemoteError("GET /v1/device/trust: the answer is not JSON") from None
        return body if isinstance(body, dict) else {}

    def desired(self, etag: str | None) -> tuple[int, str | None, dict | None]:
        """``GET /v1/device/desired``: (status, ETag, body); 304 has no body."""
        resp = self._send("GET", "/v1/device/desired", headers={"If-None-Match": etag} if etag else {})
        if resp.status_code == 304:
            return 304, etag, None
        if resp.status_code != 200:
            raise _error(resp)
        return 200, resp.headers.get("ETag"), resp.json()

    def download(self, url: str, part: Path, offset: int, *, should_stop: Callable[[], bool] = lambda: False) -> None:
        """Append the artifact's bytes from ``offset`` to ``part`` (Range); 416 means the server has no more."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        answered = False
        try:
            with self._http.stream("GET", url, headers=headers) as resp:
                answered = True
                if resp.status_code == 416:
                    return
                if resp.status_code >= 500 or resp.status_code == 429:
                    raise TransientError(f"GET {url}: server error {resp.status_code}")
                if resp.status_code not in (200, 206):
                    resp.read()
                    from edgekit.errors import VerificationError

                    raise VerificationError(_error(resp).message, reason="download_failed")
                mode = "ab" if resp.status_code == 206 else "wb"  # 200: the server ignored Range; start over
                with open(part, mode) as f:
                    for chunk in resp.iter_bytes():  # as it arrives: a partial file survives a stop
                        f.write(chunk)
                        if should_stop():
                            f.flush()
                            os.fsync(f.fileno())
                            raise Interrupted()
                    f.flush()
                    os.fsync(f.fileno())
        except httpx.TransportError as e:
            cls = IncompleteDownload if answered else TransientError
            raise cls(f"download interrupted ({type(e).__name__}: {e}); will resume with Range") from None

    def report(self, report: dict) -> bool:
        """``POST /v1/device/reports``; True when the server has it (accepted or duplicate), False when it refuses it for good."""
        body = {k: report[k] for k in ("serial", "phase", "reason", "metrics")}
        resp = self._send("POST", "/v1/device/reports", json=body)
        if resp.status_code == 200:
            return True
        if resp.status_code in (400, 403, 404, 409, 422):
            return False
        raise _error(resp)

    def telemetry(self, points: list[dict], dropped: int) -> int | None:
        """``POST /v1/device/telemetry``; the number of points accepted, None when the server refuses the batch as invalid."""
        resp = self._send("POST", "/v1/device/telemetry", json={"points": points, "dropped": dropped})
        if resp.status_code in (400, 413, 422):
            return None
        if resp.status_code != 202:
            raise _error(resp)
        return int(resp.json().get("accepted", len(points)))
