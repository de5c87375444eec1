"""Robustness of the language server: hostile protocol, hostile documents, model faults, load,
offline guarantee, fuzzing, a vanishing client.

Every test runs the real server (``SERVER_CMD``) over stdio with a bare JSON-RPC client
(:class:`helpers.RawClient`), so malformed bytes can be sent and every answer checked. Figures
of the load test are printed (``pytest -s``) and only robust properties are asserted.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import MODEL_DIR, RawClient, server_env

T = TypeVar("T")

SOURCE = """import json


def load(path):
    with open(path) as f:
        return json.load(f)


def total(items):
    result = 0
    for item in items:
        result += item["price"] * item["count"]
    return result
"""

INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS = -32600, -32601, -32602
PARSE_ERROR, NOT_INITIALIZED, CANCELLED = -32700, -32002, -32800


def inline_params(uri: str, line: int, character: int, trigger: int = 2) -> dict[str, Any]:
    return {
        "textDocument": {"uri": uri},
        "position": {"line": line, "character": character},
        "context": {"triggerKind": trigger},
    }


def error_code(reply: dict[str, Any]) -> int | None:
    return reply["error"]["code"] if "error" in reply else None


def items_of(reply: dict[str, Any]) -> list[dict[str, Any]]:
    assert "result" in reply, reply
    return reply["result"]["items"]


def proc_status(pid: int) -> dict[str, int]:
    """Threads and resident memory (kB) of a process, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Threads", "VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


# -------------------------------------------------------------------------------------------------
# Protocol
# -------------------------------------------------------------------------------------------------


async def test_protocol_errors_are_answered():
    c = await RawClient.start()
    try:
        # before initialize: requests get ServerNotInitialized, notifications are dropped
        reply = await c.request("textDocument/inlineCompletion", inline_params("file:///x.py", 0, 0))
        assert error_code(reply) == NOT_INITIALIZED
        assert error_code(await c.request("shutdown")) == NOT_INITIALIZED
        await c.notify("textDocument/didOpen", {"bogus": True})
        await c.initialize({"codegenLs": {"numCandidates": 0, "noSuchSetting": 1}})  # invalid: one warning
        warnings = [n["params"] for n in c.notifications if n["method"] == "window/showMessage"]
        assert len(warnings) == 1 and warnings[0]["type"] == 2 and "noSuchSetting" in warnings[0]["message"]
        assert error_code(await c.request("initialize", {"capabilities": {}})) == INVALID_REQUEST
        await c.open("file:///a.py", SOURCE)

        # not JSON, not an object, not JSON-RPC 2.0: answered with "id": null (or the id if valid)
        for body in (
            b"{not json",
            b"\xff\xfe\x00{",
            b"[" * 100_000 + b"]" * 100_000,
            b"[]",
            b'"text"',
            b"42",
            b'{"jsonrpc": "2.0", "id": {"a": 1}, "method": "x"}',
            b'{"id": 7.5, "method": "x"}',
        ):
            before = len(c.null_id_errors)
            await c.send_bytes(body)
            await c.wait_until(lambda n=before: len(c.null_id_errors) > n, 20, f"an answer to {body[:30]!r}")
            assert c.null_id_errors[-1]["error"]["code"] in (PARSE_ERROR, INVALID_REQUEST)
        assert error_code(await c.request("x", jsonrpc="1.0")) == INVALID_REQUEST
        assert error_code(await c.request("textDocument/didOpen", {"textDocument": {}})) == INVALID_REQUEST

        # unknown methods, invalid params
        assert error_code(await c.request("codegenLs/unknown", {})) == METHOD_NOT_FOUND
        assert error_code(await c.request("$/unknownRequest")) == METHOD_NOT_FOUND
        for params in (
            None,
            "text",
            [1, 2],
            {},
            {"textDocument": {"uri": "file:///a.py"}},
            inline_params("file:///a.py", -1, 0),
            inline_params("file:///a.py", 0, "x"),
            {**inline_params("file:///a.py", 0, 0), "context": {"triggerKind": 99}},
        ):
            for method in ("textDocument/inlineCompletion", "textDocument/completion"):
                if method == "textDocument/completion" and isinstance(params, dict) and "context" in params:
                    continue
                reply = await c.request(method, params)
                assert error_code(reply) == INVALID_PARAMS, (method, params, reply)
                assert "params" in reply["error"]["message"]

        # notifications with bad params: logged and ignored
        for method, params in (
            (
                "textDocument/didChange",
                {"textDocument": {"uri": "file:///nope.py", "version": 2}, "contentChanges": [{"text": "x"}]},
            ),
            ("textDocument/didChange", {"contentChanges": "x"}),
            ("textDocument/didOpen", None),
            ("$/cancelRequest", {"id": {"x": 1}}),
            ("$/cancelRequest", {"id": 12345}),
            ("workspace/didChangeConfiguration", "x"),
            ("codegenLs/unknownNotification", {}),
        ):
            await c.notify(method, params)
        assert "result" in await c.request("textDocument/inlineCompletion", inline_params("file:///a.py", 9, 13))
        assert c.proc.returncode is None

        # after shutdown: requests are InvalidRequest, exit ends the process with 0
        reply = await c.request("shutdown")
        assert reply.get("result", "missing") is None and "error" not in reply
        reply = await c.request("textDocument/inlineCompletion", inline_params("file:///a.py", 0, 0))
        assert error_code(reply) == INVALID_REQUEST
        await c.notify("exit")
        assert await asyncio.wait_for(c.proc.wait(), 10) == 0
    finally:
        await c.close()


