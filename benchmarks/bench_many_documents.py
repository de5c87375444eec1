"""The language server's memory with many documents: RSS as documents are opened and completed.

Starts ``codegen-ls serve`` over stdio (the embedded model unless ``--model``), opens ``--docs``
Python files of ``--kb`` kilobytes each (distinct text, stdlib-like), asks for an inline completion
at the end of each (so each gets its own KV snapshot in the prompt cache), and prints the server's
RSS and high-water mark (``/proc/PID/status``) every ``--every`` documents::

    python benchmarks/bench_many_documents.py --docs 100 --kb 200
    python benchmarks/bench_many_documents.py --docs 100 --kb 200 --settings '{"promptCacheMb": 512}'
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lsp_client import StdioClient  # noqa: E402


def document(i: int, kb: int) -> str:
    parts, size = [], 0
    j = 0
    while size < kb * 1000:
        block = (
            f"def handler_{i}_{j}(request, limit={j % 97}):\n"
            f'    """Handle request {i}.{j} and return its result."""\n'
            f"    items = [x * {j % 13} for x in range(limit) if x % {1 + j % 7} == 0]\n"
            f"    return {{'id': {i * 100_000 + j}, 'items': items, 'total': sum(items)}}\n\n\n"
        )
        parts.append(block)
        size += len(block)
        j += 1
    return "".join(parts) + f"def final_{i}(values):\n    result = "


def status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) // 1024
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=100)
    p.add_argument("--kb", type=int, default=200, help="size of each document")
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--settings", default="{}", help="codegenLs settings (JSON)")
    p.add_argument("--model", help="model directory (default: the embedded model)")
    p.add_argument("--cwd", type=Path, default=Path(__file__).resolve().parent.parent)
    args = p.parse_args()
    cmd = [sys.executable, "-m", "codegen_ls", "serve", *(["--model", args.model] if args.model else [])]
    c = StdioClient(cmd, args.cwd)
    options: dict[str, Any] = {"numCandidates": 1, **json.loads(args.settings)}
    c.wait(
        c.start(
            "initialize",
            {"processId": None, "rootUri": None, "capabilities": {}, "initializationOptions": {"codegenLs": options}},
        )
    )
    c.send({"method": "initialized", "params": {}})
    c.ready.wait(120)
    print(f"settings {options}; after load: {status(c.proc.pid)} MB", flush=True)
    for i in range(args.docs):
        uri, text = f"file:///doc{i}.py", document(i, args.kb)
        c.send(
            {
                "method": "textDocument/didOpen",
                "params": {"textDocument": {"uri": uri, "languageId": "python", "version": 1, "text": text}},
            }
        )
        lines = text.split("\n")
        c.wait(
            c.start(
                "textDocument/inlineCompletion",
                {
                    "textDocument": {"uri": uri},
                    "position": {"line": len(lines) - 1, "character": len(lines[-1])},
                    "context": {"triggerKind": 1},
                },
            )
        )
        if (i + 1) % args.every == 0:
            print(f"{i + 1:>4} documents of {args.kb} kB open and completed: {status(c.proc.pid)} MB", flush=True)
    c.wait(c.start("shutdown", None))
    c.send({"method": "exit"})
    c.proc.wait(30)


if __name__ == "__main__":
    main()
