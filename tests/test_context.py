"""The context window: token budget, stable start (KV reuse), O(budget) work, modes, indentation."""

from __future__ import annotations

from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codegen_ls.engine.engine import Tokenizer
from codegen_ls.suggest import context as context_module
from codegen_ls.suggest.context import (
    Context,
    ContextOptions,
    Indent,
    TokenCounter,
    build_context,
    guess_indent,
    line_window,
    normalize_eol,
    offset_of,
    sanitize,
    token_budget,
)
from codegen_ls.suggest.mode import decide_mode
from helpers import BOS, CODE, REPO


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(REPO / "models" / "codegen-ls-small" / "tokenizer.json")


@pytest.fixture()
def counter(tokenizer: Tokenizer) -> TokenCounter:
    return TokenCounter(tokenizer)


def at(text: str, line: int, character: int, counter: TokenCounter, budget: int = 1024, **kw: object) -> Context:
    return build_context(text, line, character, counter, budget, ContextOptions(bos_text=BOS, **kw))  # type: ignore[arg-type]


def cursor_of(text: str, marker: str = "|") -> tuple[str, int, int]:
    i = text.index(marker)
    before = text[:i]
    return text[:i] + text[i + 1 :], before.count("\n"), len(before) - (before.rfind("\n") + 1)


# -- positions ------------------------------------------------------------------------------------


def test_offset_of_uses_lsp_line_ends_and_clamps() -> None:
    text = "ab\r\ncd\ref\ngh"
    assert offset_of(text, 0, 1) == (1, 0, 1)
    assert offset_of(text, 1, 0) == (4, 1, 0)
    assert offset_of(text, 2, 2) == (9, 2, 2)
    assert offset_of(text, 3, 99) == (len(text), 3, 2)  # character clamped to the line
    assert offset_of(text, 99, 0) == (10, 3, 0)  # line clamped to the last line
    assert offset_of("a\fb\nc", 1, 0) == (4, 1, 0)  # a form feed is not a line end


def test_prompt_is_the_text_before_the_cursor(counter: TokenCounter) -> None:
    text, line, ch = cursor_of(CODE.replace("self.name = name", "self.na|me = name"))
    ctx = at(text, line, ch, counter)
    assert ctx.at_file_start and ctx.start == 0
    assert ctx.prompt == BOS + text[: ctx.cursor]
    assert ctx.prefix == text[: ctx.cursor]
    assert ctx.line_prefix == "        self.na" and ctx.line_suffix == "me = name"
    assert ctx.next_lines[:2] == ["", "    def greet(self, loud=False):"]
    assert ctx.prompt_ids == counter.encode(ctx.prompt) and ctx.prompt_ids[0] == 0  # end-of-text first
    assert ctx.indent == Indent(False, 4)


def test_whitespace_before_the_cursor_is_held_out_of_the_prompt(counter: TokenCounter) -> None:
    text = "def f(x):\n    "
    ctx = at(text, 1, 4, counter)
    assert ctx.held == "    " and ctx.prompt == BOS + "def f(x):\n"
    assert ctx.prefix == text and ctx.line_prefix == "    "


def test_crlf_document(counter: TokenCounter) -> None:
    text = CODE.replace("\n", "\r\n")
    ctx = at(text, 7, 16, counter)
    assert ctx.eol == "\r\n" and "\r" not in ctx.prompt
    assert ctx.line_prefix == "        self.nam" and ctx.line_suffix == "e = name"
    assert ctx.prompt == BOS + normalize_eol(text[: ctx.cursor])


