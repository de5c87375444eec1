"""Perceived latency: a typing replay against the real language server over stdio.

A reader opens a Python file of about ``--doc-tokens`` tokens (the start of a stdlib module, the
cursor at its end, on the next line's indentation), reads for ``--read-s`` seconds, then types
the module's next lines one character a keystroke (``--interval-ms`` apart, or when the previous
answer arrived if that is later), asking for inline completions after every keystroke as an
editor does. In each cycle the typist types ``--type-chars`` characters, accepts the suggestion on
screen after reading it for ``--accept-pause-ms`` (the edit, then the item's ``command`` when it
has one, then a request at the new cursor at once, as VS Code asks after an accept), types ``--along`` characters
along the new suggestion, and presses Enter (the next real line's indentation), for ``--cycles`` cycles.

Printed per run and per server tree (``--tree NAME=DIR``, repeatable: each tree's code serves,
started with ``PYTHONPATH=DIR``; runs alternate between the trees, so the machine's drift lands
on both): the time to the first suggestion, the latency after each accept, the share of
keystrokes answered from a cache (a suggestion in under ``--cache-ms``: no model run), and p50 /
p95 of the requests that needed the model. Every run starts a fresh server (a cold first
request). Example (a before tree from ``git worktree add``, plus its compiled kernel)::

    git worktree add /work/cache/tree-before <commit> && cp codegen_ls/_decode_attention*.so
    /work/cache/tree-before/codegen_ls/
    python benchmarks/bench_typing.py --model /work/cache/model-350m --tree before=/work/cache/tree-before --tree
    after=. --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lsp_client import StdioClient

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Record:
    phase: str  # first | type | accept | along | enter
    ms: float
    items: int
    text: str = ""  # the top item's insert text


@dataclass
class Run:
    tree: str
    load_s: float
    records: list[Record] = field(default_factory=list)
    busy: float = 0.0


class Document:
    """The text the client holds, edited at the cursor (one line per list item, LF ends)."""

    def __init__(self, uri: str, text: str, client: StdioClient) -> None:
        self.uri, self.text, self.client, self.version = uri, text, client, 1
        client.notify(
            "textDocument/didOpen", {"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": text}}
        )

    @property
    def cursor(self) -> tuple[int, int]:  # at the end of the text (the replay types at the end)
        lines = self.text.split("\n")
        return len(lines) - 1, utf16(lines[-1])

    def insert(self, new: str) -> None:
        line, col = self.cursor
        self.version += 1
        self.text += new
        rng = {"start": {"line": line, "character": col}, "end": {"line": line, "character": col}}
        self.client.notify(
            "textDocument/didChange",
            {
                "textDocument": {"uri": self.uri, "version": self.version},
                "contentChanges": [{"range": rng, "text": new}],
            },
        )

    def complete(self) -> tuple[float, list[dict[str, Any]]]:
        line, col = self.cursor
        dt, reply = self.client.request(
            "textDocument/inlineCompletion",
            {
                "textDocument": {"uri": self.uri},
                "position": {"line": line, "character": col},
                "context": {"triggerKind": 2},
            },
        )
        result = reply.get("result") or {}
        items = result.get("items", []) if isinstance(result, dict) else result
        return dt * 1000, items


def utf16(s: str) -> int:
    return len(s.encode("utf-16-le")) // 2


def source_text(module: str, doc_tokens: int, model: str) -> tuple[str, list[str]]:
    """(the opened text: about ``doc_tokens`` tokens of the module, ending on the next line's
    indentation; the lines the typist types after it)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model) / "tokenizer.json"))
    lines = (Path(sysconfig.get_paths()["stdlib"]) / module).read_text().splitlines()
    n, total = 0, 0
    while n < len(lines) and total + len(tok.encode(lines[n] + "\n").ids) <= doc_tokens:
        total += len(tok.encode(lines[n] + "\n").ids)
        n += 1
    rest = [ln for ln in lines[n:] if ln.strip()][:64]
    indent = rest[0][: len(rest[0]) - len(rest[0].lstrip())]
    return "\n".join(lines[:n]) + "\n" + indent, rest


