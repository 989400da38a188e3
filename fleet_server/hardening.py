"""No 500 from input: bounds that hold before a request reaches Python's recursion or int limits,
and HTTP hygiene around errors (docs/security.md, docs/protocol.md "Limits").

- :class:`JsonShapeMiddleware`: a JSON body nested deeper than :data:`MAX_JSON_DEPTH` or holding a
  number literal longer than :data:`MAX_NUMBER_CHARS` is 422 before any parser or route sees it (a
  500-level nesting was a ``RecursionError``; a 4,301-digit integer passes ``int``'s string limit).
- :class:`ConnectionCloseOn5xx`: every 5xx carries ``Connection: close``, so a client never reuses a
  keep-alive connection the server is about to drop.
- :data:`IsoDateTime`: a query date-time that must be ISO 8601 text (``since=0.5`` is not a date).

The checks run in C (``bytes.translate``, substring search, regular expressions): a 1,000-point
telemetry post (238 KB) costs 2.2 ms, about what ``json.loads`` takes on it (measured on x86-64,
Python 3.11); a device's small posts cost microseconds.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Annotated

from pydantic import BeforeValidator

from fleet_server.limits import read_body, replaying

__all__ = ["MAX_JSON_DEPTH", "MAX_NUMBER_CHARS", "ConnectionCloseOn5xx", "IsoDateTime", "JsonShapeMiddleware", "json_shape_problem"]

MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays/objects in a request body (the protocol's deepest shape is 4)."""
MAX_NUMBER_CHARS = 40
"""Longest run of digits in a number of a request body (2^63-1 has 19; a float's repr at most 17 significant)."""

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # a JSON string, escapes included (unrolled: no backtracking)
_INNERMOST = re.compile(rb"[\[{][\]}]")
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))
_DIGIT_MAP = bytes(49 if 48 <= c <= 57 else 48 for c in range(256))  # digits -> b"1", anything else -> b"0"
_LONG_RUN = b"1" * (MAX_NUMBER_CHARS + 1)
_JSON_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def _outside_strings(body: bytes) -> bytes:
    """``body`` with every JSON string emptied (so a bracket or digits inside a string count for nothing)."""
    if b"\\" not in body:  # no escapes: strings are exactly the spans between quote pairs
        return b'""'.join(body.split(b'"')[::2])
    return _STRING.sub(b'""', body)


def json_shape_problem(body: bytes) -> str | None:
    """Why ``body`` is refused (too deep, a too-long run of digits), or None.

    Cheap tests on the raw bytes first (a translate and a substring search, no Python loop over the
    body); strings are blanked only when the raw bytes could break a bound. The depth is the number
    of passes that each delete the innermost bracket pairs, stopped past the bound.
    """
    if _LONG_RUN in body.translate(_DIGIT_MAP) and _LONG_RUN in _outside_strings(body).translate(_DIGIT_MAP):
        return f"a number in the body is longer than {MAX_NUMBER_CHARS} digits"
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:  # too few openings anywhere to nest deeper
        return None
    return None if _depth_ok(_outside_brackets(body)) else f"the body is nested deeper than {MAX_JSON_DEPTH} levels"


def _outside_brackets(body: bytes) -> bytes:
    return _outside_strings(body).translate(None, _NOT_BRACKETS)


def _depth_ok(brackets: bytes) -> bool:
    for _ in range(MAX_JSON_DEPTH):
        if not brackets:
            return True
        brackets = _INNERMOST.sub(b"", brackets)
    return not brackets


