"""Shared test helpers, imported as ``from helpers import ...`` (conftest.py holds only fixtures).

- paths and material: the repository, the embedded model, a small Python document, contexts
  built from ``|``-marked text;
- the server: how tests start it (:data:`SERVER_CMD`, :func:`server_env`) and a bare JSON-RPC
  client (:class:`RawClient`) that writes any bytes to its stdin (malformed JSON, bad framing,
  unknown methods) and records everything it sends back;
- tiny exports: a random CodeGen checkpoint of a given shape exported with our command
  (:func:`tiny_export`); a random CodeGen saved by transformers, its LM head biased per token
  (:func:`random_codegen`);
- the remote backend's and the cluster's material: a document typed up to a cursor
  (:func:`typed_to`), a free loopback port, an ``/infill`` body;
- language-server sessions over pytest-lsp: a document, statuses recorded as dicts, polling,
  opening a document;
- UTF-16 positions the way an editor counts them (:func:`utf16_len`, :func:`utf16_offset`);
- the 4-bit KV cache's reference quantizer (:func:`quantize4`, :func:`dequantize4`, from
  :mod:`codegen_ls.engine.kvcache`, the format's owner);
- a decode run through a gqa backend (the kernel tests compare two of them).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from codegen_ls.engine.engine import Tokenizer
from codegen_ls.engine.kvcache import dequantize4, quantize4
from codegen_ls.settings import Settings
from codegen_ls.suggest.context import Context, ContextOptions, TokenCounter, build_context

if TYPE_CHECKING:
    from pytest_lsp import LanguageClient

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "codegen-ls-small"
MODEL_DIR = MODEL
TOKENIZER = MODEL / "tokenizer.json"
COUNTER = TokenCounter(Tokenizer(MODEL / "tokenizer.json"))
BOS = "<|endoftext|>"

CODE = '''import os


class Greeter:
    """Says hello."""

    def __init__(self, name):
        self.name = name

    def greet(self, loud=False):
        message = "Hello, " + self.name
        if loud:
            message = message.upper()
        return message


def main():
    g = Greeter("world")
    print(g.greet())
'''


def ctx_of(marked: str, **kw: object) -> Context:
    """Context for a document with ``|`` marking the cursor (512-token budget)."""
    i = marked.index("|")
    before = marked[:i]
    return build_context(
        marked[:i] + marked[i + 1 :],
        before.count("\n"),
        len(before) - before.rfind("\n") - 1,
        COUNTER,
        512,
        ContextOptions(bos_text=BOS, **kw),  # type: ignore[arg-type]
    )


def decode_run(
    be: Any, ids: list[int], steps: list[list[int]], rows: int
) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Prefill ``ids`` on a gqa backend, then decode ``steps`` with ``rows`` candidate rows (the
    last row finishes after four steps: the others go on). Returns (the prompt's last logits and
    every step's, copies of the cache buffers, the end position)."""
    logits, state = be.prefill(None, 0, ids, len(ids) - 1, None)
    dec = be.begin(state, len(ids), rows, len(steps))
    out = [logits[-1:]]
    for i, tokens in enumerate(steps):
        if rows > 1 and i == 4:
            be.keep_rows(dec, np.arange(rows - 1))
        out.append(be.step(dec, tokens[: dec.bias.shape[0]]))
    return out, [b.copy() for b in state.buffers], dec.end


SERVER_CMD = [sys.executable, "-m", "codegen_ls", "serve", "--debug-requests"]
"""How every test starts the language server (stdio; ``codegenLs/debugDocument`` answered)."""


