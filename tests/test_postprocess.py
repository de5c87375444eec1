"""Stop rules and trimming: what is inserted must leave the document right (suffix once, indentation)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codegen_ls.suggest.context import Indent
from codegen_ls.suggest.mode import decide_mode
from codegen_ls.suggest.postprocess import (
    MAX_LINES,
    clean,
    fit_suffix,
    make_stop,
    scan_brackets,
    stop_multi,
    stop_single,
)
from helpers import ctx_of

SPACES = Indent(False, 4)


def run(marked: str, raw: str, finish: str = "stop", model_frame: bool = True, mode: str | None = None) -> str | None:
    """Stop + clean a raw candidate as the completer does; the text to insert (or None)."""
    ctx = ctx_of(marked)
    mode = mode or decide_mode(ctx)[0]
    held = ctx.held if model_frame else ""
    cut = make_stop(ctx, mode, held)(raw)
    cleaned = clean(raw[:cut] if cut is not None else raw, ctx, mode, held, finish)
    return None if cleaned is None else cleaned.text


def apply(marked: str, insert: str) -> str:
    return marked.replace("|", insert)


# -- stop rules -----------------------------------------------------------------------------------


def test_single_line_stops_at_the_newline() -> None:
    assert stop_single("x = ", "foo(1)\nbar") == 6
    assert stop_single("x = ", "foo(1)") is None
    assert stop_single("x = ", "\nfoo") == 0  # the line is done: nothing to add
    assert stop_single("", "\n\nfoo()\nbar") == 7  # blank line so far: leading newlines go on


def test_multi_line_stops_at_a_dedent() -> None:
    text = "    y = x + 1\n    return y\n\ndef g():"
    assert text[: stop_multi("", text, SPACES)] == "    y = x + 1\n    return y"
    assert stop_multi("", "    y = 1\n    z = 2\n", SPACES) is None  # no verdict until a line has content
    assert stop_multi("", "    y = 1\n  ", SPACES) is None


def test_multi_line_stops_before_top_level_code_after_a_blank_line() -> None:
    text = "x = 1\ny = 2\n\nprint(x)"
    assert text[: stop_multi("", text, SPACES)] == "x = 1\ny = 2"
    assert stop_multi("", "x = 1\ny = 2\nz = 3", SPACES) is None  # no blank line: the block goes on


def test_multi_line_after_an_opener_needs_an_indented_body() -> None:
    assert stop_multi("def f():", "\n    return 1\n\nx = 2", SPACES) == len("\n    return 1")
    assert stop_multi("def f():", "\nx = 2", SPACES) == 0


def test_multi_line_is_limited() -> None:
    text = "".join(f"    x{i} = {i}\n" for i in range(MAX_LINES + 3))
    cut = stop_multi("", text, SPACES)
    assert cut is not None and text[:cut].count("\n") == MAX_LINES - 1


def test_tabs_count_as_indentation() -> None:
    text = "\tif x:\n\t\ty = 1\n\treturn y\nz"
    assert text[: stop_multi("", text, Indent(True, 4))] == "\tif x:\n\t\ty = 1\n\treturn y"


# -- the rest of the line -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("marked", "raw", "expected_line"),
    [
        ("x = foo(|)", "a, b)", "x = foo(a, b)"),  # the model's ')' is the suffix's: once
        ("x = foo(|)", "g(x)", "x = foo(g(x))"),  # the model's ')' closes its own '('
        ("x = foo(|)", "a, b) + 1", "x = foo(a, b)"),  # cut where the suffix begins
        ("x = foo(|)", "a", "x = foo(a)"),
        ("for x in |:", "range(3):", "for x in range(3):"),
        ('print("|")', 'hello")', 'print("hello")'),
        ("d = {'a': [|]}", "1, 2]}", "d = {'a': [1, 2]}"),
        ("y = f(|)  # note", "z)", "y = f(z)  # note"),
    ],
)
def test_suffix_appears_once_after_accept(marked: str, raw: str, expected_line: str) -> None:
    insert = run(marked + "\n", raw)
    assert insert is not None
    assert apply(marked, insert) == expected_line


@settings(max_examples=60, deadline=None)
@given(
    args=st.lists(st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True), min_size=1, max_size=4), nested=st.booleans()
)
def test_closing_bracket_is_never_doubled(args: list[str], nested: bool) -> None:
    inner = ", ".join(args)
    raw = f"g({inner}))" if nested else f"{inner})"
    insert = run("value = call(|)\n", raw)
    assert insert is not None
    line = apply("value = call(|)", insert)
    assert line == f"value = call({raw}"
    assert scan_brackets(line).key() == (0, (), "")


def test_fit_suffix_leaves_unfixable_text_alone() -> None:
    assert fit_suffix("x = [", "1, 2", "]") == ("1, 2", 0, False)
    assert fit_suffix("x = ", "1", "") == ("1", 0, False)


# -- dropping -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("marked", "raw"),
    [
        ("x = |\n", "   "),  # whitespace only
        ("x = |\n", ""),
        ("a = 1\n|\nb = 2\n", "b = 2"),  # repeats the next line
        ("def f(x):\n    |\n    return x\n", "    return x"),  # the block re-types what follows
        ("x = foo(|)\n", ")"),  # only the suffix again
    ],
)
def test_useless_candidates_are_dropped(marked: str, raw: str) -> None:
    assert run(marked, raw) is None


def test_trailing_whitespace_is_dropped() -> None:
    assert run("x = |\n", "compute(1)   ") == "compute(1)"
    assert run("def f():\n    |\n", "    a = 1  \n    b = 2\t\n") == "a = 1\n    b = 2"


# -- multi-line blocks and indentation ------------------------------------------------------------


def test_block_is_placed_after_the_typed_indentation() -> None:
    marked = "def f(x):\n    |\n"
    insert = run(marked, "    y = x * 2\n    return y\ndef g():")
    assert insert == "y = x * 2\n    return y"
    assert apply(marked, insert) == "def f(x):\n    y = x * 2\n    return y\n"


def test_deeper_model_indentation_is_kept() -> None:
    assert run("def f(x):\n    |\n", "        y = 1\n        z = 2", mode="multi") == "    y = 1\n        z = 2"


def test_lookup_frame_continues_the_cursor() -> None:
    insert = run("def f(x):\n    |\n", "y = x * 2\n    return y", model_frame=False)
    assert insert == "y = x * 2\n    return y"


def test_end_of_opener_line_starts_with_a_newline() -> None:
    marked = "def f(x):|\n"
    insert = run(marked, "\n    return x\n\nz = 1")
    assert insert == "\n    return x"


def test_indentation_follows_the_document_style() -> None:
    marked = "def f(x):\n\tif x:\n\t\tpass\n\t|\n"
    insert = run(marked, "    for i in x:\n        print(i)\n")
    assert insert == "for i in x:\n\t\tprint(i)"


def test_unfinished_last_line_is_cut() -> None:
    marked = "def f(x):\n    |\n"
    assert run(marked, "    y = 1\n    z = compute(", finish="length") == "y = 1"
    assert run(marked, "    y = 1\n    z = compute(", finish="stop") == "y = 1\n    z = compute("


def test_decoding_loops_are_cut() -> None:
    assert run("def f(x):\n    |\n", "    a = 1\n    a = 1\n    a = 1") == "a = 1"


def test_duplicated_closing_lines_are_cut() -> None:
    marked = "def f(x):\n    |\n    return y\n"
    assert run(marked, "    y = x + 1\n    return y") == "y = x + 1"


def test_document_line_ends_are_used() -> None:
    marked = "if a:\r\n    |\r\n"
    insert = run(marked, "    b = 2\n    c = 3")
    assert insert == "b = 2\r\n    c = 3"


def test_kept_chars_count_the_overlap_as_kept() -> None:
    ctx = ctx_of("x = foo(|)\n")
    cleaned = clean("a, b)", ctx, "single")
    assert cleaned is not None and cleaned.text == "a, b" and cleaned.kept_chars == 5 and not cleaned.truncated
    cut = clean("a, b) + 1", ctx, "single")
    assert cut is not None and cut.truncated and cut.kept_chars == 4


_code = st.lists(
    st.sampled_from(list("ab_ (){}[]:'\"#\\,.=\n\t\r ") + ["    ", "\U0001f600", "é", "\n    ", "return"]), max_size=40
).map("".join)
_docs = st.sampled_from(
    [
        "x = foo(|)\n",
        "def f(x):\n    |\n",
        "def f(x):|\n",
        "if a:\r\n\t|\r\n",
        "print('|')\n",
        "|",
        "a = [1,\n     |\n",
        "class A:\n    def f(self):\n        return (|)\n        pass\n",
    ]
)


@settings(max_examples=300, deadline=None)
@given(doc=_docs, raw=_code, finish=st.sampled_from(["stop", "eos", "length", "deadline"]), model_frame=st.booleans())
def test_clean_never_crashes_and_keeps_its_promises(doc: str, raw: str, finish: str, model_frame: bool) -> None:
    from codegen_ls.suggest.ranking import Item, rank

    ctx = ctx_of(doc)
    mode = decide_mode(ctx)[0]
    if mode == "none":
        return
    held = ctx.held if model_frame else ""
    cleaned = clean(raw, ctx, mode, held, finish)
    if cleaned is None:
        return
    text = cleaned.text
    assert text.strip() and text == text.rstrip()
    assert 0 <= cleaned.kept_chars <= len(raw)
    if mode == "single":
        assert "\n" not in text and "\r" not in text
    for ln in text.split(ctx.eol)[1:]:
        assert "\n" not in ln and "\r" not in ln and ln == ln.rstrip()
    ranked = rank([Item(text, [-1.0], "greedy", finish)], ctx, mode)
    assert len(ranked) == 1 and 0 < ranked[0].confidence < 1


# -- the model's indentation step vs the document's width ----------------------------------------

TWO_SPACES = "class A:\n  def f(self):\n    pass\n"


def test_block_body_takes_the_document_width() -> None:
    """The model learned 4-space steps; a 2-space file gets 2-space levels, depth for depth."""
    marked = TWO_SPACES + "  def g(self):\n|\n"
    assert run(marked, "      x = 1\n      if x:\n          return x") == "    x = 1\n    if x:\n      return x"
    assert run(marked, "    x = 1\n    return x") == "    x = 1\n    return x"  # already the file's


def test_typed_indentation_and_opener_end_take_the_document_width() -> None:
    assert (
        run("def a():\n  return 1\ndef g():\n  |\n", "    x = 1\n    if x:\n        return x")
        == "x = 1\n  if x:\n    return x"
    )
    assert run("def a():\n  return 1\ndef f(x):|\n", "\n    if x:\n        return 1") == "\n  if x:\n    return 1"


def test_steps_that_do_not_divide_are_left_alone() -> None:
    marked = TWO_SPACES + "  def g(self):\n|\n"
    assert run(marked, "      x = (1,\n         2)") == "      x = (1,\n         2)"
