"""Domain errors of the fleet server and the HTTP status and code each one maps to.

Services raise these (never ``HTTPException``); ``fleet_server.app`` has the one handler that
turns any ``EdgekitError`` into ``{"error": {"code", "message", "hint"}}``. They extend the
edgekit tree under ``RemoteError`` so a CLI that meets one prints it like any other error.
"""

from __future__ import annotations

from edgekit.errors import BundleError, EdgekitError, ModelLoadError, ProfileError, RemoteError

__all__ = [
    "ArtifactDamaged",
    "BadRequest",
    "Conflict",
    "FleetError",
    "Forbidden",
    "InvalidRequest",
    "NotFound",
    "RangeNotSatisfiable",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "http_status",
]


class FleetError(RemoteError):
    """An error the fleet server answers with; ``status`` and ``code`` go on the wire."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, hint: str | None = None, *, code: str | None = None) -> None:
        super().__init__(message, hint)
        if code:
            self.code = code


class BadRequest(FleetError):
    """A request that parses but is wrong (bad bundle, no matching devices...)."""

    status = 400
    code = "bad_request"
    default_hint = "Fix the request; the server changed nothing."


class Unauthorized(FleetError):
    """No token, or a token the server does not know."""

    status = 401
    code = "unauthorized"
    default_hint = "Send 'Authorization: Bearer <token>' with a token from 'edgekit server token create' or enrollment."


class Forbidden(FleetError):
    """A valid token that may not do this."""

    status = 403
    code = "forbidden"
    default_hint = "Use a token of the right scope; a device token only reaches its own device."


class NotFound(FleetError):
    """An unknown model, version, rollout, device or artifact."""

    status = 404
    code = "not_found"
    default_hint = "Check the name or id."


class Conflict(FleetError):
    """The thing exists already, or its state forbids the action."""

    status = 409
    code = "conflict"
    default_hint = "Nothing was changed."


class TooLarge(FleetError):
    """An upload over the size limit."""

    status = 413
    code = "too_large"
    default_hint = "Raise EDGEKIT_MAX_UPLOAD_MB on the server, or upload fewer bundles at once."


class RangeNotSatisfiable(FleetError):
    """A Range header outside the artifact."""

    status = 416
    code = "range_not_satisfiable"
    default_hint = "Ask for a range inside the artifact's size."


class ArtifactDamaged(FleetError):
    """The server's stored copy of an artifact is not the size its database row says (truncated or replaced on disk).

    410, not 5xx: devices treat 5xx as "retry later", but this copy will not heal by waiting, and a
    device should fail the download now (``download_failed``) so the rollout's gates see it.
    """

    status = 410
    code = "artifact_damaged"
    default_hint = "The server's copy of this artifact is damaged; an operator must restore it from a backup or upload it again."


class InvalidRequest(FleetError):
    """Malformed JSON or a schema violation."""

    status = 422
    code = "invalid_request"
    default_hint = "See GET /openapi.json for the request's schema."


class Unavailable(FleetError):
    """The server cannot take this request now (e.g. its telemetry write queue is full); answered with ``Retry-After``."""

    status = 503
    code = "unavailable"
    default_hint = "Try again later; nothing was stored."

    def __init__(self, message: str, hint: str | None = None, *, retry_after_s: int = 5) -> None:
        super().__init__(message, hint)
        self.retry_after_s = retry_after_s


def http_status(error: EdgekitError) -> tuple[int, str]:
    """The (status, code) an error is answered with."""
    if isinstance(error, FleetError):
        return error.status, error.code
    if isinstance(error, ModelLoadError):
        return 400, "model_load_failed"
    if isinstance(error, BundleError):
        return 400, "bad_bundle"
    if isinstance(error, ProfileError):
        return 400, "unknown_profile"
    return 500, "internal_error"
