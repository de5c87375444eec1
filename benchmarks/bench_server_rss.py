"""Peak memory of the real language server: N candidates at about 2048 tokens of context.

Starts ``codegen-ls serve --model DIR`` over stdio, waits for the model to be ready, opens a
Python file of ``--chars`` characters (stdlib ``inspect.py``), asks for inline completions at
its end with ``contextTokens`` near the model's 2048 positions and ``numCandidates`` N, and
prints the server's RSS and high-water mark (``/proc/PID/status``) as one JSON line::

    python benchmarks/bench_engine.py --shape 350m --graphs gqa,gqa-int4 --skip torch,optimum  # builds the models
    python benchmarks/bench_server_rss.py build/bench/350m/int8-gqa build/bench/350m/int4-gqa
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any


class Client:
    """Just enough JSON-RPC over the server's stdio."""

    def __init__(self, model: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "codegen_ls", "serve", "--model", model],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.state = ""

    def send(self, msg: dict[str, Any]) -> None:
        body = json.dumps({"jsonrpc": "2.0", **msg}).encode()
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.proc.stdin.flush()

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        length = 0
        while (line := self.proc.stdout.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split()[1])
        return json.loads(self.proc.stdout.read(length))  # type: ignore[no-any-return]

    def request(self, msg_id: int, method: str, params: Any) -> dict[str, Any]:
        self.send({"id": msg_id, "method": method, "params": params})
        while True:
            msg = self.read()
            if msg.get("method") == "codegenLs/status":
                self.state = msg["params"]["state"]
            elif "method" in msg and "id" in msg:  # a request to the client (progress): accept
                self.send({"id": msg["id"], "result": None})
            elif msg.get("id") == msg_id:
                return msg

    def status(self, field: str) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return 0.0


def measure(model: str, n: int, chars: int, context_tokens: int) -> dict[str, Any]:
    c = Client(model)
    settings = {
        "codegenLs": {
            "contextTokens": context_tokens,
            "numCandidates": n,
            "maxNewTokens": 32,
            "lookup": False,
            "deadlineMs": 60000,
        }
    }
    c.request(
        1, "initialize", {"processId": None, "rootUri": None, "capabilities": {}, "initializationOptions": settings}
    )
    c.send({"method": "initialized", "params": {}})
    text = (Path(sysconfig.get_paths()["stdlib"]) / "inspect.py").read_text()
    text = text[: text.rindex("\n", 0, chars) + 1] + "    value = "
    lines = text.split("\n")
    c.send(
        {
            "method": "textDocument/didOpen",
            "params": {"textDocument": {"uri": "file:///bench.py", "languageId": "python", "version": 1, "text": text}},
        }
    )
    params = {
        "textDocument": {"uri": "file:///bench.py"},
        "context": {"triggerKind": 1},
        "position": {"line": len(lines) - 1, "character": len(lines[-1])},
    }
    deadline = time.time() + 300
    items, ms, msg_id = 0, 0.0, 10
    while time.time() < deadline:  # until the model is loaded and has answered once
        msg_id += 1
        t0 = time.perf_counter()
        reply = c.request(msg_id, "textDocument/inlineCompletion", params)
        ms = (time.perf_counter() - t0) * 1000
        items = len(reply.get("result", {}).get("items", []))
        if c.state == "ready" and items:
            break
        time.sleep(0.5)
    result = {
        "model": model,
        "candidates": n,
        "context_tokens": context_tokens,
        "items": items,
        "first_completion_ms": round(ms),
        "rss_mb": round(c.status("VmRSS")),
        "peak_mb": round(c.status("VmHWM")),
    }
    c.request(msg_id + 1, "shutdown", None)
    c.send({"method": "exit"})
    c.proc.wait(10)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", metavar="MODEL_DIR")
    ap.add_argument("--n", type=int, default=3, help="numCandidates")
    ap.add_argument("--chars", type=int, default=16000, help="document size (about 4,000 tokens of inspect.py)")
    ap.add_argument("--context-tokens", type=int, default=2000, help="contextTokens (the prompt budget)")
    args = ap.parse_args()
    for model in args.models:
        print(json.dumps(measure(model, args.n, args.chars, args.context_tokens)), flush=True)


if __name__ == "__main__":
    main()
