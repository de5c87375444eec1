"""The completion pipeline shared by the LSP server and ``codegen-ls complete``.

document + cursor -> context (prefix/suffix within a token budget) -> decide mode
(none / single-line / multi-line) -> type-ahead cache -> engine candidates (+ lookup drafts)
-> stop rules and trimming -> ranking -> suggestions.

Knows nothing of LSP: positions are (line, character) in Python code points; the server converts
UTF-16 positions with pygls' document helpers.

INTERFACE CONTRACT (stable; the server and CLI are written against it):
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from codegen_ls.settings import Settings


@dataclass
class CompletionRequest:
    text: str  # the whole document
    line: int  # 0-based
    character: int  # 0-based, in code points of that line
    uri: str = "untitled:0"  # key for the KV cache and the type-ahead cache
    language_id: str = "python"
    tab_size: int | None = None  # from formattingOptions, else guessed from the file
    insert_spaces: bool | None = None
    other_documents: dict[str, str] = field(default_factory=dict)  # uri -> text (open buffers)
    explicit: bool = False  # the user asked (triggerKind Invoked) rather than typing


@dataclass
class Suggestion:
    insert_text: str  # replaces the range below
    start: tuple[int, int]  # (line, character) code points; range start
    end: tuple[int, int]  # range end (>= cursor; covers suffix text the suggestion re-types)
    score: float  # ranking score, higher is better
    confidence: float  # 0..1, compared with Settings.min_confidence
    source: str  # "greedy" | "sample" | "lookup" | "lookup+model" | "typeahead"
    logprob_mean: float = 0.0
    finish_reason: str = ""


@dataclass
class CompletionResult:
    suggestions: list[Suggestion]
    mode: str  # "none" | "single" | "multi"
    reason: str = ""  # why nothing / which cache answered
    timings: dict[str, float] = field(default_factory=dict)  # ms: context, prefill, decode, total
    stats: dict[str, float] = field(default_factory=dict)  # prompt/cached/new tokens, tokens/s


CancelFn = Callable[[], bool]
