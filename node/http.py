"""One local port for the web UI: its static files over HTTP and the control websocket.

trio-websocket alone answers a plain HTTP GET with 400, so this listener reads each
connection's request head itself, with h11 (the HTTP/1.1 state machine wsproto is built on). A
websocket upgrade is handed to trio-websocket with the bytes already read put back in front of
the stream; any other request is answered here, through h11: GET or HEAD of one of the bundled
UI files (node/ui/), 404 for other paths, 405 for other methods. Files are read once at start;
every answer closes its connection (the UI is three files).

Why h11 under trio-websocket and not an ASGI server (hypercorn): a websocket message here is
refused part by part as it arrives once it passes its realm's size or the node-wide budget for
large messages (:class:`BudgetedWebSocket`), so 32 clients sending 15 MiB each cost almost
nothing (issue 9's row: +900 MB before). An ASGI server assembles each message up to one
``websocket_max_message_size`` per connection before the application sees any of it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib import resources
from typing import Any

import h11
import trio
from trio_websocket import WebSocketConnection, WebSocketRequest
from wsproto import ConnectionType, WSConnection

from ..p2p.budget import ByteBudget
from ..p2p.ratelimit import client_network
from .limits import BODY_TIMEOUT, HEAD_TIMEOUT, MAX_HEAD, WRITE_TIMEOUT, WS_RECEIVE_BYTES
from .limits import UI_CONNECTIONS as MAX_CONNECTIONS
from .limits import UI_CONNECTIONS_PER_CLIENT as MAX_CONNECTIONS_PER_CLIENT
from .limits import UI_PENDING_PER_CLIENT as MAX_PENDING_PER_CLIENT
from .limits import UI_RESERVED_CONNECTIONS as RESERVED_CONNECTIONS
from .limits import UI_RETRY_AFTER as RETRY_AFTER
from .limits import WS_FREE_MESSAGE as FREE_MESSAGE
from .limits import WS_MESSAGE_BUDGET as MESSAGE_BUDGET

log = logging.getLogger("rentahal.http")

TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
SECURITY_HEADERS = (
    # Only this node's own files and websocket; media from data: and blob: URLs made in the page.
    (
        "Content-Security-Policy",
        "default-src 'self'; connect-src 'self'; img-src 'self' data: blob:; media-src 'self' data: blob:; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache"),
)


class BadHead(Exception):
    """A request h11 could not parse; ``status`` is the answer it suggests (400, 431, ...)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RequestHead:
    method: str
    target: str
    headers: dict[str, str]  # lower-cased names; a repeated header keeps its last value
    raw: bytes  # everything read so far (the head and any bytes after it)
    # The h11 server connection that parsed it: the answer is written through it.
    conn: h11.Connection = field(repr=False, compare=False, default_factory=lambda: h11.Connection(h11.SERVER))


def _new_conn() -> h11.Connection:
    return h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)


def _head_of(conn: h11.Connection, raw: bytes) -> RequestHead | None:
    """The request head once h11 has parsed one from what it was fed; None if it needs more."""
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise BadHead(str(exc), exc.error_status_hint) from None
    if event is h11.NEED_DATA:
        return None
    if not isinstance(event, h11.Request):  # pragma: no cover - a server's first event is a Request
        raise BadHead(f"unexpected {type(event).__name__}")
    if raw.find(b"\r\n\r\n") > MAX_HEAD:  # h11 checks its buffer only while a head is incomplete
        raise BadHead(f"request head over {MAX_HEAD} bytes", 431)
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers}  # h11 lower-cases names
    return RequestHead(event.method.decode("ascii"), event.target.decode("latin-1"), headers, raw, conn)


def parse_head(data: bytes) -> RequestHead:
    """Parse an HTTP/1.x request head from ``data`` (which holds at least the blank line)."""
    conn = _new_conn()
    conn.receive_data(data)
    head = _head_of(conn, data)
    if head is None:
        raise BadHead("incomplete request head")
    return head


async def read_head(stream: trio.abc.Stream) -> RequestHead:
    conn = _new_conn()
    raw = bytearray()
    while (head := _head_of(conn, bytes(raw))) is None:
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise BadHead("connection closed before the request head ended")
        raw += chunk
        conn.receive_data(chunk)
    return head


class ReplayStream(trio.abc.Stream):
    """A stream whose first reads return bytes already taken from ``inner``."""

    def __init__(self, inner: trio.abc.Stream, first: bytes) -> None:
        self.inner = inner
        self.first = first

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.first:
            n = len(self.first) if max_bytes is None else max_bytes
            out, self.first = self.first[:n], self.first[n:]
            await trio.lowlevel.checkpoint()
            return out
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


