"""What the pipeline takes and gives: a completion request, its suggestions, the result.

Knows nothing of LSP: positions are (line, character) in Python code points; the server converts
UTF-16 positions with pygls' document helpers. These types are the pipeline's interface
contract (the server and the CLI are written against them); :mod:`codegen_ls.suggest.pipeline`
re-exports them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from codegen_ls.kinds import Mode
from codegen_ls.suggest.repo import RepoSnapshot, path_of


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
    repo: RepoSnapshot | None = None  # the workspace index (codegen_ls.suggest.repo): repository drafts and snippets

    def open_paths(self) -> set[str]:
        """Files whose text the request has from the editor (this document, the open ones): the
        repository's copies on disk are left out."""
        return {p for p in (path_of(u) for u in (self.uri, *self.other_documents)) if p}


@dataclass
class Suggestion:
    insert_text: str  # replaces the range below
    start: tuple[int, int]  # (line, character) code points; range start
    end: tuple[int, int]  # range end (>= cursor; covers suffix text the suggestion re-types)
    score: float  # ranking score, higher is better
    confidence: float  # 0..1, compared with Settings.min_confidence
    # "greedy" | "sample" | "typeahead" | lookup's "lookup:line" | "lookup:doc" | "lookup:ngram" (+ "+model")
    source: str
    logprob_mean: float = 0.0
    finish_reason: str = ""


@dataclass
class CompletionResult:
    suggestions: list[Suggestion]
    mode: Mode
    reason: str = ""  # why nothing / which cache answered
    # ms: [load,] context, prefill, decode, [lookup,] rank, total
    timings: dict[str, float] = field(default_factory=dict)
    # prompt / cached / new tokens, tokens/s, candidates, lookup_candidates
    stats: dict[str, float] = field(default_factory=dict)
    # every ranked candidate: text, source, confidence, features
    candidates: list[dict[str, Any]] = field(default_factory=list)
    # what went into the prompt: repository snippets, tokens
    prompt_info: dict[str, Any] = field(default_factory=dict)
    # the top suggestion was cut by the new-token count or the deadline: it is continued in the background
    more: bool = False


CancelFn = Callable[[], bool]
