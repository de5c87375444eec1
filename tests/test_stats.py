"""Local suggestion statistics: what is stored, the bounds, merging, the adaptive threshold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from codegen_ls import stats
from codegen_ls.stats import Outcome, Stats, edit_outcome


def test_edit_outcomes():
    assert edit_outcome("return x", "return x") is Outcome.ACCEPTED
    assert edit_outcome("return x", "return") is Outcome.PARTIAL  # a word accepted
    assert edit_outcome("return x", "r") is None  # one character typed along: counted by the next answer
    assert edit_outcome("return x", "pass") is Outcome.DISMISSED
    assert edit_outcome("", "x") is Outcome.DISMISSED


def test_only_counters_are_stored_and_servers_merge(tmp_path: Path):
    path = tmp_path / "stats.json"
    a, b = Stats(path), Stats(path)
    a.record(Outcome.SHOWN, "greedy", 0.47, "python", 210)
    a.record(Outcome.ACCEPTED, "greedy", 0.47, "python", 210)
    b.record(Outcome.SHOWN, "lookup:line+model", 0.91, "Python", 3)
    b.record(Outcome.DISMISSED, "my secret text", 0.2, "/etc/passwd", 5000)
    a.flush()
    b.close()
    data = json.loads(path.read_text())
    assert set(data) == {"format", "since", "counts"}
    assert data["counts"] == {
        "greedy|0.4|python|200-500": [1, 1, 0, 0],
        "lookup:line+model|0.9|python|0-50": [1, 0, 0, 0],
        "other|0.2|other|>=1000": [0, 0, 0, 1],
    }
    assert "secret" not in path.read_text() and "passwd" not in path.read_text()
    text = "\n".join(stats.report(path))
    assert "all              shown       2" in text
    assert "by confidence" in text and "by language" in text and "python" in text


def test_languages_are_bounded(tmp_path: Path):
    s = Stats(tmp_path / "stats.json")
    for i in range(3 * stats.MAX_LANGUAGES):
        s.record(Outcome.SHOWN, "greedy", 0.5, f"lang{i}", 10)
    languages = {k.split("|")[2] for k in s.counts()}
    assert len(languages) == stats.MAX_LANGUAGES + 1 and "other" in languages


def test_adaptive_threshold_skips_the_buckets_the_user_ignores(tmp_path: Path):
    s = Stats(tmp_path / "stats.json")
    assert s.adaptive_threshold() == 0.0  # nothing known: no change
    for _ in range(stats.ADAPTIVE_MIN_SHOWN):
        s.record(Outcome.SHOWN, "greedy", 0.05, "python", 100)  # never taken
        s.record(Outcome.DISMISSED, "greedy", 0.05, "python", 100)
        s.record(Outcome.SHOWN, "greedy", 0.15, "python", 100)  # rarely taken
    s.record(Outcome.ACCEPTED, "greedy", 0.15, "python", 100)
    assert s.adaptive_threshold() == 0.2  # 0.0 and 0.1 skipped; 0.2 has too few counts to judge
    for _ in range(stats.ADAPTIVE_MIN_SHOWN):
        s.record(Outcome.SHOWN, "greedy", 0.25, "python", 100)
        s.record(Outcome.ACCEPTED, "greedy", 0.25, "python", 100)
    assert s.adaptive_threshold() == 0.2  # 0.2 is taken: it stays


def test_damaged_or_unwritable_state_is_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "stats.json"
    path.write_text("{ not json")
    s = Stats(path)
    s.record(Outcome.SHOWN, "greedy", 0.5, "python", 10)
    s.flush()
    assert json.loads(path.read_text())["counts"]["greedy|0.5|python|0-50"] == [1, 0, 0, 0]
    blocked = Stats(tmp_path / "file" / "stats.json")
    (tmp_path / "file").write_text("a file where the directory should be")
    blocked.record(Outcome.SHOWN, "greedy", 0.5, "python", 10)
    blocked.flush()  # logged, not raised
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert stats.state_path() == tmp_path / "codegen-ls" / "stats.json"
