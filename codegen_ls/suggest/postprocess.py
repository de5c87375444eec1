"""Stop rules for the engine, and the trimming that turns raw candidates into insertable text.

Frames: a raw candidate continues some text. The engine's candidates continue the *prompt*,
which ends before :attr:`Context.held` (the whitespace typed on a fresh line); lookup candidates
continue the cursor. ``held_out`` is the text between the frame's start and the cursor (``ctx.held``
or ``""``); everything here takes it, so both kinds go through the same rules.

Stop rules (:func:`make_stop`, checked by the engine after every token):
  single  the first newline after the line has some content;
  multi   a line indented less than the block's first line (dedent), a blank line followed by
          top-level code, ``MAX_LINES`` lines; end-of-text stops everything (engine).

Trimming (:func:`clean`): cut an unfinished last line (multi-line, out of tokens), cut repeated
lines and trailing lines that repeat the document's next lines, fit the text to what follows the
cursor on the line (``foo(|)`` + ``a, b)`` inserts ``a, b``: the closing bracket appears once),
align the indentation with what the user typed, drop trailing whitespace, convert the indentation
to the document's style (tabs vs spaces) and line ends to the document's; drop what is empty,
whitespace or a copy of the following line(s).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from codegen_ls.kinds import FinishReason, Mode
from codegen_ls.suggest.context import Context
from codegen_ls.suggest.indent import Indent
from codegen_ls.suggest.mode import is_block_header

StopFn = Callable[[str], "int | None"]

MAX_LINES = 16  # content lines in a multi-line suggestion
OPENERS = "([{"
CLOSERS = {")": "(", "]": "[", "}": "{"}


def leading_ws(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


# -- stop rules ---------------------------------------------------------------------------------


def make_stop(ctx: Context, mode: str, held_out: str = "") -> StopFn:
    """The engine's stop callback for ``mode`` in the frame ending ``held_out`` before the cursor."""
    head = ctx.line_prefix[: len(ctx.line_prefix) - len(held_out)]
    if mode == "multi":
        return lambda text: stop_multi(head, text, ctx.indent)
    return lambda text: stop_single(head, text)


def stop_single(head: str, text: str) -> int | None:
    """Cut at the first newline that ends a line with content (leading blank lines go on)."""
    i, line_head = 0, head
    while True:
        j = text.find("\n", i)
        if j < 0:
            return None
        if (line_head + text[i:j]).strip():
            return j
        i, line_head = j + 1, ""


def stop_multi(head: str, text: str, indent: Indent) -> int | None:
    """Cut before a dedent below the block, before top-level code after a blank line, or at MAX_LINES."""
    full = head + text
    pos = 0
    parent: int | None = None  # indentation of the cursor line when it has content (opener line)
    base: int | None = None  # indentation of the block's first line
    last_end = 0  # end (in ``full``) of the last content line kept
    content = 0
    blank_since = False
    for idx, ln in enumerate(full.split("\n")):
        end = pos + len(ln)
        pos = end + 1
        if not ln.strip():
            blank_since = blank_since or (idx > 0 and content > 0)
            continue
        col = indent.columns(leading_ws(ln))
        if idx == 0 and head.strip():
            parent, last_end = col, end
            continue
        if base is None:
            if parent is not None and col <= parent:  # an opener line whose body is not indented
                return max(0, last_end - len(head))
            base = col
        elif col < base or (blank_since and col == 0) or content >= MAX_LINES:
            return max(0, last_end - len(head))
        content += 1
        last_end = end
        blank_since = False
    return None


# -- brackets -----------------------------------------------------------------------------------


@dataclass
class Brackets:
    """Bracket/quote state after scanning some code."""

    stack: list[str] = field(default_factory=list)  # unclosed openers
    unmatched: int = 0  # closers that matched nothing (or the wrong opener)
    quote: str = ""  # an open string's quote ('"', "'", '\"\"\"', "'''"), "" outside strings

    def key(self) -> tuple[int, tuple[str, ...], str]:
        return self.unmatched, tuple(self.stack), self.quote


def scan_brackets(text: str, state: Brackets | None = None, python: bool = True) -> Brackets:
    """Track brackets outside strings and comments (``#`` for Python, ``//`` otherwise)."""
    st = Brackets(list(state.stack), state.unmatched, state.quote) if state else Brackets()
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if st.quote:
            if ch == "\\":
                i += 2
                continue
            if text.startswith(st.quote, i):
                i += len(st.quote)
                st.quote = ""
                continue
            if ch == "\n" and len(st.quote) == 1:  # a one-line string cannot go on
                st.quote = ""
            i += 1
            continue
        if ch in "\"'":
            q = text[i : i + 3] if text[i : i + 3] in ('"""', "'''") else ch
            st.quote = q
            i += len(q)
            continue
        if (python and ch == "#") or (not python and text.startswith("//", i)):
            nl = text.find("\n", i)
            i = n if nl < 0 else nl
            continue
        if ch in OPENERS:
            st.stack.append(ch)
        elif ch in CLOSERS:
            if st.stack and st.stack[-1] == CLOSERS[ch]:
                st.stack.pop()
            else:
                st.unmatched += 1
        i += 1
    return st


