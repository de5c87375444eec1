"""LSP base-protocol framing that survives bad input: ``Content-Length`` header blocks in, bodies out.

pygls 2.1's read loop (``pygls.io_.run_async``) matches ``Content-Length: N\\r\\n`` byte for byte
(case, one space), and after one header it cannot read it loses its place: every later message
is skipped and nothing is logged (a deaf server); it also reads whatever length a header claims
(``Content-Length: 100000000000000`` ends the process). :class:`Framer` instead

* matches header names case-insensitively and ignores headers other than ``Content-Length``;
* takes at most :data:`MAX_BODY` bytes a message: a longer one is dropped as it streams in (never
  buffered) and reported, with its ``id`` when its first bytes name one;
* resynchronises at the next ``Content-Length`` header after a header block it cannot read, and
  ends a body early where the next header starts inside it (a claimed length too long; a body
  whose end may hold the start of such a header line waits for the line's end). Such a
  header cannot occur inside a JSON text: it ends in a raw line break, which JSON strings never
  hold, so a valid message is never cut;
* drops a foreign header block whole (an HTTP request: ``POST / HTTP/1.1`` ...), with its body.

It does no I/O: :meth:`Framer.feed` takes bytes and returns :class:`Body` and :class:`Problem`
events, in order; the server's read loop (:mod:`codegen_ls.lsp.jsonrpc`) drives it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_BODY = 256 * 1024 * 1024  # bytes: a 5 MB document of non-ASCII text is ~30 MB as JSON escapes
MAX_HEADER = 8 * 1024  # bytes of a header block

# A Content-Length header at the start of a line, or glued to the end of a previous body; found
# by its line break first (memchr-fast; compact JSON has none), then the regex just before it.
_ANCHOR = re.compile(rb"content-length[ \t]*:[ \t]*\d+[ \t]*\r?\n\Z", re.I)
_ANCHOR_SPAN = 96  # bytes before a line break that can hold the header (kept when dropping bytes)
_BLANK = re.compile(rb"\r?\n\r?\n")


def _prefixes(*atoms: bytes) -> bytes:
    """A pattern matching every prefix of the sequence of ``atoms`` (at least the first)."""
    pattern = b""
    for atom in reversed(atoms):
        pattern = atom + (b"(?:" + pattern + b")?" if pattern else b"")
    return pattern


# the start of a Content-Length header line whose end is not read yet (a prefix of ``_ANCHOR``'s lines)
_HEADER_PREFIX = re.compile(
    _prefixes(*(bytes([c]) for c in b"content-length"), rb"[ \t]*", b":", rb"[ \t]*", rb"\d+", rb"[ \t]*", b"\r"), re.I
)
_FIELD = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+)[ \t]*:[ \t]*([^\r\n]*?)[ \t]*")
_HTTP = re.compile(rb"^[A-Z]+ \S+ HTTP/\d|^HTTP/\d")
_ID = re.compile(rb'"id"\s*:\s*(-?\d{1,15}|"(?:[^"\\]|\\.){0,200}")')


@dataclass(frozen=True)
class Body:
    """One message body, as the header framed it (not yet parsed: it may not be JSON)."""

    data: bytes


@dataclass(frozen=True)
class Problem:
    """Bytes that were not a message: ``message`` says why; ``msg_id`` when a dropped request's
    id could be read (so the client's request gets its answer)."""

    message: str
    msg_id: int | str | None = None


Event = Body | Problem


class Framer:
    """Split a byte stream into LSP message bodies; never stuck, never unbounded."""

    def __init__(self, max_body: int = MAX_BODY) -> None:
        self.max_body = max_body
        self._buf = bytearray()
        self._need: int | None = None  # in a body: its length
        self._skip = 0  # in an over-long body: bytes still to drop
        self._scanned = 0  # body bytes already searched for a header
        self._garbage = False  # inside a run of unframed bytes (reported once)

    def feed(self, data: bytes) -> list[Event]:
        self._buf += data
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    # -- states ------------------------------------------------------------------------------------
    def _step(self, events: list[Event]) -> bool:
        """One transition; False when more bytes are needed."""
        if self._skip:
            return self._skip_body()
        if self._need is not None:
            return self._body(events)
        return self._header(events)

    def _header(self, events: list[Event]) -> bool:
        buf = self._buf
        start = 0
        while start < len(buf) and buf[start] in b"\r\n":  # blank lines between messages
            start += 1
        del buf[:start]
        if not buf:
            return False
        end = _BLANK.search(buf, 0, MAX_HEADER + 4)
        if end is None:  # no whole header block yet: wait, unless its first line is no header
            eol = buf.find(b"\n", 0, MAX_HEADER)
            first = bytes(buf[:eol]).rstrip(b"\r") if eol >= 0 else None
            if first is not None and not _FIELD.fullmatch(first) and not _HTTP.match(first):
                return self._resync(events, f"not a header: {first[:40]!r}", 1)
            if len(buf) <= MAX_HEADER:
                return False
            return self._resync(events, f"a header block over {MAX_HEADER} bytes", 1)
        glued = _glued_anchor(buf, end.end())
        if glued is not None:  # a header glued to bytes before it inside the block: a message starts there
            return self._resync(events, f"not a header: {bytes(buf[: min(glued, 40)])!r}", glued)
        block = bytes(buf[: end.start()])
        if _HTTP.match(block):  # a foreign protocol's request: drop its header block whole
            return self._resync(events, "an HTTP request, not LSP", end.end())
        length, why = _content_length(block)
        if why:
            return self._resync(events, why, 1)
        del buf[: end.end()]
        self._garbage = False
        if length > self.max_body:
            found = _ID.search(bytes(buf[:4096]))
            events.append(
                Problem(
                    f"a message of {length} bytes is over the limit of {self.max_body}",
                    _parse_id(found.group(1)) if found else None,
                )
            )
            self._skip = length
            return True
        self._need, self._scanned = length, 0
        return True

    def _body(self, events: list[Event]) -> bool:
        assert self._need is not None
        buf = self._buf
        window = min(len(buf), self._need)
        found = _find_anchor(buf, max(0, self._scanned - _ANCHOR_SPAN), window + _ANCHOR_SPAN) if window else None
        if found is not None and found.start() < window:  # the next header starts inside: cut there
            cut = found.start()
        elif len(buf) >= self._need and not _header_may_start(buf, window):
            cut = self._need
        else:
            self._scanned = len(buf)
            return False
        with memoryview(buf) as view:  # one copy of a large body, not two
            events.append(Body(bytes(view[:cut])))
        del buf[:cut]
        self._need = None
        return True

    def _skip_body(self) -> bool:
        """Drop an over-long body as it arrives, up to its length or the next header."""
        buf = self._buf
        found = _find_anchor(buf, 0, self._skip + _ANCHOR_SPAN)
        if found is not None and found.start() < self._skip:
            del buf[: found.start()]
            self._skip = 0
            return True
        if len(buf) >= self._skip:
            del buf[: self._skip]
            self._skip = 0
            return True
        drop = max(0, len(buf) - _ANCHOR_SPAN)  # keep what may be the start of the next header
        del buf[:drop]
        self._skip -= drop
        return False

    def _resync(self, events: list[Event], why: str, after: int) -> bool:
        """Report unframed bytes (once a run) and drop them up to the next header after ``after``."""
        if not self._garbage:
            events.append(Problem(why))
            self._garbage = True
        buf = self._buf
        found = _find_anchor(buf, min(after, len(buf)))
        if found is not None:
            del buf[: found.start()]
            return True
        del buf[: max(min(after, len(buf)), len(buf) - _ANCHOR_SPAN)]
        return False


def _find_anchor(buf: bytearray, start: int, end: int | None = None) -> re.Match[bytes] | None:
    """The first ``Content-Length: N`` header line in ``buf[start:end]``, or None."""
    end = len(buf) if end is None else min(end, len(buf))
    eol = buf.find(b"\n", start, end)
    while eol >= 0:
        last = eol - 1
        while last >= start and buf[last] in b" \t\r":
            last -= 1
        if last >= start and 0x30 <= buf[last] <= 0x39:  # the line ends in a number: try the header
            found = _ANCHOR.search(buf, max(start, eol + 1 - _ANCHOR_SPAN), eol + 1)
            if found is not None:
                return found
        eol = buf.find(b"\n", eol + 1, end)
    return None


def _header_may_start(buf: bytearray, window: int) -> bool:
    """Whether a ``Content-Length`` header may start inside ``buf[:window]`` and run on to the
    buffer's end, its line not complete yet (a claimed length too long, cut by a read boundary):
    then the body waits for the line, which decides. A JSON body's end (``}``) never looks so."""
    if len(buf) - window >= _ANCHOR_SPAN:
        return False
    lo = max(0, len(buf) - _ANCHOR_SPAN)
    start = max(buf.rfind(b"\n", lo) + 1, lo)
    for s in range(start, min(window, len(buf))):
        if buf[s] in b"cC" and _HEADER_PREFIX.fullmatch(bytes(buf[s:])):
            return True
    return False


def _glued_anchor(buf: bytearray, end: int) -> int | None:
    """Where a ``Content-Length: N`` header glued to other bytes (not at a line start) begins in
    ``buf[1:end]``: junk (a zero-length body's trailing bytes, a cut body) ran into the next message."""
    start = 1
    while (found := _find_anchor(buf, start, end)) is not None:
        if buf[found.start() - 1] != 0x0A:
            return found.start()
        start = found.end()
    return None


def _content_length(block: bytes) -> tuple[int, str]:
    """(length, "") of a header block, or (0, why) when it is not a valid LSP header block."""
    length: int | None = None
    for line in block.replace(b"\r\n", b"\n").split(b"\n"):
        field = _FIELD.fullmatch(line)
        if field is None:
            return 0, f"not a header: {line[:40]!r}"
        if field.group(1).lower() == b"content-length":
            value = field.group(2)
            if not value.isdigit() or len(value) > 18:
                return 0, f"invalid Content-Length: {value[:40]!r}"
            if length is not None and int(value) != length:
                return 0, "two different Content-Length headers"
            length = int(value)
    if length is None:
        return 0, "a header block without Content-Length"
    return length, ""


def _parse_id(raw: bytes) -> int | str | None:
    if raw.startswith(b'"'):
        try:
            return raw[1:-1].decode("utf-8")
        except UnicodeDecodeError:
            return None
    return int(raw)