async def test_requests_while_loading_then_exit_without_shutdown():
    c = await RawClient.start()
    try:
        await c.initialize(wait_ready=False)
        await c.open("file:///a.py", SOURCE)
        t0 = time.perf_counter()
        reply = await c.request("textDocument/inlineCompletion", inline_params("file:///a.py", 3, 15))
        states = [n["params"]["state"] for n in c.notifications if n["method"] == "codegenLs/status"]
        if "ready" not in states:  # still loading: waited up to deadlineMs (1000), then empty
            assert items_of(reply) == [] and time.perf_counter() - t0 < 2.0
        await c.notify("exit")  # LSP: exit without shutdown -> exit code 1
        assert await asyncio.wait_for(c.proc.wait(), 10) == 1
    finally:
        await c.close()


async def test_client_gone_server_exits_within_a_second():
    c = await RawClient.start()
    try:
        await c.initialize()
        await c.open("file:///a.py", SOURCE)
        await c.send(
            {
                "jsonrpc": "2.0",
                "id": 99,
                "method": "textDocument/inlineCompletion",
                "params": inline_params("file:///a.py", 11, 8, trigger=1),
            }
        )
        assert c.proc.stdin is not None
        c.proc.stdin.close()  # the editor died
        t0 = time.perf_counter()
        code = await asyncio.wait_for(c.proc.wait(), 10)
        elapsed = time.perf_counter() - t0
        print(f"\nclient gone: server exited with {code} after {elapsed * 1000:.0f} ms")
        assert elapsed < 1.0 and code == 0
        assert "Traceback" not in c.stderr_text()
    finally:
        await c.close()


# -------------------------------------------------------------------------------------------------
# Documents
# -------------------------------------------------------------------------------------------------