MODEL_STEP = 4  # columns of one indentation level in what the models were trained on (PEP 8)


# -- trimming -----------------------------------------------------------------------------------


@dataclass
class Cleaned:
    text: str  # insert at the cursor (document's line ends and indentation style)
    kept_chars: int  # characters of the raw text the suggestion stands for (log-prob alignment)
    truncated: bool  # the raw text was cut short of what the model wrote (not counting stop rules)
    reindented: bool = False  # the model indented less than the user had typed; moved to the cursor


def fit_suffix(head: str, text: str, line_suffix: str, python: bool = True) -> tuple[str, int, bool]:
    """Make ``head + text + line_suffix`` keep the line's bracket/quote balance.

    Returns (text, overlap, cut): ``overlap`` characters at the end of ``text`` that the line
    suffix already has were removed (``a, b)`` before ``)``); ``cut`` says the text was cut where
    the suffix begins (``a, b) + 1`` before ``)`` gives ``a, b``). Unchanged when nothing fits.
    """
    suf = line_suffix.rstrip()
    if not suf.strip() or not text:
        return text, 0, False
    target = scan_brackets(head + line_suffix, python=python).key()
    for k in range(min(len(suf), len(text)), -1, -1):  # longest overlap first; 0: no overlap
        if k and not text.endswith(suf[:k]):
            continue
        if scan_brackets(head + text[: len(text) - k] + line_suffix, python=python).key() == target:
            return text[: len(text) - k], k, False
    first = suf.lstrip()[:1]
    for i in range(1, len(text)):
        if text.startswith(first, i) and text[:i].strip():
            cut = text[:i].rstrip(" \t")
            if scan_brackets(head + cut + line_suffix, python=python).key() == target:
                return cut, 0, True
    return text, 0, False


def _cut_repeated_lines(text: str) -> str:
    """Keep text up to the first line that repeats the line before it (a decoding loop)."""
    lines = text.split("\n")
    for i in range(1, len(lines)):
        if lines[i].strip() and lines[i].strip() == lines[i - 1].strip():
            return "\n".join(lines[:i])
    return text


def _nonblank(lines: list[str]) -> list[str]:
    return [ln.strip() for ln in lines if ln.strip()]


def _cut_duplicate_tail(text: str, next_lines: list[str]) -> str:
    """Drop the candidate's last lines when they are the document's next lines (closing lines)."""
    lines = text.rstrip().split("\n")
    following = _nonblank(next_lines)
    for m in range(min(len(lines), len(following)), 0, -1):
        tail = [ln.strip() for ln in lines[-m:]]
        if tail == following[:m]:
            return "\n".join(lines[:-m])
    return text


def _align_blank_line(text: str, typed: str, head_frame: str, indent: Indent) -> tuple[str, bool]:
    """Candidate for a cursor after whitespace only: place its first line at the cursor.

    ``head_frame + text`` is written from the start of the line; ``typed`` is the whitespace the
    user has before the cursor. Leading blank lines are dropped. When the model's indentation
    extends the typed one, the rest of it is kept; otherwise the first line goes at the cursor
    and the following lines keep their indentation relative to it. The flag says the latter.
    """
    full = head_frame + text
    while True:
        nl = full.find("\n")
        if nl < 0 or full[:nl].strip():
            break
        full = full[nl + 1 :]
    if full.startswith(typed):
        return full[len(typed) :], False
    ws = leading_ws(full)
    delta = indent.columns(typed) - indent.columns(ws)
    first, *rest = full[len(ws) :].split("\n")
    shifted = [
        indent.render(indent.columns(leading_ws(ln)) + delta) + ln.lstrip(" \t") if ln.strip() else ln for ln in rest
    ]
    return "\n".join([first, *shifted]), indent.columns(ws) < indent.columns(typed)