def load_ui_files() -> dict[str, tuple[str, bytes]]:
    """URL path -> (content type, body) for every bundled UI file; "/" is index.html."""
    files: dict[str, tuple[str, bytes]] = {}
    folder = resources.files("rentahal.node").joinpath("ui")
    if folder.is_dir():
        for entry in folder.iterdir():
            suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
            if entry.is_file() and suffix in TYPES:
                files["/" + entry.name] = (TYPES[suffix], entry.read_bytes())
    if "/index.html" in files:
        files["/"] = files["/index.html"]
    return files


def response(
    status: int,
    reason: str,
    body: bytes,
    content_type: str,
    *,
    head_only: bool = False,
    extra: tuple[tuple[str, str], ...] = (),
    conn: h11.Connection | None = None,
) -> bytes:
    """The bytes of a whole answer, written by h11 on ``conn`` (the request's connection; a
    connection whose request could not be parsed still takes its error answer)."""
    conn = conn or _answering_conn()
    headers = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
        *SECURITY_HEADERS,
        *extra,
    ]
    out = conn.send(h11.Response(status_code=status, reason=reason.encode("ascii"), headers=headers)) or b""
    if body and not head_only:
        out += conn.send(h11.Data(data=body)) or b""
    return out + (conn.send(h11.EndOfMessage()) or b"")


