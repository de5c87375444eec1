"""Repository-level completion quality (CrossCodeEval / RepoBench spirit) on third-party packages.

For each package (an sdist, extracted once under ``--work``) the editor is opened on the project:
a copy of it is the workspace folder, the file under test is deleted from that copy (it exists
only as the open document, with the rest of the cursor line removed), every other file is on
disk. Cursors: a deterministic sample (``--seed``) of ``--n`` non-blank lines of the packages'
source files (tests, docs, examples and ``setup.py`` excluded; the same number per package), the
cursor at a random point between the indentation and the last character; the target is the rest
of the line (as ``eval_completion.py``).

Each cursor runs through :class:`codegen_ls.suggest.pipeline.Completer`, the pipeline the server
uses, with the default settings (``minConfidence`` included, unless ``--min-confidence``), in

single       the document alone (no workspace: what a plain editor buffer gets)
repo         the workspace folder indexed by :class:`codegen_ls.suggest.repo.RepoIndex`, as the
             server indexes ``rootUri`` / ``workspaceFolders``; a tree without it ignores the
             workspace, as earlier servers did
repo-drafts  the same without the prompt's repository section (``repoContext`` off)

The KV cache holds the document up to the start of the cursor line before each request (typing).
Metrics: shown, exact match (first line of the top suggestion == target, trailing spaces
ignored) over all cursors and when shown (precision), edit similarity (difflib ratio, 0 when
nothing is shown) over all cursors and when shown, latency p50 / p90, the top suggestion's source.

``--compare DIR`` runs the same cursors through another source tree too (``DIR`` holds a
``codegen_ls`` package, e.g. a ``git worktree`` of an earlier commit): two worker processes, one
per tree, fed one file's cursors at a time in turn, so the machine's drift falls on both alike.
``--candidates`` keeps every candidate the pipeline ranked, with its features, in ``--out``
(what ``fit_confidence.py`` fits on). Package roles (EVAL / CALIB) come from ``models/recipe/corpus.py``: report
on ``--packages eval``, fit and tune on ``--packages calib``.

    python benchmarks/eval_repo.py --packages eval --n 200 [--compare BEFORE_TREE] [--out F.json]
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODES = ("single", "repo")  # also "repo-drafts": the repository's drafts without the prompt section
MAX_LINE_CHARS = 200
NOT_UNDER_TEST = re.compile(
    r"(^|/)(tests?|testing|docs?|examples?|benchmarks?|_vendor|vendor)(/|$)|(^|/)(test_[^/]*|[^/]*_test|conftest|setup|noxfile|fabfile)\.py$"
)
DEFAULT_SDISTS = ("/work/cache/sdists", "/work/cache/i24/sdists")
THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def recipe_roles() -> dict[str, list[str]]:
    """EVAL / CALIB package names from the training recipe (one list for the whole project)."""
    spec = importlib.util.spec_from_file_location("corpus_recipe", ROOT / "models" / "recipe" / "corpus.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (its dataclasses look their module up)
    spec.loader.exec_module(mod)
    pins = dict(getattr(mod, "PACKAGES", []))
    return {"eval": list(mod.EVAL), "calib": list(mod.CALIB), "pins": pins}  # type: ignore[dict-item]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def find_sdist(name: str, version: str | None, dirs: list[Path]) -> Path:
    found = []
    for d in dirs:
        for p in d.glob("*.tar.gz"):
            stem = p.name[: -len(".tar.gz")]
            pkg, _, ver = stem.rpartition("-")
            if _norm(pkg) == _norm(name):
                found.append((ver == version, ver, p))
    if not found:
        raise SystemExit(
            f"no sdist of {name} in {', '.join(map(str, dirs))} "
            f"(pip download --no-deps --no-binary :all: {name}{'==' + version if version else ''})"
        )
    return max(found)[2]


def extract(sdist: Path, work: Path) -> Path:
    out = work / sdist.name[: -len(".tar.gz")]
    if not out.is_dir():
        work.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=work))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        inner = [p for p in tmp.iterdir() if p.is_dir()]
        (inner[0] if len(inner) == 1 else tmp).rename(out)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def sample_cursors(projects: dict[str, Path], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` cursors, the same number per package (the first packages get the remainder)."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    names = sorted(projects)
    for k, name in enumerate(names):
        root = projects[name]
        want = n // len(names) + (k < n % len(names))
        pool = []
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if NOT_UNDER_TEST.search(rel) or any(part.startswith(".") for part in path.relative_to(root).parts):
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            for i, ln in enumerate(text.split("\n")):
                body = ln.strip()
                if body and len(ln) <= MAX_LINE_CHARS and len(ln.rstrip()) - (len(ln) - len(ln.lstrip())) >= 2:
                    pool.append((rel, i))
        for rel, i in sorted(rng.sample(pool, min(want, len(pool)))):
            line = (root / rel).read_text(encoding="utf-8").split("\n")[i].rstrip()
            indent = len(line) - len(line.lstrip())
            col = rng.randint(indent, len(line) - 1)
            out.append({"package": name, "file": rel, "line": i, "character": col, "target": line[col:]})
    return out


# -- the worker: one source tree, its own workspace copies -------------------------------------


class Worker:
    """Runs cursors through one tree's pipeline (imported after ``--tree`` is on sys.path)."""

    def __init__(self, args: argparse.Namespace) -> None:
        from dataclasses import fields, replace

        from codegen_ls.engine.engine import Engine, EngineOptions
        from codegen_ls.engine.modeldir import resolve_model_dir
        from codegen_ls.settings import Settings
        from codegen_ls.suggest import context as context_mod
        from codegen_ls.suggest import pipeline
        from codegen_ls.suggest.context import TokenCounter, build_context, token_budget

        try:
            from codegen_ls.suggest import repo as repo_mod
        except ImportError:  # an earlier tree: no repository context
            repo_mod = None
        self.args = args
        self.pipeline, self.repo_mod = pipeline, repo_mod
        self.engine = Engine(resolve_model_dir(args.model), EngineOptions(threads=args.threads))
        self.counter = TokenCounter(self.engine.tokenizer)
        self.build_context, self.token_budget = build_context, token_budget
        self.context_options = getattr(context_mod, "ContextOptions", None)  # (an earlier tree: keyword arguments)
        overrides: dict[str, Any] = {"model_path": args.model, "threads": args.threads}
        if args.min_confidence is not None:
            overrides["min_confidence"] = args.min_confidence
        for kv in args.set or []:
            key, _, value = kv.partition("=")
            overrides[key] = json.loads(value)
        names = {f.name for f in fields(Settings)}
        self.settings = replace(Settings(), **{k: v for k, v in overrides.items() if k in names})
        self.replace = replace
        self.req_fields = {f.name for f in fields(pipeline.CompletionRequest)}
        self.completer = pipeline.Completer(engine_loader=lambda path: self.engine)
        self.workspaces: dict[str, tuple[Path, Any]] = {}
        self.tmp = Path(tempfile.mkdtemp(prefix="eval_repo_"))

    def workspace(self, package: str, project: Path) -> tuple[Path, Any]:
        """A copy of the project and (where the tree has one) its index, built once per package."""
        if package not in self.workspaces:
            dst = self.tmp / project.name
            shutil.copytree(project, dst, symlinks=True)
            index = None
            if self.repo_mod is not None:
                index = self.repo_mod.RepoIndex()
                index.add_root(dst.as_uri())
                index.wait_idle(120)
            self.workspaces[package] = (dst, index)
        return self.workspaces[package]

    def run_file(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        project = Path(job["project"])
        ws, index = self.workspace(job["package"], project)
        under_test = ws / job["file"]
        original = under_test.read_text(encoding="utf-8")
        under_test.unlink()  # the file under test exists only as the editor's buffer
        if index is not None:
            index.deleted(str(under_test))
            index.wait_idle(60)
        try:
            return [self.run_cursor(c, original, under_test, index) for c in job["cursors"]]
        finally:
            under_test.write_text(original, encoding="utf-8")
            if index is not None:
                index.changed(str(under_test))
                index.wait_idle(60)

    def run_cursor(self, c: dict[str, Any], original: str, path: Path, index: Any) -> dict[str, Any]:
        lines = original.split("\n")
        lines[c["line"]] = lines[c["line"]].rstrip()[: c["character"]]
        text = "\n".join(lines)
        uri = path.as_uri()
        rec: dict[str, Any] = {k: c[k] for k in ("package", "file", "line", "character", "target")}
        for mode in self.args.modes:
            kw: dict[str, Any] = {"uri": uri}
            if mode.startswith("repo") and index is not None and "repo" in self.req_fields:
                kw["repo"] = index.snapshot
            settings = self.settings
            if mode == "repo-drafts" and hasattr(
                settings, "repo_context"
            ):  # the repository's drafts, no prompt section
                settings = self.replace(settings, repo_context=False)
            req = self.pipeline.CompletionRequest(text, c["line"], c["character"], **kw)
            self.warm(req, settings)
            t0 = time.perf_counter()
            result = self.completer.complete(req, settings)
            ms = (time.perf_counter() - t0) * 1000
            self.completer.forget(uri)
            top = result.suggestions[0] if result.suggestions else None
            first = top.insert_text.split("\n")[0].rstrip() if top else ""
            out = {
                "shown": top is not None,
                "text": first,
                "confidence": top.confidence if top else 0.0,
                "source": top.source if top else "",
                "ms": round(ms, 1),
                "mode": result.mode,
                "exact": top is not None and first == c["target"].rstrip(),
            }
            if self.args.candidates and hasattr(result, "candidates"):
                out["candidates"] = [dict(cand) for cand in result.candidates]
            rec[mode] = out
        return rec

    def warm(self, req: Any, settings: Any) -> None:
        """The KV cache holds the prompt up to the start of the cursor line (earlier keystrokes)."""
        context_of = getattr(self.completer, "context", None)
        if context_of is not None:
            ctx = context_of(req, settings)
        else:
            bos = self.engine.tokenizer.decode([self.engine.eos_id])
            budget = self.token_budget(settings.context_tokens, self.engine.context_length, settings.max_new_tokens)
            section = getattr(self.completer, "_repo_section", None)  # the repository section, where the tree has one
            kw = {"preamble": section(self.engine, self.counter, req, settings, budget)[0]} if section else {}
            where = (req.text, req.line, req.character, self.counter, budget)
            if self.context_options is not None:
                ctx = self.build_context(*where, self.context_options(bos_text=bos, **kw))
            else:
                ctx = self.build_context(*where, bos_text=bos, **kw)
        head = ctx.line_prefix[: len(ctx.line_prefix) - len(ctx.held)]
        upto = len(ctx.prompt_ids) - len(self.counter.encode(head)) - 1 if head else len(ctx.prompt_ids) - 1
        if upto > 0:
            self.engine.forward(ctx.prompt_ids[:upto], req.uri)

    def close(self) -> None:
        for _, index in self.workspaces.values():
            if index is not None:
                index.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def worker_main(args: argparse.Namespace) -> int:
    """``--worker``: JSON lines in (file jobs), JSON lines out (their records)."""
    w = Worker(args)
    out = sys.stdout
    sys.stdout = sys.stderr
    print(json.dumps({"ready": True}), file=out, flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        print(json.dumps(w.run_file(job)), file=out, flush=True)
    w.close()
    return 0


class Remote:
    def __init__(self, tree: str | None, argv: list[str]) -> None:
        env = dict(os.environ)
        if tree:
            env["PYTHONPATH"] = os.pathsep.join([tree, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tree or os.getcwd(),
        )
        assert json.loads(self.proc.stdout.readline()).get("ready")  # type: ignore[union-attr]

    def run_file(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("worker died")
        return json.loads(line)  # type: ignore[no-any-return]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# -- summaries ---------------------------------------------------------------------------------


def _sim(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a.rstrip(), b.rstrip()).ratio()


def summarize(records: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    outs = [(r[mode], r["target"]) for r in records if mode in r]
    n = len(outs)
    shown = [(o, t) for o, t in outs if o["shown"]]
    em = sum(o["exact"] for o, _ in outs)
    sims = [_sim(o["text"], t) for o, t in shown]
    ms = sorted(o["ms"] for o, _ in outs)
    sources: dict[str, list[int]] = {}
    for o, _ in shown:
        s = sources.setdefault(o["source"].split("+")[0], [0, 0])
        s[0] += 1
        s[1] += o["exact"]
    return {
        "n": n,
        "shown": len(shown),
        "shown_rate": _r(len(shown), n),
        "exact_match": _r(em, n),
        "precision": _r(em, len(shown)),
        "edit_similarity": _r(sum(sims), n),
        "edit_similarity_shown": _r(sum(sims), len(shown)),
        "p50_ms": round(statistics.median(ms), 1) if ms else 0.0,
        "p90_ms": round(ms[min(len(ms) - 1, int(0.9 * len(ms)))], 1) if ms else 0.0,
        "top_sources": {k: {"shown": v[0], "exact": v[1]} for k, v in sorted(sources.items())},
    }


def curve(records: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Precision / coverage of the top suggestion as the confidence threshold rises."""
    outs = [r[mode] for r in records if mode in r]
    rows = []
    for th in THRESHOLDS:
        kept = [o for o in outs if o["shown"] and o["confidence"] >= th]
        rows.append(
            {
                "min_confidence": th,
                "shown_rate": _r(len(kept), len(outs)),
                "precision": _r(sum(o["exact"] for o in kept), len(kept)),
                "exact_match": _r(sum(o["exact"] for o in kept), len(outs)),
            }
        )
    return rows


def _r(a: float, b: float) -> float:
    return round(a / b, 4) if b else 0.0


def table(results: dict[str, dict[str, Any]]) -> str:
    head = (
        "| tree | mode | n | shown | EM | precision (EM when shown) | edit sim | edit sim shown | p50 ms | p90 ms |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = [
        f"| {k.split('/')[0]} | {k.split('/')[1]} | {r['n']} | {r['shown_rate']:.1%} | {r['exact_match']:.1%} | "
        f"{r['precision']:.1%} | {r['edit_similarity']:.3f} | {r['edit_similarity_shown']:.3f} | "
        f"{r['p50_ms']:.0f} | {r['p90_ms']:.0f} |"
        for k, r in results.items()
    ]
    return "\n".join([head, *rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--packages", default="eval", help="eval | calib | comma-separated names (default eval)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--model", default=None, help="model directory (default: $CODEGEN_LS_MODEL, then the embedded one)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--min-confidence", type=float, default=None, help="override the default minConfidence")
    ap.add_argument("--set", action="append", help="another setting, snake_case=JSON (repeatable)")
    ap.add_argument("--sdists", action="append", default=None, help="folder of sdists (repeatable)")
    ap.add_argument("--work", type=Path, default=Path("/work/cache/eval_repo"), help="where sdists are extracted")
    ap.add_argument("--compare", default=None, metavar="TREE", help="also run a tree holding an earlier codegen_ls")
    ap.add_argument(
        "--after",
        default=None,
        metavar="TREE",
        help="with --compare: the tree of the 'after' rows (default: this checkout)",
    )
    ap.add_argument("--tree", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--candidates", action="store_true", help="keep every ranked candidate with its features in --out")
    ap.add_argument("--out", type=Path, default=None, help="results and every cursor as JSON")
    args = ap.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.worker:
        return worker_main(args)

    roles = recipe_roles()
    names = roles[args.packages] if args.packages in ("eval", "calib") else args.packages.split(",")
    banned = {"click", "requests", "pip"}
    if banned & {_norm(n) for n in names}:
        raise SystemExit("click, requests and pip are reserved for the final evaluation")
    dirs = [Path(d) for d in (args.sdists or DEFAULT_SDISTS) if Path(d).is_dir()]
    projects = {n: extract(find_sdist(n, roles["pins"].get(n), dirs), args.work) for n in names}
    # type: ignore[union-attr]
    cursors = sample_cursors(projects, args.n, args.seed)
    jobs: list[dict[str, Any]] = []
    for c in cursors:
        if not jobs or (jobs[-1]["package"], jobs[-1]["file"]) != (c["package"], c["file"]):
            jobs.append(
                {"package": c["package"], "project": str(projects[c["package"]]), "file": c["file"], "cursors": []}
            )
        jobs[-1]["cursors"].append(c)
    print(
        f"{len(cursors)} cursors in {len(jobs)} files of {', '.join(projects)}; modes {', '.join(args.modes)}",
        file=sys.stderr,
    )

    passthrough = ["--modes", ",".join(args.modes), "--threads", str(args.threads)]
    model = args.model or os.environ.get("CODEGEN_LS_MODEL") or str(ROOT / "models" / "codegen-ls-small")
    passthrough += ["--model", str(Path(model).resolve())]
    if args.min_confidence is not None:
        passthrough += ["--min-confidence", str(args.min_confidence)]
    for kv in args.set or []:
        passthrough += ["--set", kv]
    trees: dict[str, Any] = {}
    if args.compare:
        trees["before"] = Remote(str(Path(args.compare).resolve()), passthrough)
        trees["after"] = Remote(
            str(Path(args.after).resolve()) if args.after else str(ROOT),
            passthrough + (["--candidates"] if args.candidates else []),
        )
    else:
        trees["now"] = Worker(args)
    records: dict[str, list[dict[str, Any]]] = {t: [] for t in trees}
    # each file's records are appended to OUT.partial.jsonl as they come, and a run started again
    # with the same arguments goes on from there
    partial = args.out.with_suffix(".partial.jsonl") if args.out else None
    finished: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    if partial is not None and partial.is_file():
        for line in partial.read_text().splitlines():
            entry = json.loads(line)
            finished[(entry["tree"], entry["package"], entry["file"])] = entry["records"]
    t0 = time.perf_counter()
    done = 0
    for job in jobs:
        for t, w in trees.items():
            key = (t, job["package"], job["file"])
            if key not in finished:
                finished[key] = w.run_file(job)
                if partial is not None:
                    with partial.open("a") as f:
                        f.write(
                            json.dumps(
                                {"tree": t, "package": job["package"], "file": job["file"], "records": finished[key]}
                            )
                            + "\n"
                        )
            records[t] += finished[key]
        done += len(job["cursors"])
        print(f"  {done}/{len(cursors)}  {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    for w in trees.values():
        w.close()

    results = {f"{t}/{m}": summarize(records[t], m) for t in trees for m in args.modes}
    curves = {f"{t}/{m}": curve(records[t], m) for t in trees for m in args.modes}
    print(table(results))
    for k, rows in curves.items():
        print(
            f"\n{k}: "
            + "  ".join(
                f"≥{r['min_confidence']:.1f}: {r['shown_rate']:.0%} shown, {r['precision']:.0%} right" for r in rows
            )
        )
    for k, r in results.items():
        print(f"{k} top sources: " + ", ".join(f"{s} {v['exact']}/{v['shown']}" for s, v in r["top_sources"].items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "config": {k: str(v) for k, v in vars(args).items()},
                    "results": results,
                    "curves": curves,
                    "records": records,
                },
                indent=1,
            )
            + "\n"
        )
        if partial is not None:
            partial.unlink(missing_ok=True)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
