"""The LSP framing reader (codegen_ls.lsp.framing): every well-framed message comes out, in order,
whatever garbage, bad headers and read boundaries come between; nothing unbounded is buffered."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from codegen_ls.lsp.framing import MAX_HEADER, Body, Framer, Problem


def frame(body: bytes, name: bytes = b"Content-Length", extra: bytes = b"") -> bytes:
    return extra + name + b": %d\r\n\r\n" % len(body) + body


def run(stream: bytes, cuts: list[int] | None = None, framer: Framer | None = None) -> list[Body | Problem]:
    framer = framer or Framer()
    events: list[Body | Problem] = []
    last = 0
    for cut in sorted(set(cuts or [])) + [len(stream)]:
        events += framer.feed(stream[last:cut])
        last = cut
    return events


def bodies(events: list[Body | Problem]) -> list[bytes]:
    return [e.data for e in events if isinstance(e, Body)]


def problems(events: list[Body | Problem]) -> list[Problem]:
    return [e for e in events if isinstance(e, Problem)]


GOOD = [
    json.dumps({"jsonrpc": "2.0", "id": i, "method": "m", "params": {"text": "é\n" * i}}).encode() for i in range(4)
]


def test_headers_are_case_insensitive_and_other_headers_ignored() -> None:
    stream = (
        frame(GOOD[0], b"content-length")
        + frame(GOOD[1], b"CONTENT-LENGTH")
        + frame(GOOD[2], extra=b"Content-Type: application/vscode-jsonrpc; charset=utf-8\r\n")
        + b"Content-Length:%d\r\n\r\n" % len(GOOD[3])
        + GOOD[3]
    )
    assert bodies(run(stream)) == GOOD[:4]


def test_bad_lengths_and_missing_headers_resynchronise() -> None:
    body = GOOD[1]
    cases = {
        "too short": b"Content-Length: %d\r\n\r\n" % (len(body) - 5) + body,
        "too long": b"Content-Length: %d\r\n\r\n" % (len(body) + 50) + body,
        "negative": b"Content-Length: -5\r\n\r\n" + body,
        "not a number": b"Content-Length: abc\r\n\r\n" + body,
        "missing header": body,
        "no Content-Length": b"Content-Type: x\r\n\r\n" + body,
        "junk glued to the next header": b"Content-Length:0\n!",  # '!Content-Length' is a valid field name
        "an HTTP POST": b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body,
    }
    for name, bad in cases.items():
        events = run(frame(GOOD[0]) + bad + frame(GOOD[2]) + frame(GOOD[3]))
        got = bodies(events)
        assert got[0] == GOOD[0] and got[-2:] == [GOOD[2], GOOD[3]], (name, events)
        assert all(b in GOOD or json_fails(b) for b in got), name  # anything else is not JSON: answered -32700
        assert problems(events) or len(got) > 3, name


def json_fails(body: bytes) -> bool:
    try:
        json.loads(body)
    except ValueError:
        return True
    return False


def test_too_long_claim_on_a_valid_body_still_delivers_it() -> None:
    stream = b"Content-Length: %d\r\n\r\n" % (len(GOOD[1]) + 500) + GOOD[1] + frame(GOOD[2])
    assert bodies(run(stream)) == [GOOD[1], GOOD[2]]


def test_huge_length_is_refused_with_its_id_and_never_buffered() -> None:
    framer = Framer(max_body=1000)
    head = b'Content-Length: 100000000000000\r\n\r\n{"jsonrpc": "2.0", "id": 77, "method": "x", "params": "'
    events = framer.feed(head)
    assert problems(events) == [Problem("a message of 100000000000000 bytes is over the limit of 1000", 77)]
    for _ in range(50):  # 5 MB of the body streams by: dropped, not kept
        assert framer.feed(b"a" * 100_000) == []
        assert len(framer._buf) < 1000
    assert bodies(framer.feed(b'"}' + frame(GOOD[0]))) == [GOOD[0]]


def test_endless_garbage_is_reported_once_and_not_kept() -> None:
    framer = Framer()
    events = []
    for _ in range(100):
        events += framer.feed(b"x" * (MAX_HEADER // 2) + b"\r\n")
        assert len(framer._buf) <= MAX_HEADER + 100
    assert len(problems(events)) == 1
    assert bodies(framer.feed(frame(GOOD[0]))) == [GOOD[0]]


GARBAGE = st.lists(
    st.sampled_from([b"x", b"{", b"}", b'"', b":", b" ", b"\r\n", b"\n", b"\r", b"a: b", b"1", b"\xff"]), max_size=30
).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(garbage=st.lists(GARBAGE, min_size=4, max_size=4), cuts=st.lists(st.integers(0, 2000), max_size=12))
def test_every_framed_message_survives_garbage_and_any_read_boundaries(garbage: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(g + frame(m) for g, m in zip(garbage, GOOD))
    got = bodies(run(stream, cuts))
    assert [b for b in got if b in GOOD] == GOOD, (garbage, got)


HEADER_JUNK = st.lists(
    st.sampled_from(
        [b"Content-Length: ", b"content-length:", b"Content-Type: x", b"0", b"7", b"99999999999999", b"\r\n", b"\n"]
        + [b"\r\n\r\n", b"{", b"!", GOOD[1]]
    ),
    max_size=6,
).map(b"".join)


@settings(max_examples=1000, deadline=None)
@given(junk=HEADER_JUNK, cuts=st.lists(st.integers(0, 200), max_size=6))
def test_header_shaped_junk_never_swallows_the_next_message(junk: bytes, cuts: list[int]) -> None:
    """Broken header blocks (a zero length with bytes after it, a header without its blank line, a
    header line glued to other bytes) never take the next well-framed message with them."""
    assert GOOD[2] in bodies(run(junk + frame(GOOD[2]), cuts)), junk


def test_a_short_junk_body_waits_for_a_header_line_it_may_hold() -> None:
    """A junk header claims fewer bytes than come before the next message, and a read boundary
    falls inside that message's header line: the body must not take the line's start with it."""
    for junk in (b"Content-Length:  7\n\n", b"CONTENT-LENGTH:\t7\r\n\r\n0} }\r\n", b"Content-Length: 7\r\n\r\n{12x"):
        stream = junk + frame(GOOD[2]) + frame(GOOD[3])
        events = run(stream, cuts=list(range(len(stream))))  # byte by byte
        assert bodies(events)[-2:] == [GOOD[2], GOOD[3]], (junk, events)
