"""``serve --tcp``: one client per listener, nothing for anyone else.

The real server listens on a free loopback port; :class:`helpers.RawClient` is the editor, plain
sockets are the other local programs (a second client, a web page's HTTP POST, a port scan).
"""

from __future__ import annotations

import asyncio
import socket
import sys

from helpers import RawClient, start_tcp

SOURCE = "import os\n\n\ndef list_files(root):\n    return os.listdir(root)\n"
NOT_FOUND = -32601


async def start(*args: str) -> tuple[asyncio.subprocess.Process, int]:
    return await start_tcp(*args)


async def intruder(port: int, data: bytes, timeout: float = 15) -> bytes:
    """Connect, send ``data``, return all the server sends back until it closes the connection
    (b"" when it refuses the connection outright: the listener is closed)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return b""
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    except (ConnectionError, OSError):
        return b""
    finally:
        writer.close()


def framed(body: bytes) -> bytes:
    return b"Content-Length: %d\r\n\r\n" % len(body) + body


async def test_one_client_and_nobody_else():
    proc, port = await start()
    # before any client: a web page's POST, and a message other than initialize, are closed unanswered
    post = b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\nContent-Length: 120\r\n\r\n" + framed(
        b'{"jsonrpc": "2.0", "method": "workspace/didChangeConfiguration", '
        b'"params": {"settings": {"codegenLs": {"modelPath": "/tmp"}}}}'
    )
    assert await intruder(port, post) == b""
    assert (
        await intruder(
            port,
            framed(
                b'{"jsonrpc": "2.0", "id": 1, "method": "codegenLs/debugDocument", "params": {"uri": "file:///a.py"}}'
            ),
        )
        == b""
    )
    c = await RawClient.connect_tcp(proc, "127.0.0.1", port)
    try:
        await c.initialize()
        status = (await c.notification("codegenLs/status", where=lambda p: p["state"] in ("ready", "error")))["params"]
        assert status["state"] == "ready" and "codegen-ls-small" in status["model"], status  # the POST changed nothing
        await c.open("file:///a.py", SOURCE)
        # a second local program: refused (the listener is closed), it never reads the document
        stolen = await intruder(
            port,
            framed(b'{"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"capabilities": {}}}')
            + framed(
                b'{"jsonrpc": "2.0", "id": 2, "method": "codegenLs/debugDocument", "params": {"uri": "file:///a.py"}}'
            ),
        )
        assert b"list_files" not in stolen and stolen == b""
        reply = await c.request("codegenLs/debugDocument", {"uri": "file:///a.py"})
        assert reply["result"]["text"] == SOURCE  # the editor's session is untouched
        reply = await c.request(
            "textDocument/inlineCompletion",
            {
                "textDocument": {"uri": "file:///a.py"},
                "position": {"line": 4, "character": 11},
                "context": {"triggerKind": 1},
            },
        )
        assert "result" in reply
    finally:
        assert await c.close() == 0
    stderr = c.stderr_text()
    assert "Traceback" not in stderr and "SystemExit" not in stderr, stderr[-3000:]


async def test_server_ends_when_its_client_resets_the_connection():
    proc, port = await start()
    c = await RawClient.connect_tcp(proc, "127.0.0.1", port)
    await c.initialize()
    await c.open("file:///a.py", SOURCE)
    sock = c.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # close = RST
    c.writer.transport.abort()
    code = await asyncio.wait_for(proc.wait(), 15)  # not 30+ s with the old documents
    assert code == 1  # gone without exit
    assert await intruder(port, b"") == b""  # and nobody can connect to what it held


async def test_non_loopback_address_needs_a_flag():
    refused, _ = await start_tcp(host="0.0.0.0")
    _, err = await asyncio.wait_for(refused.communicate(), 60)
    assert refused.returncode == 1 and b"--allow-remote" in err, err
    allowed, port = await start_tcp("--allow-remote", host="0.0.0.0")
    c = await RawClient.connect_tcp(allowed, "127.0.0.1", port)
    await c.initialize(wait_ready=False)
    assert await c.close() == 0
    assert b"warning: listening on 0.0.0.0" in bytes(c.stderr), c.stderr_text()


async def test_debug_document_needs_its_flag():
    c = await RawClient.start(cmd=[sys.executable, "-m", "codegen_ls", "serve"])
    try:
        await c.initialize(wait_ready=False)
        await c.open("file:///a.py", SOURCE)
        reply = await c.request("codegenLs/debugDocument", {"uri": "file:///a.py"})
        assert reply.get("error", {}).get("code") == NOT_FOUND, reply
    finally:
        await c.close()
