"""A cap on JSON request bodies (uploads have their own streaming limit): FastAPI reads a JSON body
whole, so without this one request could hold gigabytes of memory."""

from __future__ import annotations

import json
import re

__all__ = ["BodyLimitMiddleware", "NulMiddleware", "read_body", "replaying"]

_UPLOAD = re.compile(r"^/v1/models/[^/]+/versions$")


async def read_body(receive, max_bytes: int | None = None) -> bytes | None:  # noqa: ANN001 - ASGI receive
    """The whole request body; None if the client went away, or if it passed ``max_bytes`` (then the rest is unread)."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if max_bytes is not None and size > max_bytes:
            return None
        more = message.get("more_body", False)
    return b"".join(chunks)


def replaying(body: bytes, receive):  # noqa: ANN001, ANN201 - ASGI receive
    """An ASGI ``receive`` that hands the app ``body`` once, then defers to the real one (for disconnects)."""
    sent = False

    async def replay():  # noqa: ANN202
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class BodyLimitMiddleware:
    """413 for a non-upload request body over ``max_bytes`` (by Content-Length, or counted as it arrives)."""

    def __init__(self, app, max_bytes: int) -> None:  # noqa: ANN001 - ASGI app
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS") or _UPLOAD.match(scope["path"]):
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                await self._too_large(send)
                return
            await self.app(scope, receive, send)
            return
        # chunked: buffer up to the limit (the route would read it all anyway), then replay it
        state = {"disconnected": False}

        async def watching():  # noqa: ANN202 - tells a disconnect from a body over the limit
            message = await receive()
            state["disconnected"] = message["type"] == "http.disconnect"
            return message

        body = await read_body(watching, self.max_bytes)
        if body is None:
            if not state["disconnected"]:
                await self._too_large(send)
            return
        await self.app(scope, replaying(body, receive), send)

    async def _too_large(self, send) -> None:  # noqa: ANN001
        body = json.dumps({"error": {"code": "too_large", "message": f"request body over {self.max_bytes} bytes",
                                     "hint": "Send smaller batches (telemetry: at most 1,000 points)."}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class NulMiddleware:
    """A NUL character in the URL never reaches the database (PostgreSQL's text refuses them: a 500 otherwise).

    In the path → 404 (no model, device, rollout or artifact is named with one); in the query
    string → 422. JSON bodies are checked by the request schemas (``fleet_server.schemas``).
    """

    def __init__(self, app) -> None:  # noqa: ANN001 - ASGI app
        self.app = app

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] == "http":
            query = scope.get("query_string", b"").lower()
            if "\x00" in scope.get("path", ""):
                await _answer(send, 404, "not_found", "no such resource (a NUL character in the path)", "Check the name or id.")
                return
            if b"%00" in query or b"\x00" in query:
                await _answer(send, 422, "invalid_request", "a NUL character (%00) in the query string", "Remove the NUL character from the URL.")
                return
        await self.app(scope, receive, send)


async def _answer(send, status: int, code: str, message: str, hint: str) -> None:  # noqa: ANN001
    body = json.dumps({"error": {"code": code, "message": message, "hint": hint}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
