"""Streaming ``multipart/form-data`` for bundle uploads: parts go straight to files in a staging
directory and the byte count is checked as the body arrives, so an upload is never held in
memory and one over the limit is refused (413) without being stored."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from fleet_server.errors import InvalidRequest, TooLarge

__all__ = ["ReceivedUpload", "receive_upload"]

MAX_PARTS = 64
MAX_FIELD_BYTES = 1024
_DRAIN_EXTRA = 64 << 20  # read (and drop) this much past the limit so the client sees the 413


@dataclass
class ReceivedUpload:
    """The form fields and the files (original name, staged path) of one upload."""

    fields: dict[str, str] = field(default_factory=dict)
    files: list[tuple[str, Path]] = field(default_factory=list)


class _Collector:
    def __init__(self, staging: Path) -> None:
        self.staging = staging
        self.upload = ReceivedUpload()
        self.parts = 0
        self._headers: dict[bytes, bytes] = {}
        self._hname = b""
        self._hvalue = b""
        self._name: str | None = None
        self._filename: str | None = None
        self._file: IO[bytes] | None = None
        self._field = bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._begin, "on_header_field": self._hf, "on_header_value": self._hv, "on_header_end": self._hend,
            "on_headers_finished": self._headers_done, "on_part_data": self._data, "on_part_end": self._end,
        }

    def _begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise InvalidRequest(f"more than {MAX_PARTS} parts in the upload", "Upload fewer bundles at once.")
        self._headers, self._hname, self._hvalue = {}, b"", b""

    def _hf(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def _hv(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def _hend(self) -> None:
        self._headers[self._hname.lower()] = self._hvalue
        self._hname, self._hvalue = b"", b""

    def _headers_done(self) -> None:
        _, opts = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = opts.get(b"name", b"").decode("utf-8", "replace")
        filename = opts.get(b"filename")
        self._filename = None if filename is None else filename.decode("utf-8", "replace")
        self._field = bytearray()
        if self._name == "bundles":
            if self._filename is None:
                raise InvalidRequest("the 'bundles' part has no filename", "Send each bundle as a file part named 'bundles'.")
            safe = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(self._filename))[:100] or "bundle.ekb"
            path = self.staging / f"{len(self.upload.files):03d}-{safe}"
            self._file = open(path, "wb")
            self.upload.files.append((os.path.basename(self._filename) or safe, path))
        elif self._name == "version":
            self._file = None
        else:
            raise InvalidRequest(f"unexpected form field {self._name!r}", "Send 'version' (optional) and one or more 'bundles' files.")

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self._file.write(data[start:end])
        else:
            self._field += data[start:end]
            if len(self._field) > MAX_FIELD_BYTES:
                raise InvalidRequest(f"form field {self._name!r} is too long", "Versions are at most 64 characters.")

    def _end(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        elif self._name == "version":
            try:
                self.upload.fields["version"] = self._field.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise InvalidRequest("the 'version' field is not UTF-8 text", "Send the version as plain text.") from None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


async def _drain(stream: AsyncIterator[bytes], budget: int) -> None:
    """Read and drop the rest of the body (up to ``budget``) so the client gets to read the answer."""
    try:
        async for chunk in stream:
            budget -= len(chunk)
            if budget < 0:
                return
    except ClientDisconnect:
        return


async def receive_upload(request: Request, staging: Path, max_bytes: int) -> ReceivedUpload:
    """Parse the request body into ``staging``; TooLarge past ``max_bytes``, InvalidRequest when malformed."""
    ctype, opts = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not opts.get(b"boundary"):
        raise InvalidRequest("an upload must be multipart/form-data", "Send the bundles as multipart file parts named 'bundles'.")
    length = request.headers.get("content-length")
    too_large = TooLarge(f"the upload is larger than the server's limit of {max_bytes} bytes")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        if int(length) <= max_bytes + _DRAIN_EXTRA:
            await _drain(request.stream(), _DRAIN_EXTRA + max_bytes)
        raise too_large
    collector = _Collector(staging)
    parser = MultipartParser(opts[b"boundary"], collector.callbacks())
    received = 0
    stream = request.stream()
    try:
        async for chunk in stream:
            received += len(chunk)
            if received > max_bytes:
                await _drain(stream, _DRAIN_EXTRA)
                raise too_large
            parser.write(chunk)
        parser.finalize()
    except FormParserError as e:
        raise InvalidRequest(f"malformed multipart body ({e})", "Send a well-formed multipart/form-data request.") from None
    except ClientDisconnect:
        raise InvalidRequest("the client disconnected during the upload", "Retry the upload.") from None
    finally:
        collector.close()
    return collector.upload
