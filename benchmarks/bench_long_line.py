"""Long lines against the real language server: a keystroke's latency, and a small document's.

Starts ``codegen-ls serve`` over stdio (the embedded model unless ``--model``), opens a small
Python file and a file whose one line is ``--mb`` megabytes long (ASCII, or with a non-ASCII
character every 100 characters: ``--text mixed``), then for each run:

1. types one character at the long line's end (``didChange``) and asks for an inline
   completion there: ``long`` is the time until that answer;
2. right behind it, asks for an inline completion in the small file: ``other`` is the time
   until that answer, against ``alone``, the same request with nothing else going on.

Prints one table (medians over ``--runs``)::

    python benchmarks/bench_long_line.py --mb 1 2 5 --text ascii mixed
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from lsp_client import StdioClient

SMALL = (
    "import os\n\n\ndef list_python_files(root):\n    result = []\n    for name in os.listdir(root):\n        if "
    "name.endswith('.py'):\n            result."
)


def inline(uri: str, line: int, character: int) -> dict[str, Any]:
    return {
        "textDocument": {"uri": uri},
        "position": {"line": line, "character": character},
        "context": {"triggerKind": 1},
    }


def run(args: argparse.Namespace, mb: float, text: str) -> dict[str, float]:
    cmd = [sys.executable, "-m", "codegen_ls", "serve", *(["--model", args.model] if args.model else [])]
    c = StdioClient(cmd, args.cwd)
    c.wait(
        c.start(
            "initialize",
            {
                "processId": None,
                "rootUri": None,
                "capabilities": {},
                "initializationOptions": {"codegenLs": {"numCandidates": 1, "maxNewTokens": 8}},
            },
        )
    )
    c.send({"method": "initialized", "params": {}})
    c.ready.wait(120)
    unit = "a" * 99 + ("é" if text == "mixed" else "b")
    body = unit * int(mb * 1e6 / 100)
    long_line = "x = '" + body  # one line, the cursor at its end
    width = len(long_line.encode("utf-16-le")) // 2
    for uri, source in (("file:///small.py", SMALL), ("file:///long.py", long_line)):
        c.send(
            {
                "method": "textDocument/didOpen",
                "params": {"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": source}},
            }
        )
    small_at = inline("file:///small.py", 7, len(SMALL.rsplit("\n", 1)[1]))
    alone, longs, others = [], [], []
    for run_no in range(args.runs):
        t0 = time.perf_counter()
        done, _ = c.wait(c.start("textDocument/inlineCompletion", small_at))
        alone.append(done - t0)
        t0 = time.perf_counter()
        c.send(
            {
                "method": "textDocument/didChange",
                "params": {
                    "textDocument": {"uri": "file:///long.py", "version": run_no + 2},
                    "contentChanges": [
                        {
                            "range": {"start": {"line": 0, "character": width}, "end": {"line": 0, "character": width}},
                            "text": "z",
                        }
                    ],
                },
            }
        )
        width += 1
        long_id = c.start("textDocument/inlineCompletion", inline("file:///long.py", 0, width))
        other_id = c.start("textDocument/inlineCompletion", small_at)
        t_other, _ = c.wait(other_id)
        t_long, reply = c.wait(long_id)
        assert "result" in reply, reply
        longs.append(t_long - t0)
        others.append(t_other - t0)
    c.wait(c.start("shutdown", None))
    c.send({"method": "exit"})
    c.proc.wait(30)
    return {"alone": statistics.median(alone), "long": statistics.median(longs), "other": statistics.median(others)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, nargs="+", default=[1.0, 2.0, 5.0], help="long line sizes in MB")
    p.add_argument("--text", nargs="+", choices=["ascii", "mixed"], default=["ascii", "mixed"])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--model", help="model directory (default: the embedded model)")
    p.add_argument(
        "--cwd",
        type=Path,
        default=Path(__file__).resolve().parent.parent,
        help="run the server from this source tree (default: this checkout)",
    )
    args = p.parse_args()
    print(f"{'line':>8} {'text':>6} {'long ms':>9} {'other ms':>9} {'alone ms':>9}  (medians of {args.runs})")
    for text in args.text:
        for mb in args.mb:
            r = run(args, mb, text)
            print(
                f"{mb:>6g}MB {text:>6} {r['long'] * 1000:>9.0f} {r['other'] * 1000:>9.0f} {r['alone'] * 1000:>9.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
