"""The prompt for a cursor position, and the decision whether and how much to complete.

:func:`build_context` turns document + cursor into a :class:`Context`: the text before the cursor
within a token budget (CodeGen is left-to-right, so only the prefix is model input), the text after
the cursor (for stopping and trimming only), the cursor line split at the cursor, and the
document's indentation style.

Cost is O(budget), not O(document) or O(line length): a character window of at most
``CHARS_PER_TOKEN_MAX`` per budget token is sliced before the cursor, and only lines inside it are
tokenized (each distinct line once, via :class:`TokenCounter`'s cache), and the final prompt once,
for an exact count; after the cursor, ``SUFFIX_CHARS`` are kept. A cursor line longer than its
window (``line_window``) is cut: only its last part is looked at (:attr:`Context.line_cut`), from a
column that moves in steps while the user types. The one pass that depends on the position is
finding the cursor's offset
(:func:`codegen_ls.suggest.positions.offset_of`): newlines are counted in C, a chunk at a time.

The prompt must start at the same place while the user types, so that the engine's KV cache is
reused (it keeps the longest common token prefix). The window therefore starts at a line whose
number is a multiple of ``LINE_STEP``: typing moves the start only in jumps of ``LINE_STEP``
lines, when the budget overflows. A prompt that reaches the top of the file starts with the
end-of-text token, as every file did in training.

When the cursor line holds only whitespace before the cursor (a fresh, auto-indented line), that
whitespace is *held* out of the prompt (:attr:`Context.held`), which then ends with the newline:
byte-level BPE merges a newline with the following indentation (``"\\n   "`` + ``" return"``), so
a prompt ending in ``"\\n    "`` is a tokenization the model never saw. The model writes the
indentation itself and :mod:`codegen_ls.suggest.postprocess` aligns it with what the user typed.

:func:`codegen_ls.suggest.mode.decide_mode` chooses ``none`` / ``single`` / ``multi`` before any model call (llm-ls'
``should_complete``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Protocol

from codegen_ls.engine import fim
from codegen_ls.suggest.indent import Indent, guess_indent
from codegen_ls.suggest.positions import EOL as _EOL
from codegen_ls.suggest.positions import normalize_eol, offset_of, sanitize

CHARS_PER_TOKEN_MAX = 8  # characters per token, generous upper bound: sizes the character window
LINE_STEP = 16  # the prompt starts on a line number that is a multiple of this (KV-cache reuse)
TOKENS_PER_STEP = 64  # ... or of budget / TOKENS_PER_STEP when smaller (small budgets, finer steps)
SUFFIX_CHARS = 4000  # text after the cursor kept for stop rules and trimming
NEXT_LINES = 8  # following lines kept (repetition checks)
BEFORE_CHECK_CHARS = 2000  # text before the cursor line compared by the type-ahead cache
BLOCK_OPENERS = (":", "{", "(", "[")  # a line ending with one of these opens an indented block
PY_BLOCK_KEYWORDS = frozenset(
    ("def", "class", "if", "elif", "else", "for", "while", "try", "except", "finally", "with", "async", "match", "case")
)
FIM_SUFFIX_SHARE = 0.25  # a FIM prompt's share of the budget for the text after the cursor (Continue: 20 %)
FIM_SUFFIX_MAX = 256  # ... and at most this many tokens
MAX_TOKEN_CACHE = 16384  # distinct lines whose token count is remembered
LINE_WINDOW_MIN = 4096  # the cursor line is cut only when longer than this (and than the character window)
LINE_CUT_STEPS = 4  # ... at a multiple of window / LINE_CUT_STEPS, so the cut stays put while typing
INDENT_PEEK_CHARS = 256  # start of a cut cursor line read for its indentation
CUT_ALIGN_PER_TOKENS = 4  # on a cut line the prompt starts at a column that is a multiple of budget / this


class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


class TokenCounter:
    """``len(tokenizer.encode(line))`` with an LRU cache: lines rarely change between keystrokes."""

    def __init__(self, tokenizer: Encoder, max_entries: int = MAX_TOKEN_CACHE) -> None:
        self.tokenizer = tokenizer
        self.max_entries = max_entries
        self._counts: OrderedDict[str, int] = OrderedDict()

    def count(self, text: str) -> int:
        n = self._counts.get(text)
        if n is None:
            n = len(self.tokenizer.encode(text))
            self._counts[text] = n
            if len(self._counts) > self.max_entries:
                self._counts.popitem(last=False)
        else:
            self._counts.move_to_end(text)
        return n

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)


@dataclass
class Context:
    """Everything the pipeline needs about the cursor, computed in O(budget)."""

    prompt: str
    # model input text: [repository section + eot | eot] + window before the cursor (or before ``held``), LF line ends
    prompt_ids: list[int]  # ``encode(prompt)``, at most the budget
    prefix: str  # document[start:cursor], verbatim
    suffix: str  # document[cursor:cursor + SUFFIX_CHARS], verbatim
    start: int  # offset of the window start (0 or just after a line terminator)
    cursor: int  # offset of the cursor
    start_line: int  # line number of ``start``
    line: int  # cursor line (clamped to the document)
    character: int  # cursor column in code points (clamped to the line)
    line_prefix: str  # cursor line before the cursor (its last part when the line is cut: ``line_cut``)
    line_suffix: str  # cursor line after the cursor, without the line terminator
    held: str  # whitespace-only line_prefix kept out of the prompt ("" when the prompt ends at the cursor)
    prev_line: str  # nearest non-blank line above the cursor line inside the window ("" if none)
    next_lines: list[str] = field(default_factory=list)  # lines after the cursor line (up to NEXT_LINES)
    indent: Indent = field(default_factory=Indent)
    eol: str = "\n"  # the document's line terminator
    at_file_start: bool = False  # the window reaches the top of the file
    line_cut: int = 0  # characters at the start of the cursor line left out of line_prefix (a very long line)
    preamble_tokens: int = 0  # tokens of the repository section at the start of ``prompt`` (0: none)

    @property
    def only_whitespace_before(self) -> bool:
        """The cursor line holds only whitespace before the cursor (a cut line never does)."""
        return not self.line_cut and not self.line_prefix.strip()

    @property
    def before_line(self) -> str:
        """Text before the cursor line (the tail the type-ahead cache compares)."""
        end = max(0, len(self.prefix) - len(self.line_prefix))  # the prefix may start inside a long line
        return self.prefix[max(0, end - BEFORE_CHECK_CHARS) : end]

    @property
    def after_line(self) -> str:
        """Text after the cursor line's rest (within the suffix window)."""
        return self.suffix[len(self.line_suffix) :]