def server_env(**extra: str) -> dict[str, str]:
    """The environment for a server subprocess: ours, minus a model override, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "CODEGEN_LS_MODEL"}
    env.update(extra)
    return env


class RawClient:
    """A minimal LSP client over a server subprocess: frames, sends, and records messages."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        reader: asyncio.StreamReader | None = None,
        writer: asyncio.StreamWriter | None = None,
    ) -> None:
        self.proc = proc
        self.reader = reader or proc.stdout
        self.writer = writer or proc.stdin
        self.responses: dict[Any, dict[str, Any]] = {}
        self.arrival: dict[Any, float] = {}  # response id -> loop.time() when it arrived
        self.notifications: list[dict[str, Any]] = []
        self.server_requests: list[dict[str, Any]] = []
        self.null_id_errors: list[dict[str, Any]] = []
        self.configuration: Any = None  # answer to workspace/configuration
        self.stderr = bytearray()
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())
        self._stderr_reader = asyncio.create_task(self._read_stderr())

    @classmethod
    async def start(cls, *args: str, env: dict[str, str] | None = None, cmd: list[str] | None = None) -> RawClient:
        proc = await asyncio.create_subprocess_exec(
            *(cmd or SERVER_CMD),
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env or server_env(),
            limit=1 << 26,
        )
        return cls(proc)

    @classmethod
    async def connect_tcp(
        cls, proc: asyncio.subprocess.Process, host: str, port: int, timeout: float = 30
    ) -> RawClient:
        """Talk to a server started with ``--tcp HOST:PORT`` (retrying until it listens)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                reader, writer = await asyncio.open_connection(host, port, limit=1 << 26)
                return cls(proc, reader, writer)
            except OSError:
                if loop.time() > deadline or proc.returncode is not None:
                    raise
                await asyncio.sleep(0.1)

    # -- sending ----------------------------------------------------------------------------------
    async def send_bytes(self, body: bytes) -> None:
        assert self.writer is not None
        self.writer.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        await self.writer.drain()

    async def send(self, message: Any) -> None:
        await self.send_bytes(json.dumps(message).encode())

    async def notify(self, method: str, params: Any = None) -> None:
        await self.send({"jsonrpc": "2.0", "method": method, "params": params})

    async def request(self, method: str, params: Any = None, *, timeout: float = 60, **fields: Any) -> dict[str, Any]:
        """Send a request and return the whole response message (``result`` or ``error``)."""
        msg_id = fields.pop("id", next(self._ids))
        message = {"jsonrpc": "2.0", "id": msg_id, "method": method, **fields}
        if params is not None:
            message["params"] = params
        await self.send(message)
        return await self.response(msg_id, timeout)

    def next_id(self) -> int:
        return next(self._ids)

    # -- receiving --------------------------------------------------------------------------------
    async def response(self, msg_id: Any, timeout: float = 60) -> dict[str, Any]:
        await self.wait_until(lambda: msg_id in self.responses, timeout, f"no response to request {msg_id!r}")
        return self.responses[msg_id]

    async def notification(self, method: str, timeout: float = 60, since: int = 0, where: Any = None) -> dict[str, Any]:
        """The first notification ``method`` (index >= ``since``) whose params satisfy ``where``."""

        def find() -> dict[str, Any] | None:
            for n in self.notifications[since:]:
                if n.get("method") == method and (where is None or where(n.get("params"))):
                    return n
            return None

        await self.wait_until(lambda: find() is not None, timeout, f"no {method} notification")
        found = find()
        assert found is not None
        return found

    async def wait_until(self, predicate: Any, timeout: float, what: str = "condition") -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            if self.proc.returncode is not None and self._reader.done():
                raise AssertionError(f"{what}: server exited with {self.proc.returncode}\n{self.stderr_text()}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"{what} within {timeout} s\n{self.stderr_text()[-3000:]}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))
            except asyncio.TimeoutError:
                pass

    def stderr_text(self) -> str:
        return self.stderr.decode(errors="replace")

    async def _read(self) -> None:
        out = self.reader
        assert out is not None
        try:
            while True:
                length = None
                while True:
                    line = await out.readline()
                    if not line:
                        return
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                    elif line in (b"\r\n", b"\n"):
                        break
                    else:
                        assert line.lower().startswith(b"content-type"), f"unexpected header {line!r}"
                assert length is not None, "a message without Content-Length"
                await self._dispatch(json.loads(await out.readexactly(length)))
        finally:
            self._changed.set()

    async def _dispatch(self, msg: dict[str, Any]) -> None:
        if "method" in msg and "id" in msg:  # a request from the server: answer it
            self.server_requests.append(msg)
            result = [self.configuration] if msg["method"] == "workspace/configuration" else None
            await self.send({"jsonrpc": "2.0", "id": msg["id"], "result": result})
        elif "method" in msg:
            self.notifications.append(msg)
        elif msg.get("id") is None:
            self.null_id_errors.append(msg)
        else:
            self.responses[msg["id"]] = msg
            self.arrival[msg["id"]] = asyncio.get_running_loop().time()
        self._changed.set()

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(1 << 16):
            self.stderr += chunk
            del self.stderr[: max(0, len(self.stderr) - (1 << 20))]

    # -- session ----------------------------------------------------------------------------------
    async def initialize(
        self, options: Any = None, capabilities: dict[str, Any] | None = None, wait_ready: bool = True
    ) -> dict[str, Any]:
        caps = {"window": {"workDoneProgress": True}} if capabilities is None else capabilities
        params: dict[str, Any] = {"processId": os.getpid(), "rootUri": None, "capabilities": caps}
        if options is not None:
            params["initializationOptions"] = options
        reply = await self.request("initialize", params)
        await self.notify("initialized", {})
        if wait_ready:
            await self.notification("codegenLs/status", where=lambda p: p["state"] in ("ready", "error"))
        return reply

    async def open(self, uri: str, text: str, language_id: str = "python", version: int = 1) -> None:
        await self.notify(
            "textDocument/didOpen",
            {"textDocument": {"uri": uri, "languageId": language_id, "version": version, "text": text}},
        )

    async def close(self, timeout: float = 10) -> int:
        """shutdown + exit if the server still runs; return its exit code."""
        if self.proc.returncode is None:
            try:
                await self.request("shutdown", timeout=timeout)
                await self.notify("exit")
            except (AssertionError, ConnectionError):
                pass
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()
        self._stderr_reader.cancel()
        return self.proc.returncode if self.proc.returncode is not None else -1


def tiny_export(
    base: Path,
    *,
    n_embd: int,
    n_head: int,
    kv_bits: int | None = 8,
    quantize: bool = True,
    n_layer: int = 2,
    n_positions: int = 1024,
    graph: str = "gqa",
) -> Path:
    """A random CodeGen checkpoint of this shape (vocabulary of 8192, the embedded tokenizer)
    under ``base/src``, exported with our command to ``base/model``; returns the model directory."""
    from codegen_ls.export.pipeline import export, random_checkpoint

    src = random_checkpoint(
        base / "src",
        vocab_size=8192,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        rotary_dim=8,
        tokenizer=TOKENIZER,
    )
    export(str(src), base / "model", quantize_int8=quantize, graph=graph, kv_bits=kv_bits)
    return base / "model"


def random_codegen(
    out: Path,
    config: dict[str, Any],
    *,
    biases: dict[int, float] | None = None,
    tokenizer: Path | None = None,
    seed: int = 0,
    **save: Any,
) -> Path:
    """A random CodeGen built and saved by transformers at ``out``: a tiny shape (256 positions, 64
    wide, 2 layers, 4 heads, rotary 8, untied head) with ``config`` over it (``vocab_size`` at
    least). The LM head's bias is -1e4 for end of text (id 0: decode runs to its length), then
    ``biases`` (token id -> bias); ``tokenizer`` is copied in as ``tokenizer.json``; ``save``:
    ``save_pretrained``'s options (``safe_serialization``, ``max_shard_size``)."""
    import torch
    from transformers import CodeGenConfig, CodeGenForCausalLM

    tiny: dict[str, Any] = dict(
        n_positions=256,
        n_ctx=256,
        n_embd=64,
        n_layer=2,
        n_head=4,
        rotary_dim=8,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = CodeGenForCausalLM(CodeGenConfig(**(tiny | config))).eval()
    with torch.no_grad():
        for token, bias in ({0: -1e4} | (biases or {})).items():
            model.lm_head.bias[token] = bias
    model.save_pretrained(str(out), **save)
    if tokenizer is not None:
        (out / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return out


# -- the remote backend and the cluster (test_remote, test_cluster) ---------------------------------

STORE_SOURCE = """import os


class Store:
    def __init__(self, root):
        self.root = root
        self.items = {}

    def path(self, name):
        return os.path.join(self.root, name)

    def load(self, name):
        with open(self.path(name)) as f:
            return f.read()

    def save(self, name, text):
        with open(self.path(name), "w") as f:
            f.write(text)
"""
STORE_CURSORS = [(5, 20), (6, 21), (9, 20), (12, 13), (13, 19), (17, 14), (8, 4), (15, 8)]  # (line, character)


def typed_to(line: int, character: int) -> str:
    """STORE_SOURCE as it is while the user types: the cursor line ends at the cursor."""
    lines = STORE_SOURCE.split("\n")
    return "\n".join(lines[:line] + [lines[line][:character]] + lines[line + 1 :])


def free_port() -> int:
    """A loopback port nothing listens on (just now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def remote_pipeline_settings(**kw: Any) -> Settings:
    """Greedy only, sizes set (a latency target may size default ones by the local engine's speed), every
    suggestion shown (these tests compare the remote path with the local one, not confidence)."""
    kw.setdefault("min_confidence", 0.0)
    kw.setdefault("fim", False)  # the remote client sends prefix-only prompts (a server's FIM is its `suffix` field)
    return Settings(num_candidates=1, lookup=False, deadline_ms=20_000, max_new_tokens=40, context_tokens=1000, **kw)


def infill_request() -> dict[str, Any]:
    """A llama.cpp ``/infill`` body with one extra file, the prompt cache asked for."""
    return {
        "input_prefix": "import os\n\n\ndef home():\n    return ",
        "input_suffix": "\n",
        "n_predict": 8,
        "input_extra": [{"filename": "util.py", "text": "def join(a, b):\n    return a + b\n"}],
        "t_max_predict_ms": 5000,
        "cache_prompt": True,
    }


# -- language-server sessions over pytest-lsp (test_server, test_editor_seam) -----------------------

LSP_SOURCE = """import os


def read_lines(path):
    with open(path) as f:
        return f.read().splitlines()


def count_words(text):
    words = text.split()
    return len(words)


def main():
    lines = read_lines("data.txt")
    for line in lines:
        print(count_words(line))
"""


def plain(params: Any) -> Any:
    """pygls hands JSON objects over as namedtuples; dicts all the way down."""
    if hasattr(params, "_asdict"):
        return {k: plain(v) for k, v in params._asdict().items()}
    if isinstance(params, dict):
        return {k: plain(v) for k, v in params.items()}
    if isinstance(params, (list, tuple)):
        return [plain(v) for v in params]
    return params


def record_statuses(client: LanguageClient) -> list[dict[str, Any]]:
    """The ``codegenLs/status`` notifications the client receives from now on, as dicts."""
    statuses: list[dict[str, Any]] = []
    client.feature("codegenLs/status")(lambda params: statuses.append(plain(params)))
    return statuses


async def wait_for(predicate: Any, what: str, timeout: float = 60) -> None:
    """Poll ``predicate()`` until it holds; an AssertionError naming ``what`` after ``timeout`` s."""
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def open_doc(client: LanguageClient, uri: str, text: str = LSP_SOURCE, version: int = 1) -> None:
    from lsprotocol import types

    client.text_document_did_open(
        types.DidOpenTextDocumentParams(
            types.TextDocumentItem(uri=uri, language_id="python", version=version, text=text)
        )
    )


def utf16_len(text: str) -> int:
    """``text``'s length in UTF-16 code units (an LSP column)."""
    return sum(2 if ord(ch) > 0xFFFF else 1 for ch in text)


def utf16_offset(text: str, line: int, utf16_col: int) -> int:
    """The code-point offset in ``text`` (lines split at ``\\n``) of an LSP position."""
    lines = text.split("\n")
    head = sum(len(x) + 1 for x in lines[:line])
    units, col = 0, 0
    for ch in lines[line]:
        if units >= utf16_col:
            break
        units += 2 if ord(ch) > 0xFFFF else 1
        col += 1
    return head + col


__all__ = [
    "BOS",
    "CODE",
    "COUNTER",
    "LSP_SOURCE",
    "MODEL",
    "MODEL_DIR",
    "REPO",
    "SERVER_CMD",
    "STORE_CURSORS",
    "STORE_SOURCE",
    "TOKENIZER",
    "RawClient",
    "ctx_of",
    "decode_run",
    "dequantize4",
    "free_port",
    "infill_request",
    "open_doc",
    "plain",
    "quantize4",
    "random_codegen",
    "record_statuses",
    "remote_pipeline_settings",
    "server_env",
    "tiny_export",
    "typed_to",
    "utf16_len",
    "utf16_offset",
    "wait_for",
]


def hf_greedy(src: Path, ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of ``ids`` by the checkpoint in ``src`` (``n`` tokens, no EOS stop)."""
    from transformers import CodeGenForCausalLM

    return hf_model_greedy(CodeGenForCausalLM.from_pretrained(str(src)).eval(), ids, n)


def hf_model_greedy(model: Any, ids: list[int], n: int) -> list[int]:
    """A loaded transformers model's greedy continuation of ``ids`` (``n`` tokens, no EOS stop)."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=0,
        )
    return [int(t) for t in out[0, len(ids) :]]


async def start_tcp(*args: str, host: str = "127.0.0.1") -> tuple[asyncio.subprocess.Process, int]:
    """``serve --tcp HOST:PORT`` on a free port, its output piped: (the process, the port)."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *SERVER_CMD,
        "--tcp",
        f"{host}:{port}",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=server_env(),
    )
    return proc, port
