"""The admin side of the fleet protocol (docs/protocol.md): upload model versions, create and
steer rollouts, list devices. One ``httpx.Client`` per ``FleetClient``; httpx is imported
inside so edgekit's core imports without it.

Every failure becomes a :class:`~edgekit.errors.RemoteError`: the server's own
``{"error": {"code", "message", "hint"}}`` when it answered, a plain sentence when it could not
be reached or did not answer in time.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from edgekit.errors import RemoteError, RuntimeUnavailableError, UsageError
from edgekit.protocol import GATE_NAMES, TERMINAL_ROLLOUT_STATES, VERSION_PATTERN

if TYPE_CHECKING:
    import httpx

__all__ = ["GATES", "TERMINAL_STATES", "FleetClient", "RolloutSpec", "parse_gates", "parse_selector", "parse_waves"]

GATES = (*GATE_NAMES, "bake_s", "bake_requests", "safe_defaults")  # edgekit.protocol.Gates
TERMINAL_STATES = TERMINAL_ROLLOUT_STATES
ROLLOUT_ACTIONS = ("pause", "resume", "promote", "rollback")
_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

_STATUS_HINTS = {
    401: "Check --token / EDGEKIT_TOKEN; create an admin token with 'edgekit server token create --scope admin'.",
    403: "This command needs an admin token ('edgekit server token create --scope admin').",
    404: "Check the name, version or id ('edgekit devices list', the id printed by 'edgekit push --rollout').",
    409: "The server's state does not allow this now; see 'edgekit rollout status ID'.",
    413: "The upload is over the server's limit (EDGEKIT_MAX_UPLOAD_MB on the server).",
}


@dataclass(frozen=True)
class RolloutSpec:
    """The body of ``POST /v1/rollouts``."""

    model: str
    version: str
    profiles: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    waves: tuple[float, ...] = (100,)
    gates: dict[str, float] = field(default_factory=dict)
    wave_timeout_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The request body the protocol defines."""
        body: dict[str, Any] = {
            "model": self.model,
            "version": self.version,
            "selector": {"profiles": list(self.profiles), "tags": list(self.tags)},
            "waves": [int(w) if float(w).is_integer() else w for w in self.waves],
            "gates": dict(self.gates),
        }
        if self.wave_timeout_s is not None:
            body["wave_timeout_s"] = self.wave_timeout_s
        return body


