"""Completion quality on held-out code: exact match of the rest of the line, per pipeline mode.

Documents (``--source``): ``stdlib``, the held-out stdlib modules of the training recipe (``HELDOUT`` in
``models/recipe/train.py``; never trained on), read from this interpreter's stdlib; or ``packages``,
the third-party packages the recipe holds out for evaluation (``EVAL`` in ``models/recipe/corpus.py``:
never trained on, never used for fitting), read from the corpus cache (``--corpus``, built by
``python models/recipe/corpus.py --cache DIR``). ``--fim off`` sends prefix-only prompts to a FIM model. A
deterministic sample (``--seed``) of ``--n`` cursors: a random non-blank line (uniform over all
lines of all files), the cursor at a random point between its indentation and its last
character. The rest of the line is the *target* and is deleted from the document (the lines
after it stay), as if the user were typing that line.

Modes (each through :class:`codegen_ls.suggest.pipeline.Completer` unless said otherwise):

greedy       one greedy candidate, no lookup (ranking cannot reorder a single candidate), minConfidence 0
ranked       ``numCandidates`` model candidates + ranking, no lookup
lookup-only  the lookup's best draft, unverified, no model (:func:`codegen_ls.suggest.drafts.lookup_only`)
combined     ranked + model-verified lookup candidates

Metrics: exact match (first line of the top suggestion == target, trailing whitespace ignored),
edit similarity (``difflib`` ratio), shown rate, EM when shown, what confidence thresholds
suppress (right vs wrong suggestions), latency per request (median, p90).

Latency is measured in the typing situation by default: before the timed requests the KV cache
holds the document up to the start of the cursor line (as after earlier keystrokes). ``--cold``
drops the cache instead (first request at a new place).

    python benchmarks/eval_completion.py [--n 200] [--seed 0] [--out eval.json] [--modes greedy,ranked]
        [--source stdlib|packages --corpus DIR] [--fim on|off]
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import random
import statistics
import sys
import sysconfig
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from codegen_ls.engine.engine import Engine, EngineOptions
from codegen_ls.engine.modeldir import resolve_model_dir
from codegen_ls.settings import Settings
from codegen_ls.suggest.context import ContextOptions, TokenCounter, build_context, fim_suffix_budget, token_budget
from codegen_ls.suggest.mode import decide_mode
from codegen_ls.suggest.pipeline import Completer, CompletionRequest

try:
    from codegen_ls.suggest import drafts as lookup
except ImportError:  # optional module
    lookup = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parents[1]
MODES = ("greedy", "ranked", "lookup-only", "combined")
THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.5)
MAX_LINE_CHARS = 200  # longer lines are not sampled (minified data, long strings)


@dataclass
class Sample:
    path: str  # relative to the stdlib
    line: int  # 0-based
    character: int
    target: str
    text: str  # the document with the target deleted

    def request(self, uri: str) -> CompletionRequest:
        return CompletionRequest(self.text, self.line, self.character, uri=uri)


@dataclass
class Outcome:
    shown: bool
    text: str  # first line of the top suggestion ("" when none)
    confidence: float
    ms: float
    source: str = ""
    mode: str = ""

    def exact(self, target: str) -> bool:
        return self.shown and self.text.rstrip() == target

    def similarity(self, target: str) -> float:
        return difflib.SequenceMatcher(None, self.text.rstrip(), target).ratio() if self.shown else 0.0


@dataclass
class Tally:
    outcomes: list[tuple[Outcome, str]] = field(default_factory=list)  # (outcome, target)

    def summary(self, with_thresholds: bool) -> dict[str, Any]:
        n = len(self.outcomes)
        shown = [(o, t) for o, t in self.outcomes if o.shown]
        em = sum(o.exact(t) for o, t in self.outcomes)
        ms = sorted(o.ms for o, _ in self.outcomes)
        out: dict[str, Any] = {
            "n": n,
            "shown": len(shown),
            "shown_rate": _ratio(len(shown), n),
            "exact_match": _ratio(em, n),
            "exact_match_when_shown": _ratio(em, len(shown)),
            "edit_similarity": _ratio(sum(o.similarity(t) for o, t in self.outcomes), n),
            "edit_similarity_when_shown": _ratio(sum(o.similarity(t) for o, t in shown), len(shown)),
            "latency_ms_median": round(statistics.median(ms), 1) if ms else 0.0,
            "latency_ms_p90": round(ms[min(len(ms) - 1, int(0.9 * len(ms)))], 1) if ms else 0.0,
        }
        if with_thresholds:
            rows = []
            for th in THRESHOLDS:
                kept = [(o, t) for o, t in shown if o.confidence >= th]
                dropped = [(o, t) for o, t in shown if o.confidence < th]
                rows.append(
                    {
                        "threshold": th,
                        "shown_rate": _ratio(len(kept), n),
                        "exact_match_when_shown": _ratio(sum(o.exact(t) for o, t in kept), len(kept)),
                        "suppressed_right": sum(o.exact(t) for o, t in dropped),
                        "suppressed_wrong": sum(not o.exact(t) for o, t in dropped),
                    }
                )
            out["thresholds"] = rows
        return out


def _ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else 0.0


def heldout_files(include_tests: bool) -> list[Path]:
    """The held-out modules' files in this interpreter's stdlib (their tests only if asked)."""
    spec = importlib.util.spec_from_file_location("train_recipe", ROOT / "models" / "recipe" / "train.py")
    assert spec is not None and spec.loader is not None
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in ("site-packages", "dist-packages") or "__pycache__" in rel.parts:
            continue
        if recipe.is_heldout(rel) and (include_tests or not ("test" in rel.parts or "tests" in rel.parts)):
            files.append(path)
    return files


def package_texts(corpus: Path) -> dict[str, str]:
    """``pkg/path`` -> text of the corpus's evaluation split (the recipe's EVAL packages)."""
    out = {}
    for line in (corpus / "files.jsonl").read_text(encoding="utf-8").splitlines():
        d = json.loads(line)
        if d["split"] == "eval":
            out[f"{d['pkg']}/{d['path']}"] = d["text"]
    return out


def sample_cursors(files: list[Path] | dict[str, str], n: int, seed: int) -> list[Sample]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: dict[Any, str] = (
        files if isinstance(files, dict) else {p: p.read_text(encoding="utf-8", errors="replace") for p in files}
    )
    pool = [
        (p, i)
        for p, t in texts.items()
        for i, ln in enumerate(t.split("\n"))
        if ln.strip() and len(ln) <= MAX_LINE_CHARS and len(ln.rstrip()) - (len(ln) - len(ln.lstrip())) >= 2
    ]
    rng = random.Random(seed)
    picked = sorted(rng.sample(pool, min(n, len(pool))), key=lambda x: (str(x[0]), x[1]))
    samples = []
    for path, i in picked:
        lines = texts[path].split("\n")
        line = lines[i].rstrip()
        indent = len(line) - len(line.lstrip())
        col = rng.randint(indent, len(line) - 1)
        lines[i] = line[:col]
        name = str(path.relative_to(root)) if isinstance(path, Path) else path
        samples.append(Sample(name, i, col, line[col:], "\n".join(lines)))
    rng.shuffle(samples)
    return samples


def warm(engine: Engine, counter: TokenCounter, sample: Sample, settings: Settings, key: str) -> None:
    """Put the document up to the start of the cursor line in the KV cache under ``key`` (typing)."""
    bos = engine.tokenizer.decode([engine.eos_id])
    budget = token_budget(settings.context_tokens, engine.context_length, settings.max_new_tokens)
    ctx = build_context(
        sample.text,
        sample.line,
        sample.character,
        counter,
        budget,
        ContextOptions(bos_text=bos, fim_budget=fim_suffix_budget(budget) if settings.fim and engine.fim else 0),
    )
    head = ctx.line_prefix[: len(ctx.line_prefix) - len(ctx.held)]
    upto = len(ctx.prompt_ids) - len(counter.encode(head)) - 1 if head else len(ctx.prompt_ids) - 1
    if upto > 0:
        engine.forward(ctx.prompt_ids[:upto], key)


def share_cache(engine: Engine, src: str, dst: str) -> None:
    """Give ``dst`` the KV snapshot of ``src`` (snapshots are never modified in place)."""
    engine.cache.drop(dst)
    snap = engine.cache.get(src)
    if snap is not None:
        engine.cache.put(dst, snap)


def run_completer(completer: Completer, sample: Sample, settings: Settings, uri: str) -> Outcome:
    t0 = time.perf_counter()
    result = completer.complete(sample.request(uri), settings)
    ms = (time.perf_counter() - t0) * 1000
    if not result.suggestions:
        return Outcome(False, "", 0.0, ms, mode=result.mode)
    best = result.suggestions[0]
    return Outcome(True, best.insert_text.split("\n")[0].rstrip("\r"), best.confidence, ms, best.source, result.mode)


def run_lookup_only(counter: TokenCounter, sample: Sample) -> Outcome:
    assert lookup is not None
    t0 = time.perf_counter()
    ctx = build_context(sample.text, sample.line, sample.character, counter, 256)
    mode, _ = decide_mode(ctx)
    draft = None
    if mode != "none":
        draft = lookup.lookup_only(sample.text[: ctx.cursor], sample.text[ctx.cursor :], {}, multiline=mode == "multi")
    ms = (time.perf_counter() - t0) * 1000
    if not draft or not draft.strip():
        return Outcome(False, "", 0.0, ms, mode=mode)
    return Outcome(True, draft.split("\n")[0], 1.0, ms, "lookup", mode)


def markdown(results: dict[str, dict[str, Any]]) -> str:
    head = (
        "| mode | n | shown | EM | EM when shown | edit sim | edit sim when shown | p50 ms | p90 ms |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = [
        f"| {m} | {r['n']} | {r['shown_rate']:.1%} | {r['exact_match']:.1%} | {r['exact_match_when_shown']:.1%} | "
        f"{r['edit_similarity']:.3f} | {r['edit_similarity_when_shown']:.3f} | {r['latency_ms_median']:.0f} | "
        f"{r['latency_ms_p90']:.0f} |"
        for m, r in results.items()
    ]
    out = [head, *rows]
    th = [(m, t) for m, r in results.items() for t in r.get("thresholds", [])]
    if th:
        out += [
            "",
            "| mode | min confidence | shown | EM when shown | suppressed right | suppressed wrong |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        out += [
            f"| {m} | {t['threshold']} | {t['shown_rate']:.1%} | {t['exact_match_when_shown']:.1%} | "
            f"{t['suppressed_right']} | {t['suppressed_wrong']} |"
            for m, t in th
        ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200, help="cursors (default 200)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="model directory (default: $CODEGEN_LS_MODEL, then the embedded one)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=Settings.max_new_tokens)
    ap.add_argument("--num-candidates", type=int, default=Settings.num_candidates)
    ap.add_argument("--context-tokens", type=int, default=Settings.context_tokens)
    ap.add_argument("--deadline-ms", type=int, default=Settings.deadline_ms)
    ap.add_argument("--cold", action="store_true", help="empty KV cache before every request")
    ap.add_argument("--include-tests", action="store_true", help="also the held-out modules' test files")
    ap.add_argument("--out", type=Path, default=None, help="write the results (and every sample) as JSON")
    ap.add_argument(
        "--source",
        choices=("stdlib", "packages"),
        default="stdlib",
        help="held-out stdlib modules, or the recipe's held-out third-party packages (--corpus)",
    )
    ap.add_argument("--corpus", type=Path, default=ROOT / "build" / "corpus", help="corpus.py's cache folder")
    ap.add_argument("--fim", choices=("on", "off"), default="on", help="fill-in-the-middle prompts (FIM models)")
    args = ap.parse_args(argv)

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown mode(s): {', '.join(unknown)}")
    if lookup is None:
        modes = [m for m in modes if m not in ("lookup-only", "combined")]

    files = heldout_files(args.include_tests) if args.source == "stdlib" else package_texts(args.corpus)
    samples = sample_cursors(files, args.n, args.seed)
    engine = Engine(resolve_model_dir(args.model), EngineOptions(threads=args.threads))
    counter = TokenCounter(engine.tokenizer)
    base = Settings(
        model_path=args.model,
        max_new_tokens=args.max_new_tokens,
        num_candidates=args.num_candidates,
        context_tokens=args.context_tokens,
        deadline_ms=args.deadline_ms,
        threads=args.threads,
        fim=args.fim == "on",
        latency_target_ms=0,
    )  # fixed budgets: no per-machine sizing
    settings = {
        "greedy": replace(base, num_candidates=1, lookup=False, min_confidence=0.0),  # the model alone, always shown
        "ranked": replace(base, lookup=False),
        "combined": replace(base, lookup=True, lookup_other_documents=False),
    }
    completers = {m: Completer(engine_loader=lambda path: engine) for m in settings}
    tallies = {m: Tally() for m in modes}
    records = []
    print(f"{len(samples)} cursors in {len(files)} held-out files; modes {', '.join(modes)}", file=sys.stderr)
    t_start = time.perf_counter()
    for i, s in enumerate(samples):
        rec: dict[str, Any] = {"file": s.path, "line": s.line + 1, "column": s.character + 1, "target": s.target}
        key = f"eval:{i}"
        if not args.cold:
            warm(engine, counter, s, base, key)
        for m in modes:
            if m == "lookup-only":
                out = run_lookup_only(counter, s)
            else:
                uri = f"eval:{i}:{m}"
                share_cache(engine, key, uri)  # every mode starts from the same cache
                out = run_completer(completers[m], s, settings[m], uri)
                engine.cache.drop(uri)
            tallies[m].outcomes.append((out, s.target))
            rec[m] = {
                "text": out.text,
                "shown": out.shown,
                "confidence": round(out.confidence, 4),
                "ms": round(out.ms, 1),
                "source": out.source,
                "mode": out.mode,
                "exact": out.exact(s.target),
            }
        engine.cache.drop(key)
        records.append(rec)
        if (i + 1) % 10 == 0:
            print(f"  {i + 1}/{len(samples)}  {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    results = {m: tallies[m].summary(with_thresholds=m != "lookup-only") for m in modes}
    print(markdown(results))
    if args.out:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        config["model_dir"] = str(engine.model_dir)
        args.out.write_text(json.dumps({"config": config, "results": results, "samples": records}, indent=1) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
