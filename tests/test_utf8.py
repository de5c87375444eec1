"""Suggestions never split a character: no U+FFFD from partial UTF-8 tokens (an accept would
insert it into the file), at the end of a candidate or at its start after token healing."""

from __future__ import annotations

import random

import pytest

from codegen_ls.engine.engine import Tokenizer
from codegen_ls.settings import Settings
from codegen_ls.suggest.pipeline import Completer, CompletionRequest
from helpers import MODEL

PROMPTS = [
    "s = '😀",
    "greeting = 'héllo 😀😀",
    "# 日本語のコメント\nx = '日本",
    "emoji = ['🎉', '🚀', '",
    "name = 'wörld 𝔘",
    's = "ü',
]


@pytest.fixture(scope="module")
def completer() -> Completer:
    c = Completer()
    c.load(str(MODEL))
    return c


def test_text_of_whole_characters_only() -> None:
    tok = Tokenizer(MODEL / "tokenizer.json")
    rng = random.Random(0)
    for text in ("plain ascii = 1", "héllo wörld", "😀🎉 日本語", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢"):
        ids = tok.encode(text)
        assert tok.text_of(ids) == tok.decode(ids) == text
        data = text.encode()
        for n in range(1, len(ids) + 1):  # every prefix: the decode up to the last whole character
            head = b"".join(tok.token_bytes()[i] for i in ids[:n])
            assert "\ufffd" not in tok.text_of(ids[:n])
            assert data.startswith(tok.text_of(ids[:n]).encode())
            assert len(head) - len(tok.text_of(ids[:n]).encode()) < 4
    for _ in range(300):  # random tokens: whatever they are, no replacement character
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 12))]
        assert "\ufffd" not in tok.text_of(ids)


def test_no_replacement_character_in_suggestions(completer: Completer) -> None:
    total = 0
    for temperature in (0.8, 1.5):
        for prompt in PROMPTS:
            for k in range(3):
                text = prompt + " " * k
                req = CompletionRequest(
                    text=text,
                    line=text.count("\n"),
                    character=len(text.split("\n")[-1]),
                    uri=f"file:///u{k}.py",
                    explicit=True,
                )
                result = completer.complete(
                    req, Settings(num_candidates=4, temperature=temperature, lookup=False, min_confidence=0.0)
                )
                for s in result.suggestions:
                    total += 1
                    assert "\ufffd" not in s.insert_text, (text, s.insert_text)
    assert total > 50  # before this fix, 22 of 142 suggestions here held U+FFFD