def replay(client: StdioClient, args: argparse.Namespace, text: str, lines: list[str]) -> list[Record]:
    doc = Document("file:///work/replay.py", text, client)
    records: list[Record] = []
    last = [time.perf_counter()]

    def keystroke(chars: str, phase: str) -> list[dict[str, Any]]:
        wait = last[0] + args.interval_ms / 1000 - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        last[0] = time.perf_counter()
        doc.insert(chars)
        ms, items = doc.complete()
        records.append(Record(phase, ms, len(items), items[0]["insertText"] if items else ""))
        return items

    time.sleep(args.read_s)  # the reader reads
    line_no = 0
    target = lines[0].lstrip()
    items = keystroke(target[0], "first")
    typed = 1
    for _ in range(args.cycles):
        while typed < min(args.type_chars, len(target)):  # type the real line
            items = keystroke(target[typed], "type")
            typed += 1
        if items:  # accept what is shown (after reading it): the edit, its command, the request at the new cursor
            top = items[0]
            time.sleep(args.accept_pause_ms / 1000)
            last[0] = time.perf_counter()
            doc.insert(top["insertText"])
            if isinstance(top.get("command"), dict):
                client.request(
                    "workspace/executeCommand",
                    {"command": top["command"]["command"], "arguments": top["command"].get("arguments", [])},
                )
            ms, items = doc.complete()
            records.append(Record("accept", ms, len(items), items[0]["insertText"] if items else ""))
        for _ in range(args.along):  # agree with the new suggestion for a few characters
            if not items or not items[0]["insertText"].strip():
                break
            first = items[0]["insertText"][0]
            if first == "\n":
                break
            items = keystroke(first, "along")
        line_no += 1
        target = lines[line_no % len(lines)]
        indent = target[: len(target) - len(target.lstrip())]
        target = target.lstrip()
        items = keystroke("\n" + indent + target[0], "enter")  # Enter (auto-indent) and a first character
        typed = 1
    client.notify("textDocument/didClose", {"textDocument": {"uri": doc.uri}})
    return records


def busy_fraction(seconds: float = 1.0) -> float:
    def sample() -> tuple[int, int]:
        cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(cpu) - cpu[3] - cpu[4], sum(cpu)

    b0, t0 = sample()
    time.sleep(seconds)
    b1, t1 = sample()
    return (b1 - b0) / max(1, t1 - t0)


