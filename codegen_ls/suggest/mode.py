"""The completion mode, decided before any model call (llm-ls' ``should_complete``): none,
single line or multi-line, from the text around the cursor; and the Python syntax helpers it
uses (comments, block openers and headers)."""

from __future__ import annotations

import re

from codegen_ls.kinds import Mode
from codegen_ls.suggest.context import BLOCK_OPENERS, PY_BLOCK_KEYWORDS, Context


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def strip_comment(line: str, language_id: str = "python") -> str:
    """The line without a trailing ``#`` / ``//`` comment (quotes respected, roughly)."""
    quote = ""
    i = 0
    while i < len(line):
        ch = line[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and language_id == "python":
            return line[:i]
        elif ch == "/" and line[i + 1 : i + 2] == "/" and language_id != "python":
            return line[:i]
        i += 1
    return line


def is_block_opener(line: str, language_id: str = "python") -> bool:
    """The line ends with something that opens an indented block or a bracketed list."""
    code = strip_comment(line, language_id).rstrip()
    return code.endswith(BLOCK_OPENERS)


def is_block_header(line: str, language_id: str = "python") -> bool:
    """A finished block header whose body goes on the next lines (``if x:``, ``function f() {``).

    Stricter than :func:`is_block_opener`: after ``foo(`` or ``{'a':`` the user usually goes on
    on the same line.
    """
    code = strip_comment(line, language_id).strip()
    if language_id != "python":
        return code.endswith("{")
    first = re.split(r"[\s(:]", code, maxsplit=1)[0]
    return code.endswith(":") and first in PY_BLOCK_KEYWORDS


def decide_mode(ctx: Context, multiline: str = "auto", language_id: str = "python") -> tuple[Mode, str]:
    """(:class:`~codegen_ls.kinds.Mode`, reason) before any model call.

    none:   the cursor is directly before a word character (inside or in front of an
            identifier), or in the indentation in front of code.
    multi:  ``multiline="always"`` with nothing after the cursor; with ``"auto"``: a blank line
            after a block opener (``:``, ``{``, ``(``, ``[`` at the end of the line above) or
            inside an indented body, or the end of a block header line (``if x:``). Never with
            ``"never"``.
    single: everything else (the rest of the line, also in front of closing brackets/code).
    """
    after = ctx.line_suffix
    if after[:1] and _is_word(after[0]):
        return Mode.NONE, "cursor before a word character"
    rest_blank = not after.strip()
    head_blank = ctx.only_whitespace_before
    if head_blank and not rest_blank:
        return Mode.NONE, "cursor in the indentation before code"
    if multiline == "never" or not rest_blank:
        return Mode.SINGLE, ""
    if multiline == "always":
        return Mode.MULTI, "multiline always"
    if head_blank:
        if ctx.prev_line and is_block_opener(ctx.prev_line, language_id):
            return Mode.MULTI, "blank line after a block opener"
        prev_indent = len(ctx.prev_line) - len(ctx.prev_line.lstrip(" \t"))
        if ctx.held or prev_indent > 0:
            return Mode.MULTI, "blank line inside an indented body"
        return Mode.SINGLE, ""
    if not ctx.line_cut and is_block_header(ctx.line_prefix, language_id):  # (a cut line is no header)
        return Mode.MULTI, "end of a block header line"
    return Mode.SINGLE, ""