async def _json_error(send, status: int, code: str, message: str, hint: str) -> None:  # noqa: ANN001
    body = json.dumps({"error": {"code": code, "message": message, "hint": hint}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class JsonShapeMiddleware:
    """422 for a JSON request body too deep or with a too-long number (runs inside the body-size limit)."""

    def __init__(self, app) -> None:  # noqa: ANN001 - ASGI app
        self.app = app

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http" or scope["method"] not in _JSON_METHODS:
            await self.app(scope, receive, send)
            return
        ctype = next((v for k, v in scope["headers"] if k == b"content-type"), b"").split(b";")[0].strip().lower()
        if ctype != b"application/json" and not ctype.endswith(b"+json"):
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)  # the body-size middleware outside this one has bounded it already
        if body is None:
            return
        problem = json_shape_problem(body)
        if problem is not None:
            await _json_error(send, 422, "invalid_request", problem, "See GET /openapi.json and docs/protocol.md (Limits) for the shapes.")
            return
        await self.app(scope, replaying(body, receive), send)


class ConnectionCloseOn5xx:
    """Add ``Connection: close`` to every 5xx answer (uvicorn then closes the connection after it)."""

    def __init__(self, app) -> None:  # noqa: ANN001 - ASGI app
        self.app = app

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_closing(message) -> None:  # noqa: ANN001
            if message["type"] == "http.response.start" and message["status"] >= 500:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_closing)


_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?)?(Z|[+-]\d{2}:?\d{2})?$")


def _iso_only(value: object) -> object:
    if isinstance(value, str) and not _ISO_DATE.fullmatch(value.strip()):
        raise ValueError("expected an ISO 8601 date-time such as 2026-12-01T12:00:00Z")
    return value


IsoDateTime = Annotated[dt.datetime, BeforeValidator(_iso_only)]
"""A date-time given as ISO 8601 text only (pydantic would also take a number of seconds)."""


def allowed_methods(app, path: str) -> str:  # noqa: ANN001 - a FastAPI app
    """The ``Allow`` value for ``path``: the methods its OpenAPI path item documents (HEAD with GET).

    A literal path wins over templates, as in the router: ``/v1/devices/enroll`` allows ``POST``, not
    the ``GET`` of ``/v1/devices/{device_id}`` (Starlette's own 405 named only the first partial match).
    """
    paths = app.openapi().get("paths", {})
    item = paths.get(path)
    if item is None:
        for template, candidate in paths.items():
            if "{" in template and re.fullmatch(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)), path):
                item = candidate
                break
    methods = {m.upper() for m in (item or {}) if m in ("get", "post", "put", "patch", "delete")}
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


_NO_NUL = "^[^\\u0000]*$"
LIMITS_TEXT = (f"\n\nLimits every route enforces: a JSON body nests at most {MAX_JSON_DEPTH} levels and holds no number of more "
               f"than {MAX_NUMBER_CHARS} digits (422); no NUL character in a path (404) or query string (422); a "
               "Range number has at most 19 digits (416); date-time query values are ISO 8601 text.")


def _string_without_nul(schema: dict) -> None:
    for sub in schema.get("anyOf", []):
        _string_without_nul(sub)
    if schema.get("type") == "string" and not ({"pattern", "enum", "const", "format"} & set(schema)):
        schema["pattern"] = _NO_NUL


def document_limits(app, *, max_json_bytes: int | None = None, max_upload_bytes: int | None = None) -> None:  # noqa: ANN001
    """State the limits above in the app's OpenAPI: the description (with this server's body sizes), and a
    no-NUL pattern on every free string parameter."""
    from fleet_server.uploads import MAX_PARTS

    sizes = ""
    if max_json_bytes is not None and max_upload_bytes is not None:
        sizes = (f" A JSON body is at most {max_json_bytes:,} bytes and an upload at most {max_upload_bytes:,} bytes (413);"
                 f" a multipart upload has at most {MAX_PARTS} parts.")
    original = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        for item in schema.get("paths", {}).values():
            for op in item.values():
                for param in (op.get("parameters") or []) if isinstance(op, dict) else []:
                    _string_without_nul(param.get("schema") or {})
        schema.setdefault("info", {})["description"] = schema.get("info", {}).get("description", "") + LIMITS_TEXT + sizes
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
