"""The audit log: every admin action (a request with an admin token that changes something) is one row:
who (the token's name), what (method and route template, and the ids in the path), when, from where
(the client address), and the result (status and error code). A pure ASGI middleware writes it after the
response, in the threadpool, so no route can forget it and a failed action is recorded too.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.concurrency import run_in_threadpool

from fleet_server.db import utcnow
from fleet_server.tables import AuditEvent

__all__ = ["AuditMiddleware", "record"]

log = logging.getLogger("edgekit.fleet")
_READS = frozenset({"GET", "HEAD", "OPTIONS"})
_DEVICE_ROUTES = ("/v1/device/", "/v1/devices/enroll")


def record(ctx: Any, *, actor: str, token_id: int | None, action: str, target: str | None, remote: str | None, status: int,
           result: str, detail: dict[str, Any]) -> None:
    """Write one audit event (its own short transaction)."""
    with ctx.db.write() as s:
        s.add(AuditEvent(at=utcnow(), actor=actor[:64], token_id=token_id, action=action[:64], target=(target or None) and target[:200],
                         remote_addr=(remote or None) and remote[:64], status=status, result=result[:64], detail=detail))


class AuditMiddleware:
    """Records every non-read request to a non-device route before its response completes."""

    def __init__(self, app) -> None:  # noqa: ANN001 - ASGI app
        self.app = app

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http" or scope["method"] in _READS or scope["path"].startswith(_DEVICE_ROUTES):
            await self.app(scope, receive, send)
            return
        status = {"code": 500, "written": False}

        async def send_wrapper(message) -> None:  # noqa: ANN001
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body") and not status["written"]:
                # The event is recorded before the answer completes: a client that reads the log after
                # its action's answer always finds the action there.
                status["written"] = True
                await self._write(scope, status["code"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if not status["written"]:
                await self._write(scope, status["code"])

    async def _write(self, scope, status: int) -> None:  # noqa: ANN001
        app = scope.get("app")
        ctx = getattr(getattr(app, "state", None), "ctx", None)
        if ctx is None:
            return
        state = scope.get("state") or {}
        principal = state.get("principal")
        if principal is None or principal.scope != "admin":
            return  # only admin tokens act; a request without a valid one is refused and not recorded (no table fill by strangers)
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        params = scope.get("path_params") or {}
        client = scope.get("client")
        code = state.get("error_code")
        result = "ok" if status < 400 else (code or f"http_{status}")
        try:
            await run_in_threadpool(record, ctx, actor=principal.actor, token_id=principal.token_id,
                                    action=f"{scope['method']} {template}", target=",".join(f"{k}={v}" for k, v in params.items()) or None,
                                    remote=client[0] if client else None, status=status, result=result, detail=state.get("audit_detail") or {})
        except Exception:  # noqa: BLE001 - the action's answer is sent; a lost audit row is logged, never a 500 after the fact
            log.exception("could not write the audit event for %s %s", scope["method"], template)