def _first_line_start_at_or_after(text: str, lo: int, hi: int) -> int:
    if lo == 0 or text[lo - 1] == "\n" or (text[lo - 1] == "\r" and text[lo : lo + 1] != "\n"):
        return lo
    m = _EOL.search(text, lo, hi)
    return m.end() if m else hi


@dataclass(frozen=True)
class ContextOptions:
    """How :func:`build_context` builds the prompt, beside the document, the cursor and the budget."""

    bos_text: str = ""  # the end-of-text token's text, prepended when the window reaches the top of the file
    tab_size: int | None = None  # the client's formatting options (None: guessed from the lines)
    insert_spaces: bool | None = None
    line_step: int | None = None  # the prompt starts on a multiple of this many lines (None: from the budget)
    preamble: str = ""  # the repository section (codegen_ls.suggest.repo_snapshot.render_snippets)
    fim_budget: int = 0  # > 0: a fill-in-the-middle prompt, the text after the cursor in at most this many tokens


@dataclass(frozen=True)
class _Cursor:
    """The cursor and the text around it, as the prompt sees it."""

    offset: int
    line: int  # clamped to the document
    character: int  # clamped to the line
    line_start: int  # offset of the cursor line's start
    cut: int  # > 0: a very long cursor line, only its end (from this column) is looked at
    line_prefix: str
    suffix: str  # the document after the cursor (SUFFIX_CHARS), verbatim
    line_suffix: str
    next_lines: list[str]
    held: str  # whitespace-only line_prefix kept out of the prompt
    head: str  # the part of the cursor line in the prompt


@dataclass(frozen=True)
class _Plan:
    """What the window before the cursor is fitted to."""

    counter: TokenCounter
    bos_text: str  # escaped wherever the document holds it
    file_bos: bool  # the window starts with bos_text when it reaches the top of the file (no lead before it)
    budget: int  # tokens for the window
    step: int  # its start line is a multiple of this


