"""Repository context: .gitignore rules, the workspace index (real temp folders), repository
drafts, the prompt's repository section, and the pipeline with the embedded model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from codegen_ls.settings import Settings
from codegen_ls.suggest.context import ContextOptions, build_context
from codegen_ls.suggest.drafts import DraftOptions, find_drafts
from codegen_ls.suggest.gitignore import Ignore, parse
from codegen_ls.suggest.pipeline import Completer, CompletionRequest
from codegen_ls.suggest.repo import RepoIndex, RepoLimits, path_of, render_snippets
from helpers import COUNTER

UTIL = '''"""Helpers."""


def scale_values(values, factor=2):
    return [v * factor for v in values]


def total_price(items, tax_rate=0.2):
    subtotal = sum(item.price for item in items)
    return round(subtotal * (1 + tax_rate), 2)
'''

MAIN = """from .util import total_price


def checkout(cart):
    amount = total_price(cart.items, tax_rate=0.07)
    return amount
"""


def make_project(root: Path) -> Path:
    (root / "pkg").mkdir()
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "util.py").write_text(UTIL)
    (root / "pkg" / "main.py").write_text(MAIN)
    (root / "build").mkdir()
    (root / "build" / "copy.py").write_text(UTIL)  # ignored by .gitignore
    (root / "pkg" / "table.gen.py").write_text("X = 1\n")  # ignored by pattern
    (root / "node_modules").mkdir()
    (root / "node_modules" / "x.py").write_text("y = 2\n")  # a tool folder: never read
    (root / "notes.txt").write_text("not source\n")
    (root / ".gitignore").write_text("build/\n*.gen.py\n")
    return root


def indexed(root: Path, limits: RepoLimits | None = None) -> RepoIndex:
    index = RepoIndex(limits)
    index.add_root(root.as_uri())
    assert index.wait_idle(30)
    return index


def test_gitignore_rules() -> None:
    ig = Ignore(tuple(parse("*.log\n/build/\nfoo/**/bar.py\n!keep.log\ndocs/\n# comment\n\\#hash\n")))
    assert ig.ignored("a.log", False) and ig.ignored("x/y/a.log", False) and not ig.ignored("keep.log", False)
    assert ig.ignored("build", True) and not ig.ignored("x/build", True)  # anchored to its folder
    assert ig.ignored("foo/bar.py", False) and ig.ignored("foo/a/b/bar.py", False)
    assert ig.ignored("docs", True) and ig.ignored("x/docs", True) and not ig.ignored("docs", False)  # folders only
    assert ig.ignored("#hash", False) and not ig.ignored("src/a.py", False)
    nested = Ignore(tuple(parse("*.tmp.py\n", "sub/")))
    assert nested.ignored("sub/a.tmp.py", False) and not nested.ignored("a.tmp.py", False)


def test_index_reads_sources_only_and_respects_gitignore(tmp_path: Path) -> None:
    index = indexed(make_project(tmp_path))
    snap = index.snapshot
    assert sorted(f.rel for f in snap.files.values()) == ["pkg/__init__.py", "pkg/main.py", "pkg/util.py"]
    assert snap.roots == [str(tmp_path)] and snap.nbytes == len(UTIL) + len(MAIN)
    index.close()


def test_index_is_incremental_and_open_documents_override_the_disk(tmp_path: Path) -> None:
    root = make_project(tmp_path)
    index = indexed(root)
    v0 = index.snapshot.version
    (root / "pkg" / "extra.py").write_text("def fresh_helper(a, b):\n    return a\n")
    index.changed(str(root / "pkg" / "extra.py"))
    assert index.wait_idle(30)
    assert [f.rel for f, _, _ in index.snapshot.line_matches("def fresh_helper(")] == ["pkg/extra.py"]
    assert index.snapshot.version > v0
    index.deleted((root / "pkg" / "extra.py").as_uri())
    assert index.wait_idle(30)
    assert not list(index.snapshot.line_matches("def fresh_helper("))
    uri = (root / "pkg" / "util.py").as_uri()
    index.set_open(uri, UTIL + "\ndef unsaved_helper():\n    pass\n")  # the editor's text, not yet on disk
    assert index.wait_idle(30)
    assert list(index.snapshot.line_matches("def unsaved_helper("))
    index.set_open(uri, None)  # closed: the disk counts again
    assert index.wait_idle(30)
    assert not list(index.snapshot.line_matches("def unsaved_helper("))
    index.changed(str(root / "build" / "new.py"))  # ignored, even when told
    assert index.wait_idle(30)
    assert all(not f.rel.startswith("build/") for f in index.snapshot.files.values())
    index.close()


def test_index_limits_bound_memory(tmp_path: Path) -> None:
    root = make_project(tmp_path)
    (root / "pkg" / "big.py").write_text("x = 1\n" * 20_000)  # 120 kB
    (root / "deep" / "er").mkdir(parents=True)
    (root / "deep" / "er" / "d.py").write_text("z = 3\n")
    index = indexed(root, RepoLimits(max_files=10, max_file_bytes=50_000, max_total_bytes=len(UTIL) + len(MAIN) + 3))
    rels = sorted(f.rel for f in index.snapshot.files.values())
    assert "pkg/big.py" not in rels  # over the per-file limit
    assert rels == ["pkg/__init__.py", "pkg/main.py", "pkg/util.py"]  # shallowest first within the total
    index.close()


def test_repository_drafts_and_exclusion(tmp_path: Path) -> None:
    root = make_project(tmp_path)
    index = indexed(root)
    prefix = "def pay(cart):\n    amount = total_price("
    drafts = find_drafts(prefix, "\n", {}, DraftOptions(repo=index.snapshot, include_ngram=False))
    assert [(d.text, d.source, d.origin) for d in drafts] == [
        ("cart.items, tax_rate=0.07)", "lookup:repo", "pkg/main.py:5")
    ]
    exclude = {str(root / "pkg" / "main.py")}
    excluded = find_drafts(
        prefix, "\n", {}, DraftOptions(repo=index.snapshot, include_ngram=False, repo_exclude=exclude)
    )
    assert excluded == []
    index.close()


def test_snippets_resolve_imports_and_stay_in_budget(tmp_path: Path) -> None:
    root = make_project(tmp_path)
    index = indexed(root)
    doc = MAIN + "\n\ndef refund(cart):\n    amount = "
    path = str(root / "pkg" / "main.py")
    snippets = index.snapshot.snippets(doc, 400, document_path=path, document_text=doc)
    assert snippets[0].rel == "pkg/util.py" and snippets[0].why == "import:total_price"
    assert snippets[0].text.startswith("def total_price(items, tax_rate=0.2):")
    assert sum(len(s.text) for s in snippets) <= 400
    assert all(s.rel != "pkg/main.py" for s in snippets)  # never the document itself
    assert index.snapshot.snippets(doc, 0, document_path=path) == []
    section = render_snippets(snippets, "<|endoftext|>")
    assert section.startswith("<|endoftext|># pkg/") and "def total_price(" in section
    index.close()


def test_path_of_file_uris() -> None:
    assert path_of(Path("/tmp/a b/c.py").as_uri()) == os.path.normpath("/tmp/a b/c.py")
    assert path_of("untitled:1") is None


def test_repository_section_goes_first_within_the_budget() -> None:
    text = "import os\n\n\ndef f(x):\n    return x\n" * 30 + "y = f("
    line = text.count("\n")
    preamble = "<|endoftext|># pkg/util.py\ndef helper(a, b):\n    return a + b\n"
    plain = build_context(text, line, 6, COUNTER, 200, ContextOptions(bos_text="<|endoftext|>"))
    ctx = build_context(text, line, 6, COUNTER, 200, ContextOptions(bos_text="<|endoftext|>", preamble=preamble))
    assert ctx.prompt.startswith(preamble + "<|endoftext|>") and ctx.prompt.endswith("y = f(")
    assert len(ctx.prompt_ids) <= 200 and ctx.preamble_tokens == len(COUNTER.encode(preamble + "<|endoftext|>"))
    assert ctx.prompt_ids[: ctx.preamble_tokens] == COUNTER.encode(preamble + "<|endoftext|>")
    assert len(plain.prompt_ids) > len(ctx.prompt_ids) - ctx.preamble_tokens  # the window gave way
    huge = build_context(text, line, 6, COUNTER, 200, ContextOptions(bos_text="<|endoftext|>", preamble=preamble * 20))
    assert huge.preamble_tokens == 0 and huge.prompt == plain.prompt  # over half the budget: left out


@pytest.fixture(scope="module")
def completer() -> Completer:
    c = Completer()
    c.load(None)
    return c


def test_pipeline_uses_the_repository(tmp_path: Path, completer: Completer) -> None:
    """A line that exists only in another file of the workspace becomes a candidate; the prompt
    carries the imported definition; without the index (or with the settings off) neither."""
    root = make_project(tmp_path)
    index = indexed(root)
    doc_path = root / "pkg" / "shop.py"  # the file being written: not on disk yet
    text = "from .util import total_price\n\n\ndef pay(cart):\n    amount = total_price(\n"
    req = CompletionRequest(text, 4, len("    amount = total_price("), uri=doc_path.as_uri(), repo=index.snapshot)
    settings = Settings(min_confidence=0.0)
    result = completer.complete(req, settings)
    assert any(c["source"].startswith("lookup:repo") and c["origin"] == "pkg/main.py:5" for c in result.candidates)
    snippets = result.prompt_info["repo_snippets"]
    assert snippets[0] == {"file": "pkg/util.py", "line": 8, "lines": 3, "why": "import:total_price", "score": 1.0}
    assert result.prompt_info["repo_tokens"] > 0
    completer.forget(req.uri)  # (else the type-ahead cache answers the same cursor)
    off = completer.complete(req, Settings(min_confidence=0.0, repo_lookup=False, repo_context=False))
    assert not any(c["source"].startswith("lookup:repo") for c in off.candidates)
    assert off.prompt_info.get("repo_tokens") == 0 and "repo_snippets" not in off.prompt_info
    index.close()


def test_every_candidate_has_a_calibrated_confidence(completer: Completer) -> None:
    text = "def area(width, height):\n    return width * height\n\n\ndef volume(width, height, depth):\n    return "
    result = completer.complete(CompletionRequest(text, 5, 11), Settings(min_confidence=0.0))
    assert result.candidates and all(0.0 < c["confidence"] < 1.0 for c in result.candidates)
    assert [c["confidence"] for c in result.candidates] == sorted(
        (c["confidence"] for c in result.candidates), reverse=True
    )
    assert all(set(c["features"]) >= {"lp_mean", "src_line", "rejected", "votes"} for c in result.candidates)