def parse_selector(items: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``profile=ID,tag=T`` (repeatable, comma-separated) → (profiles, tags)."""
    profiles: list[str] = []
    tags: list[str] = []
    for item in items:
        for part in filter(None, (p.strip() for p in item.split(","))):
            key, sep, value = part.partition("=")
            key = key.strip().lower()
            if not sep or not value.strip() or key not in ("profile", "tag"):
                raise UsageError(f"--select {item!r}: expected profile=ID or tag=T pairs", "For example: --select profile=raspberry-pi-5,tag=shop-12.")
            (profiles if key == "profile" else tags).append(value.strip())
    return tuple(dict.fromkeys(profiles)), tuple(dict.fromkeys(tags))


def parse_waves(text: str) -> tuple[float, ...]:
    """``5,25,100`` → cumulative percentages, strictly increasing, ending at 100."""
    try:
        waves = tuple(float(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise UsageError(f"--waves {text!r}: expected comma-separated percentages", "For example: --waves 5,25,100.") from None
    ok = bool(waves) and all(0 < w <= 100 for w in waves) and all(a < b for a, b in zip(waves, waves[1:])) and waves[-1] == 100
    if not ok:
        raise UsageError(f"--waves {text!r}: waves are cumulative percentages, strictly increasing, ending at 100",
                         "For example: --waves 5,25,100 (5% of the devices, then 25%, then all).")
    return waves


def parse_gates(items: Sequence[str]) -> dict[str, Any]:
    """``max_p95_ratio=1.2`` (repeatable) → the rollout's gates; ``safe_defaults=false`` / ``require_golden=false`` opt out."""
    gates: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key in ("safe_defaults", "require_golden") and value.strip().lower() in ("true", "false"):
            gates[key] = value.strip().lower() == "true"
            continue
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not sep or key not in GATES or number != number or number < 0:
            raise UsageError(f"--gate {item!r}: expected NAME=NUMBER with NAME one of {', '.join(GATES)}",
                             "For example: --gate max_p95_ratio=1.2 --gate min_agreement=0.99.")
        gates[key] = int(number) if key == "bake_requests" else number
    return gates


class _CountingReader:
    """A read-only file wrapper that reports how many bytes httpx has read for the upload."""

    def __init__(self, f: IO[bytes], on_read: Callable[[int], None]) -> None:
        self._f, self._on_read = f, on_read

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._on_read(len(data))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def fileno(self) -> int:
        return self._f.fileno()


class FleetClient:
    """An admin session with one fleet server: ``with FleetClient(url, token) as fleet: ...``."""

    def __init__(self, server: str, token: str, *, timeout: float = 30.0, upload_timeout: float = 600.0,
                 ca_file: str | Path | None = None) -> None:
        """``ca_file`` (default ``EDGEKIT_CA_FILE``): the PEM CA or certificate an https server is verified against
        instead of the system's CAs."""
        try:
            import httpx
        except ImportError:
            raise RuntimeUnavailableError("talking to a fleet server needs httpx, which is not installed",
                                          "Install it with: pip install 'edgekit[admin]' (or pip install httpx).") from None

        if not re.match(r"^https?://[^/\s]+", server or ""):
            raise UsageError(f"--server {server!r}: expected an http:// or https:// URL", "For example: --server http://127.0.0.1:8400.")
        if not token:
            raise UsageError("no admin token", "Pass --token or set EDGEKIT_TOKEN ('edgekit server token create --scope admin').")
        self.server = server.rstrip("/")
        self._timeout, self._upload_timeout = timeout, upload_timeout
        ca_file = ca_file or os.environ.get("EDGEKIT_CA_FILE") or None
        verify: ssl.SSLContext | bool = True
        if ca_file:
            try:
                verify = ssl.create_default_context(cafile=str(ca_file))
            except (OSError, ssl.SSLError) as e:
                raise UsageError(f"CA file {ca_file}: not a readable PEM certificate ({e})",
                                 "Set EDGEKIT_CA_FILE to the PEM of the CA that signed the server's certificate.") from None
        self._http = httpx.Client(base_url=self.server, headers={"Authorization": f"Bearer {token}", "User-Agent": "edgekit-cli"},
                                  timeout=timeout, verify=verify)

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    # -- one request, one place that turns failures into RemoteError --------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError as e:
            if "CERTIFICATE_VERIFY_FAILED" in str(e):
                raise RemoteError(f"the TLS certificate of {self.server} is not trusted ({_reason(e)})",
                                  "Set EDGEKIT_CA_FILE to the CA that signed the server's certificate (see docs/server.md, TLS).") from None
            raise RemoteError(f"cannot reach the fleet server at {self.server} ({_reason(e)})",
                              "Start it with 'edgekit server start', or check --server / EDGEKIT_SERVER.") from None
        except httpx.TimeoutException:
            limit = kwargs.get("timeout", self._timeout)
            raise RemoteError(f"the fleet server at {self.server} did not answer {method} {path} within {limit:g} s",
                              "The server may be overloaded or stuck; check its log, then retry.") from None
        except httpx.TransportError as e:
            raise RemoteError(f"{method} {self.server}{path} failed: {_reason(e)}", "Check the server and the network, then retry.") from None
        if response.status_code >= 400:
            raise _server_error(response)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise RemoteError(f"{method} {path}: the server answered HTTP {response.status_code} with something that is not JSON",
                              "Is --server the edgekit fleet server (not a proxy or another service)?") from None

    # -- admin routes ---------------------------------------------------------------------------------

    def upload(self, name: str, archives: Sequence[Path], version: str | None = None,
               progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        """``POST /v1/models/{name}/versions`` with every ``.ekb`` as one version → ``ModelVersion``."""
        on_read = progress or (lambda _n: None)
        with ExitStack() as stack:
            files = [("bundles", (a.name, _CountingReader(stack.enter_context(open(a, "rb")), on_read), "application/octet-stream"))
                     for a in archives]
            data = {"version": version} if version else {}
            return self._request("POST", f"/v1/models/{_segment(name)}/versions", data=data, files=files, timeout=self._upload_timeout)

    def rotate_server_key(self) -> dict[str, Any]:
        """``POST /v1/server/key/rotate`` → the rotation (old and new key ids, sequence)."""
        return self._request("POST", "/v1/server/key/rotate")

    def publishers(self) -> list[dict[str, Any]]:
        """``GET /v1/publishers``: the publisher allow-list."""
        return self._request("GET", "/v1/publishers")

    def models(self) -> list[dict[str, Any]]:
        """``GET /v1/models``."""
        return self._request("GET", "/v1/models")

    def create_rollout(self, spec: RolloutSpec) -> dict[str, Any]:
        """``POST /v1/rollouts`` → ``Rollout``."""
        return self._request("POST", "/v1/rollouts", json=spec.to_json())

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        """``GET /v1/rollouts/{id}`` → ``Rollout``."""
        return self._request("GET", f"/v1/rollouts/{_checked_id(rollout_id)}")

    def rollout_action(self, rollout_id: str, action: str) -> dict[str, Any]:
        """``POST /v1/rollouts/{id}/pause|resume|promote|rollback`` → ``Rollout``."""
        if action not in ROLLOUT_ACTIONS:
            raise UsageError(f"unknown rollout action {action!r}", f"Choose one of {', '.join(ROLLOUT_ACTIONS)}.")
        return self._request("POST", f"/v1/rollouts/{_checked_id(rollout_id)}/{action}")

    def devices(self, profile: str | None = None, tag: str | None = None) -> list[dict[str, Any]]:
        """``GET /v1/devices?profile=&tag=`` → ``[Device]``."""
        params = {k: v for k, v in (("profile", profile), ("tag", tag)) if v}
        return self._request("GET", "/v1/devices", params=params)

    def rollouts(self, *, state: str | None = None, model: str | None = None, version: str | None = None, limit: int = 50,
                 offset: int = 0) -> dict[str, Any]:
        """``GET /v1/rollouts`` with filters and paging → ``{items, total, limit, offset}``."""
        params = {k: v for k, v in (("state", state), ("model", model), ("version", version)) if v}
        return self._request("GET", "/v1/rollouts", params={**params, "limit": limit, "offset": offset})

    def stats(self, model: str, version: str | None = None, *, since: str | None = None, until: str | None = None,
              bucket_s: int | None = None, profile: str | None = None, reference_version: str | None = None) -> dict[str, Any]:
        """Field statistics of one version (``GET /v1/models/{name}/versions/{version}/stats``), or of every version."""
        params = {k: v for k, v in (("since", since), ("until", until), ("bucket_s", bucket_s), ("profile", profile),
                                    ("reference_version", reference_version)) if v is not None}
        if version is None:
            return self._request("GET", f"/v1/models/{_segment(model)}/stats", params=params)
        return self._request("GET", f"/v1/models/{_segment(model)}/versions/{_version(version)}/stats", params=params)

    def audit(self, *, since: str | None = None, actor: str | None = None, action: str | None = None, limit: int = 100,
              offset: int = 0) -> dict[str, Any]:
        """``GET /v1/audit`` → ``{items, total, limit, offset}`` (newest first)."""
        params = {k: v for k, v in (("since", since), ("actor", actor), ("action", action)) if v}
        return self._request("GET", "/v1/audit", params={**params, "limit": limit, "offset": offset})

    def tokens(self, *, scope: str | None = None, include_revoked: bool = False) -> dict[str, Any]:
        """``GET /v1/tokens``."""
        params: dict[str, Any] = {"include_revoked": include_revoked, "limit": 1000}
        if scope:
            params["scope"] = scope
        return self._request("GET", "/v1/tokens", params=params)

    def create_token(self, name: str, scope: str = "admin", label: str = "") -> dict[str, Any]:
        """``POST /v1/tokens`` → the token (shown once) and its id and name."""
        return self._request("POST", "/v1/tokens", json={"name": name, "scope": scope, "label": label})

    def revoke_token(self, ref: str) -> dict[str, Any]:
        """``POST /v1/tokens/{id or name}/revoke``."""
        return self._request("POST", f"/v1/tokens/{_checked_id(ref)}/revoke")

    def decommission(self, device_id: str) -> dict[str, Any]:
        """``POST /v1/devices/{id}/decommission``."""
        return self._request("POST", f"/v1/devices/{_checked_id(device_id)}/decommission")

    def watch_rollout(self, rollout_id: str, interval: float, timeout: float,
                      sleep: Callable[[float], None] | None = None) -> Iterator[dict[str, Any]]:
        """Yield the rollout every ``interval`` s until it is terminal; raise RemoteError after ``timeout`` s."""
        import time

        sleep = sleep or time.sleep
        deadline = time.monotonic() + timeout
        while True:
            rollout = self.rollout(rollout_id)
            yield rollout
            if rollout.get("state") in TERMINAL_STATES:
                return
            if time.monotonic() + interval > deadline:
                raise RemoteError(f"rollout {rollout_id} is still {rollout.get('state')} after {timeout:g} s",
                                  "Watch longer with --timeout, or steer it with 'edgekit rollout pause|promote|rollback'.")
            sleep(interval)


def _segment(name: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", name):
        raise UsageError(f"model name {name!r} is not valid", "Names are lowercase letters, digits, '.', '_' and '-' (at most 64), e.g. --model digits.")
    return name


def _version(version: str) -> str:
    if not re.fullmatch(VERSION_PATTERN, version):
        raise UsageError(f"invalid version {version!r}", "Versions match ^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$.")
    return version


def _checked_id(rollout_id: str) -> str:
    if not _ID.match(rollout_id):
        raise UsageError(f"{rollout_id!r} is not a rollout id", "Pass the id printed by 'edgekit push --rollout'.")
    return rollout_id


def _reason(e: Exception) -> str:
    text = str(e) or type(e).__name__
    if "refused" in text.lower() or "errno 111" in text.lower():
        return "connection refused"
    return text


def _server_error(response: httpx.Response) -> RemoteError:
    """The server's ``{"error": {"code", "message", "hint"}}`` as a RemoteError."""
    status = response.status_code
    try:
        err = response.json().get("error") or {}
    except (ValueError, AttributeError):
        err = {}
    if isinstance(err, dict) and err.get("message"):
        code = err.get("code") or "error"
        hint = err.get("hint") or _STATUS_HINTS.get(status)
        if status in (401, 403) and hint != _STATUS_HINTS[status]:  # the server speaks HTTP; say which flag to fix
            hint = f"{hint} {_STATUS_HINTS[status]}".strip()
        return RemoteError(f"server: {err['message']} ({code}, HTTP {status})", hint)
    body = " ".join(response.text.split())[:200] or response.reason_phrase
    return RemoteError(f"server answered HTTP {status} to {response.request.method} {response.request.url.path}: {body}",
                       _STATUS_HINTS.get(status, "Check the server's log."))


