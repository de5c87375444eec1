"""A language server session over stdio for the benchmarks: JSON-RPC framing, a reader thread that
records when each response arrives and the ``codegenLs/status`` notifications, and answers the
server's own requests at once (as an editor does). Used by bench_long_line, bench_typing and
bench_many_documents.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any


class StdioClient:
    """JSON-RPC over a server's stdio (``cmd`` started in ``cwd``, with ``env`` when given)."""

    def __init__(self, cmd: list[str], cwd: str | Path, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        self.responses: dict[int, tuple[float, dict[str, Any]]] = {}  # id -> (arrival time, message)
        self.status: list[dict[str, Any]] = []  # codegenLs/status params, in order
        self.ready = threading.Event()  # set once the status says ready or error
        self._cond = threading.Condition()
        self._ids = iter(range(1, 1 << 30))
        threading.Thread(target=self._read, daemon=True).start()

    def send(self, msg: dict[str, Any]) -> None:
        body = json.dumps({"jsonrpc": "2.0", **msg}).encode()
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.proc.stdin.flush()

    def notify(self, method: str, params: Any) -> None:
        self.send({"method": method, "params": params})

    def start(self, method: str, params: Any) -> int:
        """Send a request without waiting; its id (for :meth:`wait`)."""
        msg_id = next(self._ids)
        self.send({"id": msg_id, "method": method, "params": params})
        return msg_id

    def wait(self, msg_id: int, timeout: float = 600) -> tuple[float, dict[str, Any]]:
        """(perf_counter time the answer arrived, the answer)."""
        with self._cond:
            if not self._cond.wait_for(lambda: msg_id in self.responses, timeout):
                raise TimeoutError(f"no answer to request {msg_id}")
            return self.responses[msg_id]

    def request(self, method: str, params: Any, timeout: float = 300) -> tuple[float, dict[str, Any]]:
        """(seconds from sending to the answer, the answer)."""
        t0 = time.perf_counter()
        msg_id = self.start(method, params)
        with self._cond:
            if not self._cond.wait_for(lambda: msg_id in self.responses, timeout):
                raise TimeoutError(f"{method}: no answer in {timeout} s")
            t1, reply = self.responses.pop(msg_id)
        return t1 - t0, reply

    def wait_state(self, state: str, timeout: float = 600) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: any(s.get("state") == state for s in self.status), timeout):
                raise TimeoutError(f"server never became {state}")
            if any(s.get("state") == "error" for s in self.status):
                raise RuntimeError(f"model error: {self.status}")

    def _read(self) -> None:
        out = self.proc.stdout
        assert out is not None
        while True:
            length = 0
            while (line := out.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if not line or not length:
                return
            msg = json.loads(out.read(length))
            now = time.perf_counter()
            if "method" in msg and "id" in msg:  # the server asks (configuration, progress): answer
                items = msg["params"].get("items", []) if msg["method"] == "workspace/configuration" else None
                self.send({"id": msg["id"], "result": None if items is None else [None] * len(items)})
            with self._cond:
                if msg.get("method") == "codegenLs/status":
                    self.status.append(msg["params"])
                    if msg["params"].get("state") in ("ready", "error"):
                        self.ready.set()
                elif "id" in msg and "method" not in msg:
                    self.responses[msg["id"]] = (now, msg)
                self._cond.notify_all()

    def close(self) -> None:
        """shutdown + exit; killed when it does not go."""
        try:
            self.request("shutdown", None, timeout=30)
            self.notify("exit", None)
            self.proc.wait(10)
        except Exception:
            self.proc.kill()


__all__ = ["StdioClient"]