def _answering_conn() -> h11.Connection:
    """An h11 connection ready to answer (for a refusal sent before a request was read)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: refused\r\n\r\n")
    conn.next_event()
    return conn


JsonRoute = Callable[[], dict[str, Any]]  # GET path -> a JSON answer made on each request


def answer_http(
    head: RequestHead, files: dict[str, tuple[str, bytes]], routes: dict[str, JsonRoute] | None = None
) -> bytes:
    """The whole HTTP response to a request that is not a websocket upgrade: a bundled file,
    or a JSON route (``/healthz``)."""
    text = "text/plain; charset=utf-8"
    conn = head.conn
    path = head.target.split("?", 1)[0].split("#", 1)[0]
    if routes and path in routes and head.method in ("GET", "HEAD"):
        body = (json.dumps(routes[path]()) + "\n").encode()
        return response(200, "OK", body, "application/json", head_only=head.method == "HEAD", conn=conn)
    if head.method not in ("GET", "HEAD"):
        return response(
            405, "Method Not Allowed", b"only GET and HEAD\n", text, extra=(("Allow", "GET, HEAD"),), conn=conn
        )
    path = head.target.split("?", 1)[0].split("#", 1)[0]
    if path not in files:
        return response(404, "Not Found", b"not found\n", text, head_only=head.method == "HEAD", conn=conn)
    content_type, body = files[path]
    return response(200, "OK", body, content_type, head_only=head.method == "HEAD", conn=conn)


class Exchange:
    """One HTTP request to an API route (``/v1/...``, ``/metrics``) and its answer, over the
    connection h11 parsed the head from: the body is read through h11 with a size cap, the
    answer is written whole (:meth:`send`) or streamed (:meth:`start`, :meth:`write`,
    :meth:`finish`: chunked, for server-sent events). Every answer closes the connection."""

    def __init__(self, stream: trio.abc.Stream, head: RequestHead, client: str) -> None:
        self.stream = stream
        self.head = head
        self.client = client
        self.method = head.method
        self.path, _, self.query = head.target.split("#", 1)[0].partition("?")
        self.headers = head.headers
        self.started = False  # an answer's head has been sent

    async def body(self, limit: int, timeout: float = BODY_TIMEOUT) -> bytes:
        """The whole request body; BadHead (413) past ``limit`` bytes, (400) if malformed, (408)
        if it has not all come within ``timeout`` seconds (a client trickling a body holds a
        connection of its client's quota, not forever)."""
        try:
            with trio.fail_after(timeout):
                return await self._body(limit)
        except trio.TooSlowError:
            raise BadHead(f"request body not received within {timeout:g} s", 408) from None

    async def _body(self, limit: int) -> bytes:
        declared = self.headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise BadHead(f"request body of {int(declared)} bytes; this node takes at most {limit}", 413)
        conn = self.head.conn
        out = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise BadHead(str(exc), exc.error_status_hint) from None
            if event is h11.NEED_DATA:
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    raise BadHead("connection closed before the request body ended")
                conn.receive_data(chunk)
            elif isinstance(event, h11.Data):
                out += event.data
                if len(out) > limit:
                    raise BadHead(f"request body over {limit} bytes, the most this node takes", 413)
            elif isinstance(event, h11.EndOfMessage):
                return bytes(out)
            else:  # pragma: no cover - h11 yields only these between a Request and its end
                raise BadHead(f"unexpected {type(event).__name__}")

    async def send(self, status: int, body: bytes, content_type: str, extra: tuple[tuple[str, str], ...] = ()) -> None:
        """The whole answer; the connection is closed after it."""
        self.started = True
        data = response(
            status, _reason(status), body, content_type, extra=extra, conn=self.head.conn,
            head_only=self.method == "HEAD",
        )  # fmt: skip
        await _answer_and_close(self.stream, data)

    async def start(self, status: int, content_type: str, extra: tuple[tuple[str, str], ...] = ()) -> None:
        """Send the head of a streamed answer (chunked transfer: no length is known)."""
        self.started = True
        headers = [("Content-Type", content_type), ("Connection", "close"), *SECURITY_HEADERS, *extra]
        event = h11.Response(status_code=status, reason=_reason(status).encode(), headers=headers)
        await self._send(self.head.conn.send(event) or b"")

    async def write(self, data: bytes) -> None:
        """A piece of a streamed answer; raises trio.BrokenResourceError once the client is gone."""
        if data:
            await self._send(self.head.conn.send(h11.Data(data=data)) or b"")

    async def _send(self, data: bytes) -> None:
        """Send, or give the client up (BrokenResourceError) if it takes none of it for
        WRITE_TIMEOUT seconds: a client that stops reading does not hold its place forever."""
        try:
            with trio.fail_after(WRITE_TIMEOUT):
                await self.stream.send_all(data)
        except trio.TooSlowError:
            raise trio.BrokenResourceError(f"the client read nothing for {WRITE_TIMEOUT:g} s") from None

    async def finish(self) -> None:
        await _answer_and_close(self.stream, self.head.conn.send(h11.EndOfMessage()) or b"")

    async def wait_gone(self) -> None:
        """Return once the client has closed its side (or broken the connection): a client that
        hangs up on a streamed answer. Reads and drops anything it sends meanwhile."""
        try:
            while await self.stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Status"


# An API route: answers one request through its Exchange (the connection is closed after it).
ApiHandler = Callable[[Exchange], Awaitable[None]]

# (request, client address, the request head's headers: lower-cased names, Host included)
WebSocketHandler = Callable[[WebSocketRequest, str, dict[str, str]], Awaitable[None]]


@dataclass(frozen=True)
class MessageRefused:
    """What ``get_message`` returns in place of a message that was dropped as it arrived."""

    reason: str  # one line
    code: str = "too_large"  # or "busy": the budget for all clients was full


def _weight(data: str | bytes) -> int:
    """Bytes a message part may take in memory (a non-ASCII str up to 4 per character)."""
    return len(data) if isinstance(data, bytes) or data.isascii() else 4 * len(data)


class BudgetedWebSocket(WebSocketConnection):
    """A server websocket whose messages are capped at ``max_message_size`` and, above
    ``FREE_MESSAGE`` bytes, held only while ``budget`` has room: a message past either is
    dropped part by part as it arrives (memory does not grow) and ``get_message`` returns a
    :class:`MessageRefused` in its place; the connection stays up. A delivered message keeps
    its reservation until the reader hands it back (:meth:`take_reservation`, :meth:`release`)."""

    def __init__(self, stream: trio.abc.Stream, *, budget: ByteBudget, key: str, max_message_size: int) -> None:
        super().__init__(
            stream,
            WSConnection(ConnectionType.SERVER),
            max_message_size=max_message_size,
            receive_buffer_size=WS_RECEIVE_BYTES,
        )
        self.budget = budget
        self.key = key
        self._reserved = 0  # for the message being received
        self._delivered: deque[int] = deque()  # reservations of messages not yet taken
        self._dropping = False  # inside a refused message: its remaining parts are dropped

    def take_reservation(self) -> int:
        """The bytes reserved for the message ``get_message`` returned last (0 for small ones):
        the caller gives them back with :meth:`release` when it is done with that message."""
        return self._delivered.popleft() if self._delivered else 0

    def release(self, n: int) -> None:
        if n:
            self.budget.release(self.key, n)

    def release_all(self) -> None:
        """Whatever this connection still holds in the budget (the connection is over)."""
        self.release(self._reserved + sum(self._delivered))
        self._reserved = 0
        self._delivered.clear()

    def _refusal(self, size: int) -> MessageRefused | None:
        if size > self._max_message_size:
            return MessageRefused(f"message over {self._max_message_size} bytes, the most this node takes")
        if size <= FREE_MESSAGE:
            return None
        if not self.budget.reserve(self.key, size - self._reserved):
            return MessageRefused(
                f"message of over {FREE_MESSAGE} bytes refused: this node holds at most "
                f"{self.budget.total} bytes of large messages at once; try again shortly",
                "busy",
            )
        self._reserved = size
        return None

    async def _handle_message_event(self, event: Any) -> None:
        if self._dropping:
            self._dropping = not event.message_finished
            return
        why = self._refusal(self._message_size + _weight(event.data))
        if why is not None:
            self.release(self._reserved)
            self._reserved = self._message_size = 0
            self._message_parts = []
            self._dropping = not event.message_finished
            await self._deliver(why, 0)
            return
        self._message_size += _weight(event.data)
        self._message_parts.append(event.data)
        if event.message_finished:
            parts, self._message_parts = self._message_parts, []
            msg = b"".join(parts) if isinstance(event.data, bytes) else "".join(parts)  # type: ignore[arg-type]
            held, self._reserved, self._message_size = self._reserved, 0, 0
            await self._deliver(msg, held)

    async def _deliver(self, msg: Any, held: int) -> None:
        self._delivered.append(held)
        try:
            await self._send_channel.send(msg)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self._delivered.pop()
            self.release(held)


async def open_websocket(
    nursery: trio.Nursery, stream: trio.abc.Stream, *, budget: ByteBudget, key: str, max_message_size: int
) -> tuple[WebSocketRequest, BudgetedWebSocket]:
    """trio-websocket's ``wrap_server_stream`` with a :class:`BudgetedWebSocket`."""
    connection = BudgetedWebSocket(stream, budget=budget, key=key, max_message_size=max_message_size)
    nursery.start_soon(connection._reader_task)
    return await connection._get_request(), connection


async def serve_ui(
    handler: WebSocketHandler,
    host: str,
    port: int,
    *,
    max_message_size: int,
    head_timeout: float = HEAD_TIMEOUT,
    files: dict[str, tuple[str, bytes]] | None = None,
    max_connections: int = MAX_CONNECTIONS,
    max_per_client: int = MAX_CONNECTIONS_PER_CLIENT,
    max_pending_per_client: int = MAX_PENDING_PER_CLIENT,
    reserved: int = RESERVED_CONNECTIONS,
    routes: dict[str, JsonRoute] | None = None,
    api: dict[str, ApiHandler] | None = None,
    may_use_reserved: Callable[[dict[str, str]], bool] | None = None,
    message_budget: int = MESSAGE_BUDGET,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on host:port; report the bound port through ``task_status``. A websocket message
    is at most ``max_message_size`` bytes, and those over FREE_MESSAGE share ``message_budget``
    bytes across all connections (see :class:`BudgetedWebSocket`).

    Connections are counted per client (IPv4 address, IPv6 /64) twice: while their request head
    is awaited (``max_pending_per_client``, for ``head_timeout`` at most), then while they are
    served (``max_per_client``, ``max_connections`` in all). A request whose head passes
    ``may_use_reserved`` (the sysop's CLI) has ``reserved`` more places of its own, so clients
    holding every ordinary place cannot lock the operator out. Past a cap the answer is 503 with
    ``Retry-After``, never a silent close.

    ``api`` maps a path prefix ("/v1/", "/metrics") to a handler that answers any method
    itself through an :class:`Exchange` (bodies, streamed answers)."""
    budget = ByteBudget(message_budget)
    files = load_ui_files() if files is None else files
    if "/" not in files:
        log.warning("the web UI files are missing from this installation; only the websocket is served")
    pending: dict[str, int] = {}
    open_by_client: dict[str, int] = {}
    in_reserve = [0]
    refused_logged: set[str] = set()

    def refused(who: str, why: str) -> None:
        if who not in refused_logged and len(refused_logged) < 1024:  # a line per client, not per try
            refused_logged.add(who)
            log.warning("refused UI connections from %s: %s", who, why)

    async def connection(stream: trio.SocketStream) -> None:
        client = _peer_address(stream)
        who = client_network(client)
        if pending.get(who, 0) >= max_pending_per_client or sum(pending.values()) >= max_connections:
            refused(who, f"too many connections that sent no request yet ({max_pending_per_client} per client)")
            await _refuse_busy(stream)
            return
        pending[who] = pending.get(who, 0) + 1
        try:
            head = await _read_head_or_answer(stream, head_timeout)
        finally:
            pending[who] -= 1
            if not pending[who]:
                del pending[who]
        if head is None:
            return
        if may_use_reserved is not None and in_reserve[0] < reserved and may_use_reserved(head.headers):
            in_reserve[0] += 1
            try:
                await serve_request(stream, client, head)
            finally:
                in_reserve[0] -= 1
            return
        if sum(open_by_client.values()) >= max_connections or open_by_client.get(who, 0) >= max_per_client:
            refused(who, f"too many open ({max_per_client} per client, {max_connections} in all)")
            await _answer_and_close(stream, _busy_response())
            return
        open_by_client[who] = open_by_client.get(who, 0) + 1
        try:
            await serve_request(stream, client, head)
        finally:
            open_by_client[who] -= 1
            if not open_by_client[who]:
                del open_by_client[who]

    async def serve_request(stream: trio.SocketStream, client: str, head: RequestHead) -> None:
        if head.headers.get("upgrade", "").lower() != "websocket":
            path = head.target.split("?", 1)[0]
            handler_for = next((h for prefix, h in (api or {}).items() if path.startswith(prefix)), None)
            if handler_for is not None:
                await _serve_api(handler_for, Exchange(stream, head, client))
            else:
                await _answer_and_close(stream, answer_http(head, files, routes))
            return
        connection: BudgetedWebSocket | None = None
        try:
            async with trio.open_nursery() as nursery:
                with trio.move_on_after(head_timeout) as scope:
                    request, connection = await open_websocket(
                        nursery,
                        ReplayStream(stream, head.raw),
                        budget=budget,
                        key=client_network(client),
                        max_message_size=max_message_size,
                    )
                try:
                    if not scope.cancelled_caught:
                        await handler(request, client, head.headers)
                finally:
                    nursery.cancel_scope.cancel()
                    await trio.aclose_forcefully(stream)
        finally:
            if connection is not None:
                connection.release_all()

    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(connection, listeners)


async def _serve_api(handler: ApiHandler, exchange: Exchange) -> None:
    """Run an API handler; a malformed body is answered with its status, a client gone is no
    error, and the connection is closed however the handler ended."""
    try:
        await handler(exchange)
    except BadHead as exc:
        if not exchange.started:
            body = json.dumps({"error": {"message": str(exc), "type": "invalid_request_error", "code": None}})
            with contextlib.suppress(Exception):
                await exchange.send(exc.status, body.encode(), "application/json")
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
        pass  # the client hung up
    except Exception as exc:  # one request's trouble must never take the UI port down
        log.error("API request %s failed: %s: %s", exchange.path[:100], type(exc).__name__, exc)
    finally:
        await trio.aclose_forcefully(exchange.stream)


async def _read_head_or_answer(stream: trio.SocketStream, head_timeout: float) -> RequestHead | None:
    """The request head, or None once the connection was answered (400) or dropped."""
    try:
        with trio.fail_after(head_timeout):
            return await read_head(stream)
    except (BadHead, trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
        log.debug("dropped a UI connection: %s", exc)
        if isinstance(exc, BadHead):
            body = f"bad request: {exc}\n".encode()
            reason = "Request Header Fields Too Large" if exc.status == 431 else "Bad Request"
            await _answer_and_close(stream, response(exc.status, reason, body, "text/plain; charset=utf-8"))
        else:
            await trio.aclose_forcefully(stream)
        return None


def _busy_response() -> bytes:
    return response(
        503,
        "Service Unavailable",
        b"too many connections; try again shortly\n",
        "text/plain; charset=utf-8",
        extra=(("Retry-After", str(RETRY_AFTER)),),
    )


async def _refuse_busy(stream: trio.SocketStream) -> None:
    """503 to a connection refused before its request was read: answered and closed as any
    answer is (:func:`_answer_and_close`: what the client sent is read and dropped, so the close
    is no reset that could overtake the 503), but all within a second, and its request is never
    waited for."""
    with trio.move_on_after(1.0):
        await _answer_and_close(stream, _busy_response())


def _peer_address(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except (OSError, IndexError, TypeError):
        return "unknown"  # counted as a remote client: never assumed to be this machine


async def _answer_and_close(stream: trio.SocketStream, data: bytes) -> None:
    """Send a whole answer, then close without a reset: shut down our side and read (and drop)
    what the client still sends, for up to a second, so unread bytes do not cut the answer off."""
    try:
        with trio.move_on_after(HEAD_TIMEOUT):
            await stream.send_all(data)
            await stream.send_eof()
            with trio.move_on_after(1.0):
                while await stream.receive_some(65536):
                    pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)
