"""How messages come and go: stdio, or exactly one TCP client, through the framing reader.

:func:`pump` reads chunks from a byte source, frames them (:class:`~codegen_ls.lsp.framing.Framer`:
case-insensitive headers, capped lengths, resynchronisation), parses each body and hands it to
the protocol; bytes that were not a message are answered (``-32700`` with ``"id": null``, or the
refused request's own id), so no input leaves the server deaf.

stdio: stdin is read on one daemon thread (:class:`StdinSource`), so a client that stops talking
after ``exit`` cannot keep the process alive.

TCP (``codegen-ls serve --tcp``): one client per listener. A connection becomes the client only
when its first message is an LSP-framed ``initialize`` request, within :data:`HANDSHAKE_S`;
anything else (an HTTP request a web page sent to localhost, a port scan, a second editor) is
closed unanswered and never sees the session. Then the listener closes, and when the client
leaves (end of stream, reset, ``exit``) the server ends with it: no documents outlive it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO, Protocol

from codegen_ls.lsp.framing import MAX_BODY, Body, Event, Framer, Problem

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20  # bytes per read
HANDSHAKE_S = 10.0  # a TCP connection's time to send its initialize request
HANDSHAKE_BYTES = 1 << 20  # ... and its most bytes


class MessageSink(Protocol):
    """What :func:`pump` needs of the protocol (:class:`~codegen_ls.lsp.jsonrpc.CodegenLsProtocol`)."""

    def structure_message(self, data: dict[str, Any]) -> Any: ...

    def handle_message(self, message: Any) -> None: ...

    def on_transport_error(self, error: Exception, source: Any = None) -> None: ...

    def framing_error(self, problem: Problem) -> None: ...


def deliver(protocol: MessageSink, event: Event) -> None:
    """Parse one framed body and hand it on; answer a framing problem. ``exit`` raises SystemExit."""
    if isinstance(event, Problem):
        protocol.framing_error(event)
        return
    try:
        message = json.loads(event.data, object_hook=protocol.structure_message)
    except (ValueError, RecursionError) as exc:  # not JSON (or not UTF-8): -32700
        protocol.on_transport_error(exc)
        return
    try:
        protocol.handle_message(message)
    except Exception:  # the protocol answers what it can; the read loop must go on
        log.exception("unable to handle a message")


async def pump(
    read: Callable[[], Any],
    protocol: MessageSink,
    stop: threading.Event,
    framer: Framer | None = None,
    pending: Sequence[Event] = (),
) -> None:
    """Read until end of stream (or ``stop``), delivering each message in order."""
    framer = framer or Framer()
    events = list(pending)
    while True:
        for event in events:
            deliver(protocol, event)
        if stop.is_set():
            return
        try:
            data = await read()
        except (ConnectionError, OSError) as exc:  # a reset is the end of the session, like EOF
            log.info("connection lost: %r", exc)
            return
        if not data:
            return
        events = framer.feed(data)


# -------------------------------------------------------------------------------------------------
# stdio
# -------------------------------------------------------------------------------------------------


class StdinSource:
    """Chunks of a binary stream, read on one daemon thread, one read per call (backpressure)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._read = getattr(stream, "read1", stream.read)
        self._jobs: queue.SimpleQueue[asyncio.Future[bytes]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="codegen-ls-stdin", daemon=True)
        self._thread.start()

    def read(self) -> asyncio.Future[bytes]:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._jobs.put(future)
        return future

    def _run(self) -> None:
        while True:
            future = self._jobs.get()
            try:
                data = self._read(READ_CHUNK)
            except Exception as exc:  # a broken stdin is the end of the session
                log.warning("reading stdin failed: %r", exc)
                data = b""
            try:
                future.get_loop().call_soon_threadsafe(_set_if_pending, future, data)
            except RuntimeError:  # loop closed
                return


def _set_if_pending(future: asyncio.Future[bytes], data: bytes) -> None:
    if not future.done():
        future.set_result(data)


# -------------------------------------------------------------------------------------------------
# TCP: one client
# -------------------------------------------------------------------------------------------------


def is_initialize(event: Event) -> bool:
    """Whether a framed message is a JSON-RPC ``initialize`` request."""
    if not isinstance(event, Body):
        return False
    try:
        message = json.loads(event.data)
    except (ValueError, RecursionError):
        return False
    return (
        isinstance(message, dict)
        and message.get("jsonrpc") == "2.0"
        and message.get("method") == "initialize"
        and isinstance(message.get("id"), (int, str))
        and not isinstance(message.get("id"), bool)
    )


async def _handshake(reader: asyncio.StreamReader, framer: Framer) -> list[Event] | None:
    """The connection's first messages when the first is an ``initialize`` request, else None."""
    seen = 0
    while seen <= HANDSHAKE_BYTES:
        data = await reader.read(READ_CHUNK)
        if not data:
            return None
        seen += len(data)
        events = framer.feed(data)
        if events:
            return events if is_initialize(events[0]) else None
    return None


async def serve_tcp(host: str, port: int, protocol: Any, stop: threading.Event) -> int:
    """Listen until one client has connected and left; return the exit code (``exit``: 0 after
    ``shutdown``, else 1; a client gone without ``exit``: 1)."""
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[int] = loop.create_future()
    claimed = False

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal claimed
        peer = writer.get_extra_info("peername")
        framer = Framer(max_body=HANDSHAKE_BYTES)
        events = None
        if not claimed:
            try:
                events = await asyncio.wait_for(_handshake(reader, framer), HANDSHAKE_S)
            except (asyncio.TimeoutError, ConnectionError, OSError):
                events = None
        if events is None or claimed:
            log.warning(
                "closed a TCP connection from %s: %s",
                peer,
                "a client is already connected" if claimed else "its first message was not an LSP initialize request",
            )
            writer.close()
            return
        claimed = True
        server.close()  # one client per listener: nobody else can connect now
        log.info("client %s connected; no further connections are accepted", peer)
        framer.max_body = MAX_BODY
        protocol.set_writer(writer)
        code = 1
        try:
            await pump(lambda: reader.read(READ_CHUNK), protocol, stop, framer, events)
            log.info("client %s left without exit", peer)
        except SystemExit as exc:  # the exit notification
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            stop.set()
            writer.close()
            if not finished.done():
                finished.set_result(code)

    server = await asyncio.start_server(connection, host, port)
    log.info("listening on %s (one client)", ", ".join(str(s.getsockname()) for s in server.sockets))
    try:
        return await finished
    finally:
        server.close()
