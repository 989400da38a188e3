"""Request dependencies as named ``Annotated`` aliases: the app context and the caller's scope.

Auth dependencies are ``async``: a cached token costs no thread hop; a miss reads the
tokens table (unique index on the hash) with one statement: on SQLite on the event loop (through the
loop's own connection, as the desired-state read), on PostgreSQL in the threadpool.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from fleet_server.context import AppContext
from fleet_server.errors import Forbidden, Unauthorized
from fleet_server.tokens import Principal, hash_token

__all__ = ["AdminDep", "AnyPrincipalDep", "CtxDep", "DeviceDep", "EnrollDep"]


async def get_ctx(request: Request) -> AppContext:
    """The app's shared context (async: a sync dependency would cost a threadpool hop)."""
    return request.app.state.ctx


async def _principal(request: Request) -> Principal:
    header = request.headers.get("authorization")
    if not header:
        raise Unauthorized("no token: this route needs 'Authorization: Bearer <token>'")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 200:
        raise Unauthorized("malformed Authorization header; expected 'Bearer <token>'")
    ctx: AppContext = request.app.state.ctx
    principal = ctx.tokens.get(hash_token(token))
    if principal is None:
        if ctx.db.dialect == "sqlite":  # a WAL read never waits for a lock: on the loop, as the desired-state read
            principal = ctx.tokens.lookup(ctx.db.connect_on_loop, token)
        else:
            principal = await run_in_threadpool(ctx.tokens.lookup, ctx.db.connect, token)
    if principal is None:
        raise Unauthorized("unknown token")
    request.state.principal = principal  # the audit log's "who" (fleet_server.audit)
    return principal


def _scope(*allowed: str):  # noqa: ANN202 - returns a dependency
    async def check(request: Request) -> Principal:
        principal = await _principal(request)
        if principal.scope not in allowed:
            raise Forbidden(f"a token of scope '{principal.scope}' may not call this route (needs {' or '.join(allowed)})")
        return principal

    return check


async def _device_id(principal: Annotated[Principal, Depends(_scope("device"))]) -> str:
    assert principal.device_id is not None
    return principal.device_id


CtxDep = Annotated[AppContext, Depends(get_ctx)]
AdminDep = Annotated[Principal, Depends(_scope("admin"))]
EnrollDep = Annotated[Principal, Depends(_scope("enroll"))]
DeviceDep = Annotated[str, Depends(_device_id)]
AnyPrincipalDep = Annotated[Principal, Depends(_scope("admin", "device"))]
