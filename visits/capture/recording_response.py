"""A visit's recording as an HTTP response with single byte-range support (RFC 9110 §14).

An HTML5 <audio> player seeks by asking for `Range: bytes=N-`; Django's FileResponse always
answers 200 with the whole file, so the player cannot seek (and Safari will not play at all).
Access control is the view's job: this module only shapes the response for a file the caller
has already decided the user may read.

What is and is not supported, deliberately:

- one range per request (`bytes=A-B`, `bytes=A-`, `bytes=-N`) gets 206 with only those bytes,
  read from disk in blocks, never the whole file in memory;
- a range that starts at or past the end (or `bytes=-0`) gets 416 with `Content-Range: bytes
  */SIZE`, so the client learns the size;
- a Range header that is malformed, uses another unit, or lists several ranges is ignored and
  the whole file is sent with 200 (RFC 9110 §14.2 lets a server ignore any Range header);
- `If-Range` present means 200 with the whole file: we send no ETag or Last-Modified, so the
  client cannot hold a validator of ours, and a validator that does not match means "ignore
  Range" (§13.1.5);
- HEAD gets the headers of the 200 answer and no body (§14.2 defines Range for GET only).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePath
from typing import IO, Any

from django.core.files import File
from django.http import FileResponse, HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.utils.http import content_disposition_header

# Explicit, because `mimetypes` differs between platforms for exactly these (.m4a, .flac,
# .opus, .webm are missing or odd on some) and a wrong type makes a browser refuse to play.
# Covers every extension `visits.services.RECORDING_EXTENSIONS` accepts.
AUDIO_CONTENT_TYPES = {
    ".mp3": "audio/mpeg",
    ".ogg": "audio/ogg",
    ".oga": "audio/ogg",
    ".opus": "audio/ogg",  # Opus recordings are stored in an Ogg container
    ".webm": "audio/webm",
    ".wav": "audio/wav",
    ".m4a": "audio/mp4",
    ".mp4": "audio/mp4",  # a recording, not a video: ask for the audio player
    ".flac": "audio/flac",
    ".aac": "audio/aac",
}
FALLBACK_CONTENT_TYPE = "application/octet-stream"

# Large enough to keep system calls few on a 500 MB file, small enough that many concurrent
# seeks cost little memory.
BLOCK_SIZE = 64 * 1024

# No file is anywhere near 10**18 bytes, so any longer number means the same as this one; it
# also keeps int() away from Python's limit on very long digit strings (ValueError past 4300).
_HUGE_POSITION = 10**18


@dataclass(frozen=True)
class _ByteRange:
    first: int
    last: int  # inclusive, as in Content-Range

    @property
    def length(self) -> int:
        return self.last - self.first + 1


class _Unsatisfiable(Exception):
    """A well-formed single range that selects no byte of the file: 416."""


def recording_response(request: HttpRequest, file: File, *, filename: str) -> HttpResponseBase:
    """The whole file (200), one byte range of it (206), or 416, as `request` asks.

    `file` is a FieldFile (or any django File) that need not be open; `filename` is the safe
    name shown to the browser (never the clinician's original file name, which may hold PHI).
    The file is opened only when bytes are actually sent, and closed by Django when the
    response is finished, whether or not it was read to the end.
    """
    size = file.size
    if request.method == "HEAD":
        # Headers only: nothing is opened, and a server that would iterate a body for HEAD
        # has none to read.
        head = HttpResponse(b"")
        head["Content-Length"] = str(size)
        return _with_common_headers(head, filename)

    try:
        byte_range = _requested_range(request, size)
    except _Unsatisfiable:
        refused = HttpResponse(b"", status=416)
        refused["Content-Range"] = f"bytes */{size}"
        return _with_common_headers(refused, filename)

    if byte_range is None:
        whole = FileResponse(file.open("rb"), content_type=_content_type(filename))
        return _with_common_headers(whole, filename)

    handle = file.open("rb")
    handle.seek(byte_range.first)
    partial = StreamingHttpResponse(
        _FileSlice(handle, byte_range.length), status=206, content_type=_content_type(filename)
    )
    partial["Content-Range"] = f"bytes {byte_range.first}-{byte_range.last}/{size}"
    partial["Content-Length"] = str(byte_range.length)
    return _with_common_headers(partial, filename)


def _requested_range(request: HttpRequest, size: int) -> _ByteRange | None:
    """The one range to send, or None for "send the whole file"; raises _Unsatisfiable."""
    header = request.headers.get("Range")
    if header is None or request.method != "GET":
        return None
    if "If-Range" in request.headers:
        # See the module docstring: no validator of ours can match, so Range is ignored.
        return None
    unit, equals, range_set = header.partition("=")
    if not equals or unit.strip().lower() != "bytes":  # units are case-insensitive (§14.1)
        return None
    # A list may carry empty elements (§5.6.1), so "bytes=0-99," is one range.
    specs = [spec.strip() for spec in range_set.split(",") if spec.strip()]
    if len(specs) != 1:
        # Several ranges would need a multipart/byteranges body, which audio players do not
        # ask for; the whole file is a correct answer to any Range request (§14.2).
        return None
    return _single_range(specs[0], size)


def _single_range(spec: str, size: int) -> _ByteRange | None:
    first_text, dash, last_text = spec.partition("-")
    if not dash or not (_is_digits(first_text) and _is_digits(last_text)):
        return None  # malformed: ignored
    if not first_text:  # suffix range: the last N bytes
        if not last_text:
            return None  # "bytes=-" names no range at all
        suffix = _position(last_text)
        if suffix == 0:
            raise _Unsatisfiable  # §14.1.1: a suffix range must be non-zero
        if size == 0:
            return None  # an empty file has no byte to name; send it (empty) whole
        return _ByteRange(first=max(size - suffix, 0), last=size - 1)
    first = _position(first_text)
    last = _position(last_text) if last_text else None
    if last is not None and last < first:
        return None  # §14.1.1: invalid, so ignored rather than refused
    if first >= size:
        raise _Unsatisfiable
    return _ByteRange(first=first, last=size - 1 if last is None else min(last, size - 1))


def _is_digits(text: str) -> bool:
    """Empty (an omitted position) or ASCII digits only."""
    # Only ASCII digits: str.isdigit() also accepts "²" and other Unicode digits int() rejects.
    return text == "" or (text.isascii() and text.isdigit())


def _position(digits: str) -> int:
    significant = digits.lstrip("0") or "0"
    return _HUGE_POSITION if len(significant) > 18 else int(significant)


def _content_type(filename: str) -> str:
    return AUDIO_CONTENT_TYPES.get(PurePath(filename).suffix.lower(), FALLBACK_CONTENT_TYPE)


def _with_common_headers(response: HttpResponseBase, filename: str) -> HttpResponseBase:
    response["Content-Type"] = _content_type(filename)
    # Tells the player seeking is possible; sent on every answer, 416 included.
    response["Accept-Ranges"] = "bytes"
    # A recording is PHI: no shared cache may keep it and no browser cache may write it down.
    response["Cache-Control"] = "private, no-store"
    disposition = content_disposition_header(as_attachment=False, filename=filename)
    assert disposition is not None  # only None for an inline response without a file name
    response["Content-Disposition"] = disposition
    # Served from our origin: the browser must not second-guess the type into something active.
    response["X-Content-Type-Options"] = "nosniff"
    return response


class _FileSlice:
    """`length` bytes of an open file from its current position, in blocks.

    An object rather than a generator because Django calls `close()` on streaming content
    when the response is finished; a generator that was never started would not run its
    `finally`, and the file would stay open until garbage collection.
    """

    def __init__(self, handle: IO[Any], length: int) -> None:
        self._handle = handle
        self._length = length

    def __iter__(self) -> Iterator[bytes]:
        remaining = self._length
        while remaining > 0:
            block = self._handle.read(min(BLOCK_SIZE, remaining))
            if not block:
                # The file shrank after its size was read (recordings are never rewritten,
                # so this is a fault); stop rather than loop. The server sees a short body.
                return
            remaining -= len(block)
            yield block

    def close(self) -> None:
        self._handle.close()