def _rescale_block(lines: list[str], parent: int, indent: Indent) -> list[str]:
    """``lines`` (from the line start: a block body after an opener indented ``parent``) with the
    model's indentation step turned into the document's width.

    The step is the first body line's indentation beyond ``parent``. When it is one level as the
    models learned it (PEP 8's 4 columns: the stdlib, and most code CodeGen saw), the document's
    width is another, and every deeper line is a whole number of steps in, each line gets as many
    of the document's levels. Any other step is the model's own choice and stays.
    """
    body = [(i, indent.columns(leading_ws(ln))) for i, ln in enumerate(lines) if ln.strip()]
    if not body or body[0][1] <= parent:
        return lines
    step = body[0][1] - parent
    if step != MODEL_STEP or step == indent.width or any(c > parent and (c - parent) % step for _, c in body):
        return lines
    out = list(lines)
    for i, c in body:
        if c > parent:
            out[i] = indent.render(parent + (c - parent) // step * indent.width) + lines[i].lstrip(" \t")
    return out


def _match_width(text: str, ctx: Context, head: str, language_id: str) -> tuple[str, str]:
    """A block suggestion after an opener line, re-indented to the document's width (see
    :func:`_rescale_block`): on the blank line below the opener, or at the opener's end.

    Returns (text, head) as :func:`clean` holds them: ``head + text`` is written from the line's
    start on a blank line (``head`` becomes "" when the first line moved).
    """
    if ctx.only_whitespace_before:  # the body starts on this line
        if not is_block_header(ctx.prev_line, language_id):
            return text, head
        lines = _rescale_block((head + text).split("\n"), ctx.indent.columns(leading_ws(ctx.prev_line)), ctx.indent)
        full = "\n".join(lines)
        return (full[len(head) :], head) if full.startswith(head) else (full, "")
    if "\n" not in text or not is_block_header(ctx.line_prefix + text.split("\n", 1)[0], language_id):
        return text, head
    first, *rest = text.split("\n")  # the cursor line is the opener
    return "\n".join([first, *_rescale_block(rest, ctx.indent.columns(leading_ws(ctx.line_prefix)), ctx.indent)]), head


def _restyle(text: str, indent: Indent) -> str:
    """Trailing whitespace off every line; indentation of lines 2.. in the document's style."""
    lines = [ln.rstrip() for ln in text.split("\n")]
    wrong = " " * indent.width if indent.use_tabs else "\t"
    for i in range(1, len(lines)):
        ws = leading_ws(lines[i])
        if wrong in ws:
            lines[i] = indent.render(indent.columns(ws)) + lines[i][len(ws) :]
    return "\n".join(lines).rstrip()


def clean(
    raw: str, ctx: Context, mode: str, held_out: str = "", finish_reason: str = "", language_id: str = "python"
) -> Cleaned | None:
    """The text to insert at the cursor for a raw candidate, or None when it is not worth showing."""
    python = language_id == "python"
    head = ctx.line_prefix[: len(ctx.line_prefix) - len(held_out)]
    text = raw.replace("\r\n", "\n").replace("\r", "\n")
    truncated = False
    stop = make_stop(ctx, mode, held_out)  # drafts from a lookup may not have been cut yet
    cut_at = stop(text)
    if cut_at is not None:
        text = text[:cut_at]
    if mode == "multi":
        if finish_reason in (FinishReason.LENGTH, FinishReason.DEADLINE):  # the last line is unfinished
            nl = text.rfind("\n")
            if nl > 0 and text[:nl].strip():
                text, truncated = text[:nl], True
        cut = _cut_duplicate_tail(_cut_repeated_lines(text), ctx.next_lines)
        if cut != text:
            text, truncated = cut, True
    overlap = 0
    if mode == Mode.SINGLE:
        text, overlap, was_cut = fit_suffix(head, text, ctx.line_suffix, python)
        truncated = truncated or was_cut
    kept = len(text) + overlap
    text = text.rstrip()
    reindented = False
    if mode == Mode.MULTI:  # the model's indentation step -> the document's width
        text, head = _match_width(text, ctx, head, language_id)
    if ctx.only_whitespace_before:  # cursor after whitespace only: align with what was typed
        text, reindented = _align_blank_line(text, ctx.line_prefix, head, ctx.indent)
    text = _restyle(text, ctx.indent)
    if not text.strip():
        return None
    if _repeats_following(ctx, text, mode):
        return None
    if ctx.eol != "\n":
        text = text.replace("\n", ctx.eol)
    return Cleaned(text, kept, truncated, reindented)


def _repeats_following(ctx: Context, text: str, mode: str) -> bool:
    """The suggestion only re-types the rest of the line or the next non-blank line(s)."""
    following = _nonblank(ctx.next_lines)
    if mode == Mode.SINGLE or "\n" not in text:
        line = (ctx.line_prefix + text + ctx.line_suffix).strip()
        if line == ctx.line_suffix.strip() or text.strip() == ctx.line_suffix.strip():
            return True
        return bool(following) and line == following[0]
    lines = _nonblank((ctx.line_prefix + text).split("\n"))
    return bool(lines) and lines == following[: len(lines)]


__all__ = [
    "make_stop",
    "stop_single",
    "stop_multi",
    "clean",
    "Cleaned",
    "fit_suffix",
    "scan_brackets",
    "Brackets",
    "leading_ws",
    "MAX_LINES",
]
