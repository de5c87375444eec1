"""Latency targeting: the plan from measured speeds (pure), and the measurement cache (real model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from codegen_ls.engine import latency
from codegen_ls.engine.latency import Speeds, plan

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "codegen-ls-small"


def test_a_fast_model_keeps_the_defaults():
    fast = Speeds(prefill_ms_per_token=0.12, extend_ms=3.0, step_ms=1.3, step_ms_n=1.8, rows=3)
    p = plan(fast, 150, 3)
    assert (p.context_tokens, p.max_new_tokens) == (latency.DEFAULT_CONTEXT, latency.DEFAULT_NEW_TOKENS)
    assert p.keystroke_ms <= 150


def test_a_slow_model_gets_less_context_and_fewer_tokens():
    the_350m = Speeds(prefill_ms_per_token=1.05, extend_ms=35.0, step_ms=14.0, step_ms_n=18.0, rows=3)
    laptop_2b = Speeds(prefill_ms_per_token=6.5, extend_ms=120.0, step_ms=60.0, step_ms_n=75.0, rows=3)
    a, b = plan(the_350m, 150, 3), plan(laptop_2b, 150, 3)
    assert a.context_tokens == 1024 and a.max_new_tokens == 6  # (150 - 35) / 18 -> 6
    assert b.context_tokens == latency.MIN_CONTEXT  # 10 x 150 / 6.5 = 230 tokens: the floor
    assert b.context_tokens < a.context_tokens and b.max_new_tokens == latency.MIN_NEW_TOKENS
    assert plan(the_350m, 1000, 3).max_new_tokens == 48 and plan(the_350m, 1000, 1).max_new_tokens == 48
    assert plan(the_350m, 300, 1).max_new_tokens == (300 - 35) // 14  # one row steps faster than three
    assert plan(laptop_2b, 150, 3, context_length=512).context_tokens <= 512 - 8


def test_speeds_measured_once_per_model_and_machine(tmp_path: Path):
    from codegen_ls.engine.engine import Engine, EngineOptions

    engine = Engine(MODEL_DIR, EngineOptions(threads=1))
    path = tmp_path / "speeds.json"
    first = latency.speeds_for(engine, threads=1, path=path)
    assert first.prefill_ms_per_token > 0 and first.step_ms > 0 and first.step_ms_n > 0 and first.extend_ms > 0
    assert len(engine.cache) == 0  # the probe's snapshots are dropped
    stored = json.loads(path.read_text())
    assert len(stored) == 1
    again = latency.speeds_for(engine, threads=1, path=path)  # from the file: the same numbers
    assert again == first
    other = latency.speeds_for(engine, threads=2, path=path)  # another thread count: measured anew
    assert len(json.loads(path.read_text())) == 2 and other.rows == 3
    path.write_text("not json")  # a damaged cache is measured again, never an error
    assert latency.speeds_for(engine, threads=1, path=path).step_ms > 0
    lines = latency.describe(first, 150, 3, engine.context_length)
    assert "contextTokens" in lines[1] and "maxNewTokens" in lines[1]


def test_cache_path_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert latency.cache_path() == tmp_path / "codegen-ls" / "speeds.json"
