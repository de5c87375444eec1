"""LSP positions in a document's text: line terminators, offsets of (line, character), lone surrogates."""

from __future__ import annotations

import re

OFFSET_CHUNK = 1 << 16  # offset_of skips whole chunks of this many characters by counting terminators
EOL = re.compile(r"\r\n|\r|\n")  # LSP line terminators


def sanitize(text: str) -> str:
    """Replace lone surrogates (which cannot be encoded) with ``?``, one code point for one."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def normalize_eol(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def offset_of(text: str, line: int, character: int) -> tuple[int, int, int]:
    """(offset, line, character) of an LSP position, clamped into the document.

    Lines end at ``\\n``, ``\\r\\n`` or ``\\r`` (the LSP definition; ``str.splitlines`` also
    splits at form feeds and the like). O(position), but in C: whole chunks of ``OFFSET_CHUNK``
    characters are skipped by counting their terminators (``str.count``, no copies), and only the
    chunk holding the line start is walked line by line.
    """
    line = max(0, line)
    pos, n, size = 0, 0, len(text)  # pos: start of line n
    scan, hi = 0, size  # chunks are counted from ``scan``; the line-by-line walk stays before ``hi``
    while n < line and scan + OFFSET_CHUNK < size:
        end = scan + OFFSET_CHUNK
        if text[end - 1] == "\r" and text[end] == "\n":  # never split a CRLF
            end += 1
        k = text.count("\n", scan, end)
        if text.find("\r", scan, end) >= 0:  # (memchr: much cheaper than a count)
            k += text.count("\r", scan, end) - text.count("\r\n", scan, end)
        if n + k >= line:  # the line starts in this chunk
            hi = end
            break
        if k:
            n, pos = n + k, max(text.rfind("\n", scan, end), text.rfind("\r", scan, end)) + 1
        scan = end
    simple = n < line and text.find("\r", pos, hi) < 0
    while n < line:
        if simple:
            nl = text.find("\n", pos, hi)
            if nl < 0:
                break
            pos = nl + 1
        else:
            m = EOL.search(text, pos, hi)
            if m is None:
                break
            pos = m.end()
        n += 1
    # The character must lie on the line: a terminator before it (none searched beyond it) clamps it.
    lim = min(size, pos + max(0, character))
    nl = text.find("\n", pos, lim)
    cr = text.find("\r", pos, nl if nl >= 0 else lim)
    end = cr if cr >= 0 else nl if nl >= 0 else lim
    return end, n, end - pos


__all__ = ["EOL", "normalize_eol", "offset_of", "sanitize"]