@dataclass(frozen=True)
class _Window:
    """The document part of the prompt."""

    prompt: str
    ids: list[int]
    start: int  # offset of its first character
    at_file_start: bool
    above: list[str]  # lines above the cursor line inside the character window
    first_line: int  # line number of above[0]
    start_line: int  # line number of ``start``


def build_context(
    text: str, line: int, character: int, counter: TokenCounter, budget: int, options: ContextOptions | None = None
) -> Context:
    """The context for the cursor at (line, character); see the module docstring.

    ``budget`` counts every prompt token, the end-of-text token's text (``options.bos_text``,
    prepended when the window reaches the top of the file) included. ``options.preamble`` (the
    repository section) goes first, then ``bos_text`` so the document starts as a file of its own,
    then the window in what is left of the budget; it is left out when it would take more than
    half the budget, and on a cut cursor line. ``options.fim_budget`` > 0: a fill-in-the-middle
    prompt (:mod:`codegen_ls.engine.fim`, SPM order): the text after the cursor comes first, in at
    most that many tokens (and half the budget), then the rest as above, without the end-of-text
    token (FIM training samples never hold one).
    """
    opts = options or ContextOptions()
    budget = max(1, budget)
    bos_text = "" if opts.fim_budget > 0 else opts.bos_text
    # the section ends in the end-of-text token in a FIM prompt too: a special token, so its ids and
    # the window's join as encoding the whole prompt would give (KV-cache reuse, verification)
    lead, lead_ids = _lead(opts.preamble, opts.bos_text, counter, budget)
    full_budget, budget = budget, budget - len(lead_ids)
    step = opts.line_step if opts.line_step else max(1, min(LINE_STEP, budget // TOKENS_PER_STEP))
    cur = _cursor_at(text, line, character, budget)
    fim_head: str = ""
    fim_ids: list[int] = []
    if opts.fim_budget > 0:
        fim_head, fim_ids = _fim_head(cur.suffix, counter, min(opts.fim_budget, full_budget // 2))
    if fim_head:  # the window before the cursor gets what the text after it left
        budget, full_budget = max(1, budget - len(fim_ids)), max(1, full_budget - len(fim_ids))
    if cur.cut:  # only the end of the cursor line, from a column that stays put while typing
        align = max(1, full_budget // CUT_ALIGN_PER_TOKENS)
        cut = _cut_long_line(counter, cur.head, cur.line_start + cur.cut, full_budget, bos_text, cur.cut, align)
        win, lead_ids = _Window(*cut, above=[], first_line=cur.line, start_line=cur.line), []
    else:
        win = _window(text, cur, _Plan(counter, bos_text, not lead, budget, step))
        if len(win.ids) > budget:  # one enormous cursor line: keep its end
            cut = _cut_long_line(counter, cur.head, cur.line_start, full_budget, bos_text)
            win, lead_ids = _Window(*cut, above=win.above, first_line=win.first_line, start_line=win.start_line), []
        else:
            win = replace(win, prompt=lead + win.prompt, ids=lead_ids + win.ids)
    if fim_head:  # special tokens end the head, so its ids and the window's simply join
        win = replace(win, prompt=fim_head + win.prompt, ids=fim_ids + win.ids)
    return _assemble(text, cur, win, opts, len(lead_ids))


def _lead(preamble: str, bos_text: str, counter: TokenCounter, budget: int) -> tuple[str, list[int]]:
    """The repository section and the end-of-text token before the document, and their ids; nothing
    when there is no section or it would take more than half the budget."""
    lead = preamble + bos_text if preamble else ""
    lead_ids = counter.encode(lead) if lead else []
    if len(lead_ids) > budget // 2:
        return "", []
    return lead, lead_ids


def _cursor_at(text: str, line: int, character: int, budget: int) -> _Cursor:
    """The cursor line split at the cursor, and the text after it, for a window of ``budget`` tokens."""
    offset, line, character = offset_of(text, line, character)
    line_start = offset - character
    cut = line_cut(character, budget)  # > 0: a very long cursor line, only its end is looked at
    line_prefix = sanitize(text[line_start + cut : offset])
    suffix = text[offset : offset + SUFFIX_CHARS]
    m = _EOL.search(suffix)
    line_suffix = sanitize(suffix[: m.start()] if m else suffix)
    after = suffix[m.end() :] if m else ""
    next_lines = [sanitize(s) for s in _EOL.split(after)[:NEXT_LINES]] if m else []
    held = line_prefix if not cut and not line_prefix.strip(" \t") else ""
    head = line_prefix[: len(line_prefix) - len(held)]
    return _Cursor(offset, line, character, line_start, cut, line_prefix, suffix, line_suffix, next_lines, held, head)


def _window(text: str, cur: _Cursor, plan: _Plan) -> _Window:
    """Whole lines above the cursor line, then its head, within the plan's budget; the start line a
    multiple of the plan's step (line 0 is one), never below the cursor line. The window may exceed
    the budget only when the cursor line alone does."""
    ls = cur.line_start
    # Lines above the cursor line inside the character window (the first, partial one dropped).
    lo = _first_line_start_at_or_after(text, max(0, ls - plan.budget * CHARS_PER_TOKEN_MAX), ls)
    above = [sanitize(s) for s in _EOL.split(text[lo:ls])[:-1]] if ls > lo else []
    first_line = cur.line - len(above)  # line number of above[0]
    start_line = _estimated_start(above, first_line, cur.head, plan)
    if start_line > 0:
        start_line = min(cur.line, -(-start_line // plan.step) * plan.step)
    while True:
        k = start_line - first_line  # index into ``above``
        window = "\n".join(above[k:]) + ("\n" if k < len(above) else "") + cur.head
        at_file_start = start_line == 0
        prompt = (plan.bos_text if at_file_start and plan.file_bos else "") + _escape(window, plan.bos_text)
        ids = plan.counter.encode(prompt)
        if len(ids) <= plan.budget or start_line >= cur.line:
            break
        start_line = min(cur.line, start_line + plan.step)  # estimate was low: jump one step
    start = _skip_terminators(text, lo, start_line - first_line)
    return _Window(prompt, ids, start, at_file_start, above, first_line, start_line)


def _estimated_start(above: list[str], first_line: int, head: str, plan: _Plan) -> int:
    """The first line of the window by the (over-)estimated token count: walk up from the cursor
    while it fits. The cursor line changes with every keystroke: counted, not cached."""
    bos_cost = 1 if plan.bos_text and plan.file_bos else 0
    used = len(plan.counter.encode(head)) if head and above else 0
    s = len(above)
    while s > 0:
        cost = plan.counter.count(above[s - 1] + "\n") + (bos_cost if first_line + s - 1 == 0 else 0)
        if used + cost > plan.budget:
            break
        used += cost
        s -= 1
    return first_line + s


def _assemble(text: str, cur: _Cursor, win: _Window, opts: ContextOptions, preamble_tokens: int) -> Context:
    """The :class:`Context` of a cursor and its window."""
    prev_line = next((a for a in reversed(win.above) if a.strip()), "")
    # the indentation typed counts too (a cut line: its own start)
    typed = sanitize(text[cur.line_start : cur.line_start + INDENT_PEEK_CHARS]) if cur.cut else cur.line_prefix
    typed += cur.line_suffix if cur.line_suffix.strip() else "x"
    window_lines = win.above[win.start_line - win.first_line :] + [typed] + cur.next_lines
    return Context(
        prompt=win.prompt,
        prompt_ids=win.ids,
        prefix=sanitize(text[win.start : cur.offset]),
        suffix=sanitize(cur.suffix),
        start=win.start,
        cursor=cur.offset,
        start_line=win.start_line,
        line=cur.line,
        character=cur.character,
        line_prefix=cur.line_prefix,
        line_suffix=cur.line_suffix,
        held=cur.held,
        prev_line=prev_line,
        next_lines=cur.next_lines,
        indent=guess_indent(window_lines, opts.tab_size, opts.insert_spaces),
        eol="\r\n" if "\r\n" in text[win.start : cur.offset + len(cur.suffix)] else "\n",
        at_file_start=win.at_file_start,
        line_cut=cur.cut,
        preamble_tokens=preamble_tokens,
    )


def fim_suffix_budget(budget: int) -> int:
    """Tokens of a FIM prompt's budget given to the text after the cursor."""
    return max(0, min(FIM_SUFFIX_MAX, int(budget * FIM_SUFFIX_SHARE)))


def _fim_head(after: str, counter: TokenCounter, fim_budget: int) -> tuple[str, list[int]]:
    """``<fim_prefix><fim_suffix>{whole lines after the cursor within the budget}<fim_middle>`` and its ids.

    Lines are counted one by one (cached), so the head stays the same while the user types before it
    and the engine's KV cache keeps it; the rest of the cursor line always comes first.
    """
    lines = _EOL.split(fim.strip_tokens(sanitize(after)))
    used, kept = 3, []  # the three control tokens
    for i, text in enumerate(lines):
        piece = text + ("\n" if i < len(lines) - 1 else "")
        cost = counter.count(piece)
        if used + cost > fim_budget:
            break
        kept.append(piece)
        used += cost
    head = fim.spm_prompt("", "".join(kept))
    ids = counter.encode(head)
    while len(ids) > fim_budget and kept:  # the per-line estimate was low: drop lines from the end
        kept.pop()
        head = fim.spm_prompt("", "".join(kept))
        ids = counter.encode(head)
    return head, ids


def line_window(budget: int) -> int:
    """Characters of the cursor line before the cursor that are looked at, at most."""
    return max(LINE_WINDOW_MIN, max(1, budget) * CHARS_PER_TOKEN_MAX)


def line_cut(character: int, budget: int) -> int:
    """Characters at the start of the cursor line left out: 0 unless the column is beyond the window.

    A multiple of a quarter window, so that it stays put while the user types (type-ahead cache,
    KV cache); what is left is between 3/4 of the window and the whole window.
    """
    window = line_window(budget)
    if character <= window:
        return 0
    step = max(1, window // LINE_CUT_STEPS)
    return -(-(character - window) // step) * step


def _escape(window: str, bos_text: str) -> str:
    """LF line ends; the document's own copies of the end-of-text text must not become the token."""
    window = normalize_eol(window)
    if bos_text and bos_text in window:
        window = window.replace(bos_text, bos_text[:-1] + " " + bos_text[-1:])
    return window


def _skip_terminators(text: str, lo: int, n: int) -> int:
    """Offset of the start of the n-th line after ``lo`` (``lo`` is a line start)."""
    pos = lo
    for _ in range(n):
        m = _EOL.search(text, pos)
        if m is None:
            return len(text)
        pos = m.end()
    return pos


def _cut_long_line(
    counter: TokenCounter, head: str, ls: int, budget: int, bos_text: str = "", column: int = 0, align: int = 1
) -> tuple[str, list[int], int, bool]:
    """The last part of an over-long cursor line that fits the budget (starts mid-line).

    ``head`` starts at offset ``ls``, column ``column``; all of it when it fits. Otherwise the part
    starts at a column that is a multiple of ``align`` (so that it stays put while the user types:
    KV-cache reuse), never inside a copy of ``bos_text``, which is escaped as everywhere else.
    """
    cut = 0
    while True:
        piece = _escape(head[cut:], bos_text)
        ids = counter.encode(piece)
        if len(ids) <= budget or cut == len(head):
            break
        keep = len(head) - cut
        keep = max(0, min(keep - 1, int(keep * budget / len(ids) * 0.9)))
        cut = min(len(head), -(-(column + len(head) - keep) // align) * align - column)
        cut = _not_inside(head, cut, bos_text)
    return piece, ids, ls + cut, False


def _not_inside(text: str, i: int, needle: str) -> int:
    """``i``, or the end of the copy of ``needle`` that ``i`` falls inside."""
    if not needle:
        return i
    j = text.rfind(needle, max(0, i - len(needle) + 1), i + len(needle) - 1)
    return j + len(needle) if 0 <= j < i else i


def token_budget(context_tokens: int, context_length: int, max_new_tokens: int) -> int:
    """The prompt budget: the setting, leaving room for the new tokens in the model's context."""
    return max(1, min(context_tokens, context_length - max_new_tokens - 1))


__all__ = [
    "Context",
    "ContextOptions",
    "Indent",
    "TokenCounter",
    "build_context",
    "guess_indent",
    "offset_of",
    "sanitize",
    "normalize_eol",
    "token_budget",
    "line_window",
    "line_cut",
    "fim_suffix_budget",
]