def test_budget_is_respected_and_the_window_starts_on_a_step_line(counter: TokenCounter) -> None:
    text = "\n".join(f"value_{i} = compute({i}, 'item {i}')" for i in range(400)) + "\n"
    for budget in (40, 200, 1000):
        ctx = at(text, 300, 5, counter, budget)
        assert len(ctx.prompt_ids) <= budget
        assert not ctx.at_file_start and ctx.start_line % max(1, min(16, budget // 64)) == 0
        assert text[ctx.start - 1] == "\n" and ctx.prefix == text[ctx.start : ctx.cursor]
        assert ctx.prompt == ctx.prefix
    assert len(at(text, 300, 5, counter, 1000).prompt_ids) > 500  # the budget is used, not wasted


def test_start_is_stable_while_typing(counter: TokenCounter) -> None:
    """Successive keystrokes share the prompt's token prefix (the engine's KV cache reuse)."""
    lines = [f"    total += weights[{i}] * values[{i}]  # term {i}" for i in range(300)]
    base = "\n".join(lines[:200]) + "\n"
    typed = "    result = compute_everything(alpha, beta, gamma, delta)"
    starts, prev = set(), None
    for n in range(len(typed) + 1):
        text = base + typed[:n]
        ctx = at(text, 200, n, counter, 512)
        starts.add(ctx.start)
        if prev is not None and ctx.start == prev.start:
            shared = 0
            while (
                shared < min(len(prev.prompt_ids), len(ctx.prompt_ids))
                and prev.prompt_ids[shared] == ctx.prompt_ids[shared]
            ):
                shared += 1
            assert shared >= len(prev.prompt_ids) - 3  # only the last token(s) differ
        prev = ctx
    assert len(starts) <= 2  # one jump at most over a 60-character line


def test_new_line_below_keeps_the_start(counter: TokenCounter) -> None:
    body = "".join(f"x{i} = {i}\n" for i in range(150))
    a = at(body, 150, 0, counter, 256)
    b = at(body + "y = 1\n", 151, 0, counter, 256)
    assert a.start_line == b.start_line


class CountingTokenizer:
    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.chars = 0

    def encode(self, text: str) -> list[int]:
        self.chars += len(text)
        return self.inner.encode(text)


def test_work_is_bounded_by_the_budget_not_the_document(tokenizer: Tokenizer) -> None:
    line = "    some_object.method_call(argument_one, argument_two)  # comment\n"
    text = line * 50_000  # 3.3 MB
    counting = CountingTokenizer(tokenizer)
    ctx = build_context(text, 40_000, 10, TokenCounter(counting), 256, ContextOptions(bos_text=BOS))
    assert len(ctx.prompt_ids) <= 256
    assert counting.chars < 256 * 8 * 3
    assert len(ctx.suffix) <= 4000


def test_one_enormous_line(counter: TokenCounter) -> None:
    text = "x = [" + ", ".join(str(i) for i in range(20_000)) + "]"
    ctx = at(text, 0, len(text) - 1, counter, 100)
    assert len(ctx.prompt_ids) <= 100 and ctx.prompt
    assert text[: ctx.cursor].endswith(ctx.prompt) and ctx.prefix == text[ctx.start : ctx.cursor]


HUGE_LINE = "x = [" + ", ".join(str(i) for i in range(180_000))  # 1.3 MB, no line break


@pytest.fixture(scope="module")
def big_file() -> str:
    """10 MB of Python, 600,000 lines."""
    return "".join(f"def f_{i}(x):\n    return x * {i} + len('{'é' * (i % 7)}')\n\n" for i in range(200_000))


@pytest.mark.parametrize(
    ("doc", "line", "character"),
    [
        ("huge line", 0, len(HUGE_LINE)),  # the end of a 1.3 MB line
        ("huge line", 0, 600_000),  # inside it
        ("big file", 600_000, 0),  # the end of a 10 MB file
        ("big file", 300_000, 4),  # its middle
    ],
)
@pytest.mark.parametrize("budget", [16, 256, 1024])
def test_work_is_bounded_on_huge_lines_and_files(
    doc: str, line: int, character: int, budget: int, tokenizer: Tokenizer, big_file: str
) -> None:
    """What is tokenized is bounded by the budget, wherever the cursor is (issue 7)."""
    text = HUGE_LINE if doc == "huge line" else big_file
    assert len(text) > (1_300_000 if doc == "huge line" else 10_000_000)
    counting = CountingTokenizer(tokenizer)
    ctx = build_context(text, line, character, TokenCounter(counting), budget, ContextOptions(bos_text=BOS))
    window = line_window(budget)
    assert window <= 4096 + 8 * budget
    assert counting.chars <= 3 * window  # measured: at most 2.2 windows
    assert len(ctx.prompt_ids) <= budget and ctx.prompt and text[: ctx.cursor].endswith(ctx.prompt)
    assert len(ctx.line_prefix) <= window and len(ctx.prefix) <= len(ctx.line_prefix) + window
    assert len(ctx.suffix) <= 4000 and ctx.cursor == offset_of(text, line, character)[0]
    assert ctx.line_prefix == text[ctx.cursor - len(ctx.line_prefix) : ctx.cursor]
    assert ctx.line_cut + len(ctx.line_prefix) == ctx.character
    if doc == "huge line":
        assert ctx.line_cut > 0 and not ctx.at_file_start and not ctx.held and ctx.prev_line == ""


def test_a_cut_line_keeps_its_start_while_typing(counter: TokenCounter) -> None:
    """Typing at the end of a huge line: line_cut and the prompt start move in steps (KV cache reuse)."""
    typed = ", 180000, 180001, 180002, 180003"
    starts, cuts = set(), set()
    for n in range(len(typed) + 1):
        text = HUGE_LINE + typed[:n]
        ctx = at(text, 0, len(text), counter, 256)
        starts.add(ctx.start)
        cuts.add(ctx.line_cut)
        assert ctx.line_cut % (line_window(256) // 4) == 0 and len(ctx.prompt_ids) <= 256
    assert len(cuts) <= 2 and len(starts) <= 3


def test_a_cut_line_is_never_blank_nor_a_header(counter: TokenCounter) -> None:
    """Only the end of a cut line is known: it is not an empty line nor a block header."""
    spaces = "y = f(" + " " * 20_000
    ctx = at(spaces, 0, len(spaces), counter, 256)
    assert ctx.line_cut and not ctx.held and not ctx.only_whitespace_before
    assert decide_mode(ctx)[0] == "single"
    for terms, mode in ((3000, "single"), (20, "multi")):  # (a short header is one)
        header = "if " + " and ".join(f"a{i}" for i in range(terms)) + ":"
        assert decide_mode(at(header, 0, len(header), counter, 256))[0] == mode


_line_pieces = st.one_of(
    st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=12),
    st.sampled_from(["\n", "\r\n", "\t", "    ", "def f(x):", "é", "\U0001f600", "(", "'", BOS]),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    parts=st.lists(_line_pieces, max_size=40),
    line=st.integers(0, 5),
    character=st.integers(0, 400),
    budget=st.integers(1, 40),
)
def test_context_invariants_on_cut_lines(
    parts: list[str], line: int, character: int, budget: int, counter: TokenCounter
) -> None:
    """The invariants hold when the cursor line is cut (a window shrunk to make cuts common)."""
    text = "".join(parts)
    with mock.patch.object(context_module, "LINE_WINDOW_MIN", 1):
        ctx = at(text, line, character, counter, budget)
        window = line_window(budget)
    assert 0 <= ctx.start <= ctx.cursor <= len(text) and ctx.prefix == sanitize(text[ctx.start : ctx.cursor])
    assert ctx.line_prefix == sanitize(text[ctx.cursor - len(ctx.line_prefix) : ctx.cursor])
    assert ctx.line_cut + len(ctx.line_prefix) == ctx.character and len(ctx.line_prefix) <= window
    assert ctx.line_prefix.endswith(ctx.prefix) if ctx.line_cut else True
    assert len(ctx.prompt_ids) <= budget and ctx.prompt_ids == counter.encode(ctx.prompt)
    body = ctx.prompt[len(BOS) :] if ctx.at_file_start else ctx.prompt
    expected = normalize_eol(ctx.prefix[: len(ctx.prefix) - len(ctx.held)]).replace(BOS, BOS[:-1] + " " + BOS[-1])
    assert expected.endswith(body)
    assert decide_mode(ctx)[0] in ("none", "single", "multi")


def test_token_budget_leaves_room_for_new_tokens() -> None:
    assert token_budget(1024, 2048, 48) == 1024
    assert token_budget(4096, 2048, 48) == 2048 - 48 - 1


# -- modes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("marked", "mode"),
    [
        ("        self.na|me = name", "none"),  # inside an identifier
        ('    g = Greeter(|"world")', "single"),  # before a string: rest of the line
        ("    print(g.greet()|)", "single"),  # before closing brackets
        ("        return message|", "single"),
        ("        if loud:|", "multi"),  # end of a block opener line
        ("    |def greet(self, loud=False):", "none"),  # in the indentation before code
    ],
)
def test_modes_on_lines(marked: str, mode: str, counter: TokenCounter) -> None:
    text, line, ch = cursor_of(CODE.replace(marked.replace("|", ""), marked))
    assert decide_mode(at(text, line, ch, counter))[0] == mode


def test_modes_on_blank_lines(counter: TokenCounter) -> None:
    after_opener = "def f(x):\n    |\n"
    text, line, ch = cursor_of(after_opener)
    assert decide_mode(at(text, line, ch, counter)) == ("multi", "blank line after a block opener")
    in_body = "def f(x):\n    y = x\n|\n"
    text, line, ch = cursor_of(in_body)
    assert decide_mode(at(text, line, ch, counter))[0] == "multi"
    top = "import os\n\n|\n"
    text, line, ch = cursor_of(top)
    ctx = at(text, line, ch, counter)
    assert decide_mode(ctx)[0] == "single"
    assert decide_mode(ctx, "always")[0] == "multi"
    text, line, ch = cursor_of(after_opener)
    assert decide_mode(at(text, line, ch, counter), "never")[0] == "single"


def test_multiline_always_needs_an_empty_rest_of_line(counter: TokenCounter) -> None:
    text, line, ch = cursor_of("print(|)\n")
    assert decide_mode(at(text, line, ch, counter), "always")[0] == "single"


# -- indentation ----------------------------------------------------------------------------------


def test_indentation_guess() -> None:
    assert guess_indent(["def f():", "\tif x:", "\t\treturn 1"]) == Indent(True, 4)
    assert guess_indent(["def f():", "  if x:", "    return 1", "  y = 2"]) == Indent(False, 2)
    assert guess_indent(["x = 1"]) == Indent(False, 4)
    assert guess_indent(["\tx"], tab_size=8, insert_spaces=True) == Indent(False, 8)
    assert guess_indent(["    x"], tab_size=2, insert_spaces=False) == Indent(True, 2)


def test_indent_columns_and_render() -> None:
    tabs = Indent(True, 4)
    assert tabs.columns("\t  ") == 6 and tabs.render(9) == "\t\t "
    assert Indent(False, 4).render(8) == " " * 8


# -- robustness -----------------------------------------------------------------------------------


def test_sanitize_replaces_lone_surrogates_one_for_one() -> None:
    s = "a\ud800b\U0001f600c"
    assert sanitize(s) == "a?b\U0001f600c" and len(sanitize(s)) == len(s)


_pieces = st.one_of(
    st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=12),  # anything, lone surrogates too
    st.sampled_from(
        ["\n", "\r\n", "\r", "\t", "    ", "\x00", "def f(x):", "é", "\U0001f600", "(", ")", "#", "'", BOS]
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    parts=st.lists(_pieces, max_size=40),
    line=st.integers(-2, 30),
    character=st.integers(-2, 60),
    budget=st.integers(1, 300),
)
def test_context_invariants(parts: list[str], line: int, character: int, budget: int, counter: TokenCounter) -> None:
    text = "".join(parts)
    ctx = at(text, line, character, counter, budget)
    assert 0 <= ctx.start <= ctx.cursor <= len(text)
    assert (
        ctx.start == 0 or text[ctx.start - 1] in "\r\n" or "\n" not in ctx.prompt
    )  # a line start, or a long line's end
    assert ctx.prefix == sanitize(text[ctx.start : ctx.cursor])
    assert ctx.prefix.endswith(ctx.line_prefix) or ctx.line_prefix.endswith(ctx.prefix)  # (long line: cut)
    assert ctx.line_prefix.endswith(ctx.held)
    assert "\r" not in ctx.line_suffix and "\n" not in ctx.line_suffix
    assert len(ctx.prompt_ids) <= budget and ctx.prompt_ids == counter.encode(ctx.prompt)
    body = ctx.prompt[len(BOS) :] if ctx.at_file_start else ctx.prompt
    expected = normalize_eol(ctx.prefix[: len(ctx.prefix) - len(ctx.held)]).replace(BOS, BOS[:-1] + " " + BOS[-1])
    assert expected.endswith(body)  # a suffix-aligned slice of the text before the cursor
    if ctx.at_file_start:
        assert ctx.start == 0 and body == expected
    assert decide_mode(ctx)[0] in ("none", "single", "multi")