def run_once(tree: str, directory: Path, args: argparse.Namespace, text: str, lines: list[str]) -> Run:
    env = {k: v for k, v in os.environ.items() if k != "CODEGEN_LS_MODEL"}
    env["PYTHONPATH"] = str(directory)
    busy = busy_fraction()
    client = StdioClient([sys.executable, "-m", "codegen_ls", "serve", "--model", args.model], str(directory), env)
    t0 = time.perf_counter()
    try:
        client.request(
            "initialize",
            {
                "processId": os.getpid(),
                "rootUri": None,
                "capabilities": {"workspace": {"configuration": True}, "window": {"workDoneProgress": True}},
                "initializationOptions": {"codegenLs": json.loads(args.settings)},
            },
        )
        client.notify("initialized", {})
        client.wait_state("ready")
        run = Run(tree, time.perf_counter() - t0, busy=busy)
        run.records = replay(client, args, text, lines)
    finally:
        client.close()
    return run


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summary(run: Run, cache_ms: float) -> dict[str, Any]:
    recs = run.records
    keys = [r for r in recs if r.phase != "first"]
    cached = [r for r in keys if r.items and r.ms < cache_ms]
    model = [r.ms for r in recs if r.ms >= cache_ms]
    accept = [r.ms for r in recs if r.phase == "accept"]
    first = recs[0]
    return {
        "first_ms": first.ms,
        "first_items": first.items,
        "accept_ms": accept,
        "accept_p50": statistics.median(accept) if accept else float("nan"),
        "cache_share": len(cached) / max(1, len(keys)),
        "keystrokes": len(keys),
        "shown_share": sum(1 for r in keys if r.items) / max(1, len(keys)),
        "model_n": len(model),
        "model_p50": pct(model, 0.5),
        "model_p95": pct(model, 0.95),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="exported model directory")
    ap.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a source tree to serve from (repeatable; default: this repository)",
    )
    ap.add_argument("--runs", type=int, default=2, help="runs per tree, alternating")
    ap.add_argument("--module", default="argparse.py", help="stdlib module the document is taken from")
    ap.add_argument("--doc-tokens", type=int, default=1024)
    ap.add_argument("--read-s", type=float, default=2.0, help="pause after opening, before the first keystroke")
    ap.add_argument("--interval-ms", type=float, default=150, help="between keystrokes (or the answer, if later)")
    ap.add_argument("--cycles", type=int, default=6)
    ap.add_argument("--type-chars", type=int, default=5, help="characters of the real line typed before accepting")
    ap.add_argument("--accept-pause-ms", type=float, default=400, help="reading a suggestion before accepting it")
    ap.add_argument("--along", type=int, default=3, help="characters typed along the suggestion after an accept")
    ap.add_argument("--cache-ms", type=float, default=30.0, help="answers with items faster than this: from a cache")
    ap.add_argument("--settings", default="{}", help="codegenLs settings (JSON) sent at initialize")
    ap.add_argument("--json", action="store_true", help="also print every request as JSON lines")
    args = ap.parse_args()
    trees = [(t.split("=", 1)[0], Path(t.split("=", 1)[1]).resolve()) for t in args.tree] or [("this", REPO)]
    text, lines = source_text(args.module, args.doc_tokens, args.model)
    print(
        f"document: {args.module}, {len(text)} chars, {text.count(chr(10)) + 1} lines (~{args.doc_tokens} tokens); "
        f"read {args.read_s} s; keystrokes every {args.interval_ms:.0f} ms; {args.cycles} accepts; "
        f"cache = a suggestion in < {args.cache_ms:.0f} ms; {os.cpu_count()} cores",
        flush=True,
    )
    runs: list[Run] = []
    for i in range(args.runs):
        for name, directory in trees:
            run = run_once(name, directory, args, text, lines)
            runs.append(run)
            s = summary(run, args.cache_ms)
            print(
                f"run {i + 1} {name:>8}: load {run.load_s:.1f} s, machine busy {run.busy:.0%} before | first "
                "suggestion "
                f"{s['first_ms']:.0f} ms ({s['first_items']} items) | after accept "
                f"{', '.join(f'{x:.0f}' for x in s['accept_ms'])} ms | from cache {s['cache_share']:.0%} of "
                f"{s['keystrokes']} keystrokes (shown {s['shown_share']:.0%}) | model requests n={s['model_n']} "
                f"p50 {s['model_p50']:.0f} p95 {s['model_p95']:.0f} ms",
                flush=True,
            )
            if args.json:
                for r in run.records:
                    print(json.dumps({"tree": name, "run": i + 1, **r.__dict__}))
    print("\n| tree | first suggestion ms | after accept p50 ms | from cache | model p50 ms | model p95 ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, _ in trees:
        ss = [summary(r, args.cache_ms) for r in runs if r.tree == name]
        fmt = lambda key, f="{:.0f}": ", ".join(f.format(s[key]) for s in ss)  # noqa: E731
        print(
            f"| {name} | {fmt('first_ms')} | {fmt('accept_p50')} | {fmt('cache_share', '{:.0%}')} | "
            f"{fmt('model_p50')} | {fmt('model_p95')} |"
        )


if __name__ == "__main__":
    main()