def lsp_lines(text: str) -> list[str]:
    return re.findall(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+", text)


def utf16_len(text: str) -> int:
    return sum(2 if ord(ch) > 0xFFFF else 1 for ch in text)


def end_position(text: str) -> tuple[int, int]:
    lines = lsp_lines(text)
    if not lines or lines[-1].endswith(("\n", "\r")):
        return len(lines), 0
    return len(lines) - 1, utf16_len(lines[-1])


async def test_hostile_documents_are_answered():
    big = "".join(f"def f_{i}(x):\n    return x * {i} + len('{'é' * (i % 7)}')\n\n" for i in range(200_000))
    assert len(big) > 10_000_000
    docs = {
        "file:///big.py": big,
        "file:///long.py": "x = [" + ", ".join(str(i) for i in range(40_000)) + "]\ny = x",  # a 230 kB line
        "file:///crlf.py": "def f(a):\r\n\treturn a\r\n\r\nprint(f(1))\r\n",
        "file:///tabs.py": "class A:\n\tdef m(self):\n\t\treturn\tself\n",
        "file:///astral.py": "s = '😀😀 ünï 𝔘𝔫𝔦'\nt = s + '𝔘'\n",
        "file:///control.py": "a = 1\x00\x01\x1b[31m\nb = '\x0c'\x0c\nc = 3\u2028d = 4\x85e\nf = 5\r",
        "file:///surrogates.py": "bad = '\ud800'\nworse = '\udfff\ud83d'\nok = 1\n",
        "file:///empty.py": "",
    }
    c = await RawClient.start()
    try:
        await c.initialize()
        t0 = time.perf_counter()
        for uri, text in docs.items():
            await c.open(uri, text)
        assert "result" in await c.request("codegenLs/debugDocument", {"uri": "file:///big.py"}, timeout=60)
        print(f"\nopening the documents ({len(big) / 1e6:.1f} MB in all) took {time.perf_counter() - t0:.1f} s")
        methods = ("textDocument/inlineCompletion", "textDocument/completion")
        for uri, text in docs.items():
            last_line, last_col = end_position(text)
            positions = [
                (0, 0),
                (0, 3),
                (last_line, last_col),
                (last_line, last_col + 50),
                (last_line + 5, 0),
                (0, 10_000_000),
                (2**31 - 1, 2**31 - 1),
            ]
            positions += {
                "file:///astral.py": [(0, 6), (0, 7), (1, 9)],  # 7: inside a surrogate pair
                "file:///big.py": [(300_000, 4), (599_999, 0)],
                "file:///long.py": [(0, 120_000)],
            }.get(uri, [])
            for i, (line, col) in enumerate(positions):
                params = inline_params(uri, line, col)
                if i % 2:
                    del params["context"]
                t0 = time.perf_counter()
                reply = await c.request(methods[i % 2], params, timeout=120)
                assert "result" in reply, (uri, line, col, reply)
                elapsed = time.perf_counter() - t0
                if elapsed > 1:
                    print(f"\nslow: {methods[i % 2]} {uri} {line}:{col} took {elapsed:.1f} s")
                assert elapsed < 60, f"{uri} {line}:{col} took {elapsed:.1f} s"
                for item in reply["result"]["items"]:
                    rng = item["range"] if "range" in item else item["textEdit"]["range"]
                    assert rng["start"]["line"] == rng["end"]["line"] == min(line, last_line)
        # edits in documents with control characters and CRLF keep the server's copy exact
        for uri, (start, end, new) in (
            ("file:///control.py", ((2, 0), (2, 1), "C")),
            ("file:///crlf.py", ((1, 1), (1, 7), "yield")),
            ("file:///astral.py", ((0, 7), (0, 7), "?")),
            ("file:///big.py", ((599_990, 0), (599_990, 0), "# edit\n")),
            ("file:///empty.py", ((0, 0), (0, 0), "s = '\udc00'\nt = s")),
        ):
            text = docs[uri]
            await c.notify(
                "textDocument/didChange",
                {
                    "textDocument": {"uri": uri, "version": 2},
                    "contentChanges": [
                        {
                            "range": {
                                "start": {"line": start[0], "character": start[1]},
                                "end": {"line": end[0], "character": end[1]},
                            },
                            "text": new,
                        }
                    ],
                },
            )
            expected = apply_edit(text, start, end, new)
            reply = await c.request("codegenLs/debugDocument", {"uri": uri}, timeout=60)
            assert reply["result"]["text"] == expected, uri
            reply = await c.request(
                "textDocument/inlineCompletion", inline_params(uri, *end_position(expected)), timeout=60
            )
            assert "result" in reply, (uri, reply)  # a lone surrogate brought by an edit is answered too
        assert c.proc.returncode is None
    finally:
        await c.close()


def offset_of(text: str, line: int, utf16_col: int) -> int:
    """Code-point offset of an LSP position (UTF-16 columns, LSP line breaks)."""
    lines = lsp_lines(text)
    head = sum(len(x) for x in lines[:line])
    if line >= len(lines):
        return len(text)
    units = 0
    for i, ch in enumerate(lines[line]):
        if units >= utf16_col or ch in "\r\n":
            return head + i
        units += 2 if ord(ch) > 0xFFFF else 1
    return head + len(lines[line].rstrip("\r\n"))


def apply_edit(text: str, start: tuple[int, int], end: tuple[int, int], new: str) -> str:
    return text[: offset_of(text, *start)] + new + text[offset_of(text, *end) :]


# -------------------------------------------------------------------------------------------------
# Model faults
# -------------------------------------------------------------------------------------------------


def broken_models(tmp: Path) -> Iterator[tuple[str, Path]]:
    """Model directories with one fault each (unchanged files are symlinked, not copied)."""

    def copy(name: str) -> Path:
        d = tmp / name
        d.mkdir()
        for f in MODEL_DIR.iterdir():
            if f.is_file() and not f.name.startswith("__"):
                (d / f.name).symlink_to(f)
        return d

    yield "missing directory", tmp / "does-not-exist"
    d = copy("corrupt-onnx")
    (d / "model.onnx").unlink()
    (d / "model.onnx").write_bytes(os.urandom(4096))
    yield "corrupt ONNX", d
    d = copy("manifest-mismatch")
    manifest = json.loads((MODEL_DIR / "manifest.json").read_text())
    manifest["n_layer"] += 3
    (d / "manifest.json").unlink()
    (d / "manifest.json").write_text(json.dumps(manifest))
    yield "manifest mismatch", d
    d = copy("no-tokenizer")
    (d / "tokenizer.json").unlink()
    yield "missing tokenizer", d


async def test_model_faults_one_message_and_recovery(tmp_path: Path):
    c = await RawClient.start()
    try:
        faults = list(broken_models(tmp_path))
        await c.initialize({"codegenLs": {"modelPath": str(faults[0][1])}})
        await c.open("file:///a.py", SOURCE)
        for i, (fault, path) in enumerate(faults):
            if i:
                mark = len(c.notifications)
                await c.notify(
                    "workspace/didChangeConfiguration", {"settings": {"codegenLs": {"modelPath": str(path)}}}
                )
                await c.notification("codegenLs/status", since=mark, where=lambda p: p["state"] == "error")
            status = [n for n in c.notifications if n["method"] == "codegenLs/status"][-1]["params"]
            errors = [
                n["params"] for n in c.notifications if n["method"] == "window/showMessage" and n["params"]["type"] == 1
            ]
            assert len(errors) == i + 1, (fault, errors)
            print(f"\n{fault}: {errors[-1]['message']}")
            assert status["state"] == "error" and status["message"] in errors[-1]["message"]
            assert "\n" not in errors[-1]["message"] and len(errors[-1]["message"]) < 400
            assert (
                items_of(await c.request("textDocument/inlineCompletion", inline_params("file:///a.py", 11, 8))) == []
            )
        # the same bad setting again: no second message
        mark = len(c.notifications)
        await c.notify(
            "workspace/didChangeConfiguration", {"settings": {"codegenLs": {"modelPath": str(faults[-1][1])}}}
        )
        await c.notification("codegenLs/status", since=mark, where=lambda p: p["state"] == "error")
        assert not [n for n in c.notifications[mark:] if n["method"] == "window/showMessage"]
        # a valid model: recovery
        mark = len(c.notifications)
        await c.notify("workspace/didChangeConfiguration", {"settings": {"codegenLs": {"modelPath": str(MODEL_DIR)}}})
        await c.notification("codegenLs/status", since=mark, where=lambda p: p["state"] == "ready")
        reply = await c.request("textDocument/inlineCompletion", inline_params("file:///a.py", 11, 8, trigger=1))
        assert isinstance(items_of(reply), list)
        progress = [n["params"]["value"]["kind"] for n in c.notifications if n["method"] == "$/progress"]
        assert progress.count("begin") == progress.count("end") == len(faults) + 2
    finally:
        await c.close()


# -------------------------------------------------------------------------------------------------
# Load
# -------------------------------------------------------------------------------------------------


async def test_rapid_requests_with_cancellations():
    n = 1000
    c = await RawClient.start()
    try:
        await c.initialize()
        uri = "file:///load.py"
        await c.open(uri, SOURCE)
        pid = c.proc.pid
        loop = asyncio.get_running_loop()
        ends = [(3, 15), (4, 25), (9, 14), (10, 22), (11, 23), (12, 17), (6, 0), (13, 0)]  # the model runs there
        baseline = []
        for line, col in ends[:4]:
            t0 = loop.time()
            reply = await c.request("textDocument/inlineCompletion", inline_params(uri, line, col))
            assert "result" in reply
            baseline.append(loop.time() - t0)
        before = proc_status(pid)
        peak_threads = before["Threads"]
        sent: dict[int, float] = {}
        version = 1
        for i in range(n):
            msg_id = c.next_id()
            await c.send(
                {
                    "jsonrpc": "2.0",
                    "id": msg_id,
                    "method": "textDocument/inlineCompletion",
                    "params": inline_params(uri, *ends[i % len(ends)]),
                }
            )
            sent[msg_id] = loop.time()
            if i % 3 == 1:
                await c.notify("$/cancelRequest", {"id": msg_id})
            if i % 50 == 49:  # typing: a character at the start of the first line
                version += 1
                await c.notify(
                    "textDocument/didChange",
                    {
                        "textDocument": {"uri": uri, "version": version},
                        "contentChanges": [
                            {
                                "range": {"start": {"line": 0, "character": 0}, "end": {"line": 0, "character": 0}},
                                "text": "#",
                            }
                        ],
                    },
                )
            if i % 100 == 0:
                peak_threads = max(peak_threads, proc_status(pid)["Threads"])
                await asyncio.sleep(0)
        last = max(sent)
        t_sent = loop.time()
        deadline = t_sent + 120
        while not all(k in c.responses for k in sent) and loop.time() < deadline:
            peak_threads = max(peak_threads, proc_status(pid)["Threads"])
            await asyncio.sleep(0.2)
        answered = [k for k in sent if k in c.responses]
        after = proc_status(pid)
        codes = [error_code(c.responses[k]) for k in answered]
        nonempty = sum(1 for k in answered if "result" in c.responses[k] and c.responses[k]["result"]["items"])
        last_latency = c.arrival[last] - sent[last]
        print(
            f"\nload: {n} requests ({n // 3} cancelled by the client, a didChange every 50), "
            f"sent in {(t_sent - sent[min(sent)]) * 1000:.0f} ms, all answered after "
            f"{(max(c.arrival[k] for k in answered) - sent[min(sent)]) * 1000:.0f} ms\n"
            f"  answered {len(answered)}/{n}: {codes.count(None)} results ({nonempty} non-empty), "
            f"{codes.count(CANCELLED)} RequestCancelled, other errors "
            f"{[x for x in codes if x not in (None, CANCELLED)]}\n"
            f"  single-request latency {min(baseline) * 1000:.0f}-{max(baseline) * 1000:.0f} ms; "
            f"newest request after the burst: {last_latency * 1000:.0f} ms\n"
            f"  threads {before['Threads']} -> {after['Threads']} (peak {peak_threads}); "
            f"RSS {before['VmRSS'] / 1024:.0f} -> {after['VmRSS'] / 1024:.0f} MB (high-water "
            f"{after['VmHWM'] / 1024:.0f} MB)"
        )
        assert len(answered) == n
        assert set(codes) <= {None, CANCELLED}
        assert "result" in c.responses[last]
        assert after["Threads"] <= before["Threads"] + 1 and peak_threads <= before["Threads"] + 2
        assert after["VmRSS"] - before["VmRSS"] < 300 * 1024
        assert last_latency < 30, "the newest request waited behind the backlog"
        t0 = loop.time()  # after the burst: a fresh request is served at single-request speed, with items
        reply = await c.request("textDocument/inlineCompletion", inline_params(uri, *ends[3], trigger=1))
        print(
            f"  a request after the burst: {len(reply['result']['items'])} item(s) in {(loop.time() - t0) * 1000:.0f} "
            "ms"
        )
        assert reply["result"]["items"]
    finally:
        await c.close()


# -------------------------------------------------------------------------------------------------
# Offline guarantee
# -------------------------------------------------------------------------------------------------

AUDIT_GUARD = """
import os, socket, sys

_LOG = os.environ["CODEGEN_LS_NET_LOG"]
_ALLOWED = {getattr(socket, "AF_UNIX", 1)}

def _deny(event, detail):
    with open(_LOG, "a") as f:
        f.write(f"{event} {detail!r}\\n")
    raise PermissionError(f"network access in serve mode: {event} {detail!r}")

def _hook(event, args):
    if event == "socket.__new__" and args[1] not in _ALLOWED:
        _deny(event, args[1:])
    elif event in ("socket.connect", "socket.bind", "socket.sendto") and args[0].family not in _ALLOWED:
        _deny(event, args[1])
    elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr"):
        _deny(event, args[0])

sys.addaudithook(_hook)
with open(_LOG, "a") as f:
    f.write("guard installed\\n")
"""


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def inet_inodes(pid: int) -> set[str]:
    inodes = set()
    for table in ("tcp", "tcp6", "udp", "udp6", "raw", "raw6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if path.exists():
            for row in path.read_text().splitlines()[1:]:
                inodes.add(row.split()[9])
    return inodes


async def test_serve_opens_no_network_sockets(tmp_path: Path):
    (tmp_path / "codegen_ls_net_guard.py").write_text(AUDIT_GUARD)
    log = tmp_path / "net.log"
    env = server_env(
        CODEGEN_LS_NET_LOG=str(log),
        PYTHONPATH=os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    cmd = [
        sys.executable,
        "-c",
        "import codegen_ls_net_guard, runpy; runpy.run_module('codegen_ls', run_name='__main__')",
        "serve",
    ]
    c = await RawClient.start(env=env, cmd=cmd)
    try:
        await c.initialize()
        await c.open("file:///a.py", SOURCE)
        for line, col in ((11, 8), (9, 4), (13, 11)):
            assert "result" in await c.request(
                "textDocument/inlineCompletion", inline_params("file:///a.py", line, col, 1)
            )
        await c.notify("workspace/didChangeConfiguration", {"settings": {"codegenLs": {"numCandidates": 1}}})
        assert "result" in await c.request(
            "textDocument/completion",
            {"textDocument": {"uri": "file:///a.py"}, "position": {"line": 11, "character": 8}},
        )
        sockets = socket_inodes(c.proc.pid)
        leaked = sockets & inet_inodes(c.proc.pid)
        assert not leaked, f"network sockets open: {leaked}"
        assert log.read_text() == "guard installed\n", log.read_text()
    finally:
        await c.close()


# -------------------------------------------------------------------------------------------------
# Fuzzing
# -------------------------------------------------------------------------------------------------


class ThreadedServer:
    """A RawClient session on its own event loop thread, for synchronous hypothesis tests."""

    def __init__(self, options: Any = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client: RawClient = self.call(lambda: self._start(options))

    async def _start(self, options: Any) -> RawClient:
        client = await RawClient.start()
        await client.initialize(options)
        return client

    def call(self, fn: Callable[[], Awaitable[T]], timeout: float = 120) -> T:
        async def run() -> T:
            return await fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def close(self) -> None:
        try:
            self.call(self.client.close, 30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


@pytest.fixture(scope="module")
def edit_server() -> Iterator[ThreadedServer]:
    server = ThreadedServer()
    yield server
    server.close()


ALPHABET = st.sampled_from(
    [
        "a",
        "b",
        " ",
        "\t",
        "\n",
        "\r\n",
        "\r",
        "é",
        "😀",
        "𝔘",
        "\x00",
        "\x0c",
        "\x1b",
        "\u2028",
        "\x85",
        "\ud800",
        "def ",
        "(",
        ")",
    ]
)
TEXT = st.lists(ALPHABET, max_size=30).map("".join)


@st.composite
def edit_script(draw: st.DrawFn) -> tuple[str, list[list[dict[str, Any]]], list[str]]:
    """An initial text and batches of changes (each batch one didChange), with the texts after each."""
    text = draw(TEXT)
    start_text, batches, texts = text, [], []
    for _ in range(draw(st.integers(1, 6))):
        batch: list[dict[str, Any]] = []
        for _ in range(draw(st.integers(1, 3))):
            if draw(st.integers(0, 9)) == 0:
                new = draw(TEXT)
                batch.append({"text": new})
                text = new
                continue
            a, b = sorted((draw(position_in(text)), draw(position_in(text))), key=lambda p: offset_of(text, *p))
            new = draw(TEXT)
            batch.append(
                {
                    "range": {"start": {"line": a[0], "character": a[1]}, "end": {"line": b[0], "character": b[1]}},
                    "text": new,
                }
            )
            text = apply_edit(text, a, b, new)
        batches.append(batch)
        texts.append(text)
    return start_text, batches, texts


def position_in(text: str) -> st.SearchStrategy[tuple[int, int]]:
    """A valid LSP position: a line, and a UTF-16 column at a code point boundary of its content."""
    lines = lsp_lines(text)
    if not lines or lines[-1].endswith(("\n", "\r")):
        lines.append("")

    def column(line: int) -> st.SearchStrategy[tuple[int, int]]:
        content = lines[line].rstrip("\r\n")
        return st.integers(0, len(content)).map(lambda i: (line, utf16_len(content[:i])))

    return st.integers(0, len(lines) - 1).flatmap(column)


_docs = iter(range(1_000_000))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(script=edit_script())
def test_random_edits_keep_server_text_equal(edit_server: ThreadedServer, script: Any):
    start, batches, texts = script
    uri = f"file:///fuzz/{next(_docs)}.py"
    c = edit_server.client

    async def run() -> None:
        await c.open(uri, start)
        for version, (batch, expected) in enumerate(zip(batches, texts, strict=True), start=2):
            await c.notify(
                "textDocument/didChange", {"textDocument": {"uri": uri, "version": version}, "contentChanges": batch}
            )
            reply = await c.request("codegenLs/debugDocument", {"uri": uri}, timeout=30)
            assert reply["result"]["text"] == expected, (start, batches)
        line, col = end_position(texts[-1])
        assert "result" in await c.request("textDocument/inlineCompletion", inline_params(uri, line, col), timeout=60)
        await c.notify("textDocument/didClose", {"textDocument": {"uri": uri}})

    edit_server.call(run)


@pytest.fixture(scope="module")
def rpc_server() -> Iterator[ThreadedServer]:
    server = ThreadedServer()
    server.call(lambda: server.client.open("file:///a.py", SOURCE))
    yield server
    server.close()


METHODS = st.sampled_from(
    [
        "textDocument/inlineCompletion",
        "textDocument/completion",
        "textDocument/didOpen",
        "textDocument/didChange",
        "textDocument/didClose",
        "workspace/didChangeConfiguration",
        "$/cancelRequest",
        "initialize",
        "initialized",
        "codegenLs/debugDocument",
        "workspace/executeCommand",
        "textDocument/hover",
        "$/setTrace",
        "window/workDoneProgress/cancel",
        "completionItem/resolve",
        "",
        "x" * 300,
        "codegenLs/status",
    ]
)
KEYS = st.sampled_from(
    [
        "uri",
        "textDocument",
        "position",
        "line",
        "character",
        "context",
        "triggerKind",
        "text",
        "id",
        "settings",
        "codegenLs",
        "jsonrpc",
        "range",
        "contentChanges",
    ]
) | st.text(max_size=8)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=12,
)
POSITION = st.fixed_dictionaries({"line": st.integers(-1, 30), "character": st.integers(-1, 40)})
PLAUSIBLE = st.fixed_dictionaries(
    {
        "textDocument": st.fixed_dictionaries({"uri": st.sampled_from(["file:///a.py", "file:///b.py"])}),
        "position": POSITION,
    },
    optional={"context": st.fixed_dictionaries({"triggerKind": st.integers(0, 3)})},
)
MESSAGE = st.fixed_dictionaries(
    {"jsonrpc": st.sampled_from(["2.0", "2.0", "2.0", "1.0", None]), "method": METHODS | st.text(max_size=10)},
    optional={
        "id": st.integers(0, 2**53) | st.text(max_size=6) | st.none() | st.floats(allow_nan=False) | st.booleans(),
        "params": JSON | PLAUSIBLE,
    },
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(message=MESSAGE | JSON, raw=st.none() | st.binary(max_size=40))
def test_random_jsonrpc_messages_are_answered(rpc_server: ThreadedServer, message: Any, raw: bytes | None):
    c = rpc_server.client
    if isinstance(message, dict) and message.get("method") in ("shutdown", "exit"):
        return
    if isinstance(message, dict) and message.get("method") == "workspace/didChangeConfiguration":
        message["params"] = {"settings": {"codegenLs": {"numCandidates": 1}}}  # keep the model loaded

    async def run() -> None:
        before = len(c.null_id_errors)
        if raw is not None:
            await c.send_bytes(raw)
        else:
            if (
                isinstance(message, dict)
                and isinstance(message.get("id"), (int, str))
                and not isinstance(message["id"], bool)
            ):
                message["id"] = f"fuzz-{c.next_id()}" if isinstance(message["id"], str) else c.next_id() + 10**9
            await c.send(message)
        msg_id = message.get("id") if isinstance(message, dict) else None
        is_request = isinstance(message, dict) and "id" in message and "method" in message
        if raw is None and is_request and isinstance(msg_id, (int, str)) and not isinstance(msg_id, bool):
            await c.response(msg_id, timeout=15)
        # every message is followed by a well-formed request, which must be answered too
        reply = await c.request("codegenLs/debugDocument", {"uri": "file:///a.py"}, timeout=60)
        assert "result" in reply, reply
        if raw is not None:
            try:
                json.loads(raw)
            except ValueError:
                assert len(c.null_id_errors) > before or not raw.strip(), raw

    rpc_server.call(run)
    assert c.proc.returncode is None


# -------------------------------------------------------------------------------------------------
# Framing and document versions
# -------------------------------------------------------------------------------------------------


async def test_bad_framing_never_makes_the_server_deaf():
    """After each malformed frame, the next well-formed request is answered (pygls' own reader
    went deaf after the first); a lowercase header is a header; a huge length is refused with the
    request's own id and never read into memory; the process stays up."""
    c = await RawClient.start()
    try:
        await c.initialize(wait_ready=False)
        await c.open("file:///a.py", SOURCE)

        def body(msg_id: int) -> bytes:
            return json.dumps(
                {"jsonrpc": "2.0", "id": msg_id, "method": "codegenLs/debugDocument", "params": {"uri": "file:///a.py"}}
            ).encode()

        bad = {
            "too short": lambda b: b"Content-Length: %d\r\n\r\n" % (len(b) - 7) + b,
            "too long": lambda b: b"Content-Length: %d\r\n\r\n" % (len(b) + 40) + b,
            "negative": lambda b: b"Content-Length: -3\r\n\r\n" + b,
            "not a number": lambda b: b"Content-Length: 12x\r\n\r\n" + b,
            "no header": lambda b: b,
            "no Content-Length": lambda b: b"Content-Type: application/json\r\n\r\n" + b,
            "HTTP": lambda b: b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % len(b) + b,
        }
        for name, make in bad.items():
            assert c.writer is not None
            c.writer.write(make(body(10_000 + len(name))))
            await c.writer.drain()
            reply = await c.request("codegenLs/debugDocument", {"uri": "file:///a.py"}, timeout=20)
            assert reply["result"]["text"] == SOURCE, name
        assert c.null_id_errors and all(e["error"]["code"] == PARSE_ERROR for e in c.null_id_errors)
        # case-insensitive header names: answered like any request
        c.writer.write(b"content-length: %d\r\n\r\n" % len(body(20_000)) + body(20_000))
        assert "result" in await c.response(20_000, timeout=20)
        # Content-Length: 100000000000000 (the process used to exit): its id gets an error
        c.writer.write(b"Content-Length: 100000000000000\r\n\r\n" + body(30_000)[:-1])
        assert error_code(await c.response(30_000, timeout=20)) == INVALID_REQUEST
        reply = await c.request("codegenLs/debugDocument", {"uri": "file:///a.py"}, timeout=20)
        assert reply["result"]["text"] == SOURCE
        assert c.proc.returncode is None
    finally:
        await c.close()


async def test_old_document_versions_are_ignored_and_null_versions_applied():
    c = await RawClient.start()
    try:
        await c.initialize(wait_ready=False)
        uri = "file:///v.py"
        await c.open(uri, "a = 1\n", version=5)

        async def change(version: int | None, text: str) -> str:
            await c.notify(
                "textDocument/didChange",
                {"textDocument": {"uri": uri, "version": version}, "contentChanges": [{"text": text}]},
            )
            return (await c.request("codegenLs/debugDocument", {"uri": uri}))["result"]["text"]

        assert await change(6, "a = 2\n") == "a = 2\n"
        for old in (4, 5, 3):  # older than the document: ignored
            assert await change(old, f"stale = {old}\n") == "a = 2\n"
        assert await change(None, "a = 3\n") == "a = 3\n"  # no version: applied (was dropped)
        reply = await c.request("codegenLs/debugDocument", {"uri": uri})
        assert reply["result"]["version"] == 6
        assert await change(7, "a = 4\n") == "a = 4\n"
        assert c.stderr_text().count("older than the document") == 1  # logged once
    finally:
        await c.close()


async def test_long_line_does_not_starve_other_documents():
    """A 3 MB line: typing on it is answered, and a small document's request right behind it is
    not delayed by an order of magnitude (position conversion was a Python loop on the event
    loop: 6 s a keystroke at 2 MB, for both). Timings: benchmarks/bench_long_line.py."""
    c = await RawClient.start()
    try:
        await c.initialize({"codegenLs": {"numCandidates": 1, "maxNewTokens": 8}})
        small = "import os\n\n\ndef names(root):\n    return os."
        long_line = "x = '" + ("a" * 99 + "é") * 30_000
        width = utf16_len(long_line)
        await c.open("file:///small.py", small)
        await c.open("file:///long.py", long_line)
        small_at = inline_params("file:///small.py", 4, 14, trigger=1)
        assert "result" in await c.request(
            "textDocument/inlineCompletion", inline_params("file:///long.py", 0, width, 1)
        )
        loop = asyncio.get_running_loop()
        alone, behind = [], []
        for version in range(2, 5):
            t0 = loop.time()
            await c.request("textDocument/inlineCompletion", small_at)
            alone.append(loop.time() - t0)
            t0 = loop.time()
            await c.notify(
                "textDocument/didChange",
                {
                    "textDocument": {"uri": "file:///long.py", "version": version},
                    "contentChanges": [
                        {
                            "range": {"start": {"line": 0, "character": width}, "end": {"line": 0, "character": width}},
                            "text": "z",
                        }
                    ],
                },
            )
            width += 1
            long_id, small_id = c.next_id(), c.next_id()
            await c.send(
                {
                    "jsonrpc": "2.0",
                    "id": long_id,
                    "method": "textDocument/inlineCompletion",
                    "params": inline_params("file:///long.py", 0, width, 1),
                }
            )
            await c.send(
                {"jsonrpc": "2.0", "id": small_id, "method": "textDocument/inlineCompletion", "params": small_at}
            )
            assert "result" in await c.response(small_id, 60)
            behind.append(c.arrival[small_id] - t0)
            assert "result" in await c.response(long_id, 60)
        alone_s, behind_s = sorted(alone)[1], sorted(behind)[1]
        print(
            f"\nsmall document: {alone_s * 1000:.0f} ms alone, {behind_s * 1000:.0f} ms behind a keystroke on a 3 MB "
            "line"
        )
        assert behind_s < 10 * alone_s + 1.0
        reply = await c.request("codegenLs/debugDocument", {"uri": "file:///long.py"})
        assert reply["result"]["text"] == long_line + "zzz"
    finally:
        await c.close()


# -------------------------------------------------------------------------------------------------
# Memory
# -------------------------------------------------------------------------------------------------


def test_default_prompt_cache_is_sized_to_the_model():
    from codegen_ls.engine.engine import AUTO_CACHE_DOCUMENTS, SNAPSHOT_ROOM, kv_bytes_per_token
    from codegen_ls.engine.modeldir import read_manifest

    manifest = read_manifest(MODEL_DIR)  # int8 cache: 6 layers x 8 heads x 48 x (key + value)
    assert kv_bytes_per_token(manifest) == 6 * 8 * 48 * 2
    assert AUTO_CACHE_DOCUMENTS * kv_bytes_per_token(manifest) * (1024 + SNAPSHOT_ROOM) == 45 * 2**20


async def test_prompt_cache_memory_stays_within_its_setting():
    """promptCacheMb bounds the documents' KV caches: 40 completed 60 kB documents (a ~6 MB
    snapshot each) with a 20 MB limit grow the server's RSS by at most the limit + 4 x their
    text + 100 MB (docs/security.md), where the old fixed 512 MiB limit kept them all."""
    c = await RawClient.start()
    try:
        await c.initialize({"codegenLs": {"numCandidates": 1, "maxNewTokens": 4, "promptCacheMb": 20}})
        body = "".join(f"def f_{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(2500))[:60_000]
        assert "result" in await c.request("textDocument/inlineCompletion", inline_params("file:///warm.py", 0, 0))
        before = proc_status(c.proc.pid)["VmRSS"]
        for n in range(40):
            uri, text = f"file:///m{n}.py", f"# module {n}\n" + body.replace("x * ", f"x * {n} * ") + "\nresult = "
            await c.open(uri, text)
            last = text.split("\n")
            assert "result" in await c.request(
                "textDocument/inlineCompletion", inline_params(uri, len(last) - 1, len(last[-1]), trigger=1)
            )
        grown_mb = (proc_status(c.proc.pid)["VmRSS"] - before) / 1024
        text_mb = 40 * len(body) / 2**20
        print(f"\nRSS grew {grown_mb:.0f} MB with 40 completed documents ({text_mb:.1f} MB of text), promptCacheMb 20")
        assert grown_mb <= 20 + 4 * text_mb + 100
    finally:
        await c.close()


FRAME_PIECES = st.sampled_from(
    [
        b"Content-Length: ",
        b"content-length:",
        b"CONTENT-LENGTH:\t",
        b"Content-Type: x",
        b"0",
        b"7",
        b"-1",
        b"99999999999999",
        b"12x",
        b"\r\n",
        b"\n",
        b"\r\n\r\n",
        b"{",
        b"}",
        b'"id": 5',
        b'{"jsonrpc": "2.0", "id": 1, "method": "x"}',
        b"\xff",
        b" ",
        b"POST / HTTP/1.1",
    ]
)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(raw=st.binary(max_size=60) | st.lists(FRAME_PIECES, max_size=10).map(b"".join))
def test_unframed_bytes_never_make_the_server_deaf(rpc_server: ThreadedServer, raw: bytes):
    """Any bytes at all on stdin (bad headers, bodies without headers, huge lengths), and the next
    well-formed requests are answered: the first one, or (when the junk swallowed it whole, as an
    HTTP request line followed by its header block does) the one after it."""
    c = rpc_server.client

    async def run() -> None:
        assert c.writer is not None
        c.writer.write(raw)
        await c.writer.drain()
        first = c.next_id()
        await c.send(
            {"jsonrpc": "2.0", "id": first, "method": "codegenLs/debugDocument", "params": {"uri": "file:///a.py"}}
        )
        try:
            await c.response(first, timeout=5)
        except AssertionError:
            assert b"HTTP/" in raw, raw  # only a foreign header block may take the next message with it
            reply = await c.request("codegenLs/debugDocument", {"uri": "file:///a.py"}, timeout=30)
            assert "result" in reply, reply

    rpc_server.call(run)
    assert c.proc.returncode is None
